"""The stock Hugging Face Trainer with only what this model needs overridden.

- `create_optimizer`: four parameter groups (`build_param_groups`): weight decay only on matrices, and the
  projector on its own, larger learning rate.
- `_get_train_sampler`: a seeded sampler that also tells the dataset the epoch (AI Challenger samples pick
  one of their five captions per epoch), grouping samples of similar length with
  `train_sampling_strategy: group_by_length`.
- `_save` / `_load_from_checkpoint`: every checkpoint is a complete bundle (adapter + projector + config,
  see `model/bundle.py`), and resuming restores both the adapter and the projector. Under DeepSpeed the bundle
  holds the optimizer's fp32 master weights, gathered whole (ZeRO-3 shards them: without the gather the saved
  projector and the larger LoRA matrices were empty tensors); DeepSpeed and FSDP resume from their own state.
- `_save_checkpoint`: a checkpoint is sealed once every rank has written its part (`training/checkpoints.py`:
  files flushed to disk, then a record of them written last), and only then are old checkpoints rotated away
  (`save_total_limit`), so an interrupted save never costs the previous complete checkpoint.
- `compute_loss` / `prediction_step` / `evaluation_loop`: the Trainer never computes a loss of its own. Label
  smoothing (`label_smoothing_factor`) is applied inside the model's shifted, token-weighted loss (the stock
  label smoother would pop the labels and score unshifted full logits); the evaluation loss is the plain
  cross-entropy summed over every supervised token of the validation set (all ranks) divided by their count,
  not a mean of batch means, computed without a KV cache. Options that would weigh tokens otherwise are
  refused by `unsupported_options`, which train.py runs once, before anything is built or deleted.
- `log`: training log lines carry `skipped_samples` once a sample has been skipped for an unreadable image:
  the count of every rank and DataLoader worker since the run started (evaluations: `eval_skipped_samples`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from common.checkpointing import non_reentrant
from common.fileio import fsync_file
from dataset.sampler import LengthGroupedSampler
from model.bundle import check_compatible, load_trainable, save_bundle
from model.config import VLMConfig

from .checkpoints import rank_files, seal_checkpoint, unseal_checkpoint
from .distributed import full_trainable_weights


def build_param_groups(
    model: torch.nn.Module, *, learning_rate: float, projector_learning_rate: float, weight_decay: float,
    verbose: bool = True,
) -> list[dict]:
    """Trainable parameters in four groups: {LLM side, projector} x {matrices: decayed, biases/norms: not}, by each
    parameter's whole shape (also when DeepSpeed ZeRO-3 has already sharded it)."""
    groups = {
        ("llm", True): [], ("llm", False): [], ("projector", True): [], ("projector", False): [],
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        side = "projector" if ".projector." in f".{name}" else "llm"
        shape = getattr(p, "ds_shape", p.shape)  # (a ZeRO-3 shard is flat: its whole shape is ds_shape)
        groups[(side, len(shape) >= 2)].append(p)
    out = []
    for (side, decay), params in groups.items():
        if not params:
            continue
        out.append({
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "lr": projector_learning_rate if side == "projector" else learning_rate,
            "name": f"{side}/{'decay' if decay else 'no_decay'}",
        })
    if verbose:
        for g in out:
            n = sum(getattr(p, "ds_numel", p.numel()) for p in g["params"])  # (ZeRO-3: the whole size, not the shard)
            print(f"optimizer group {g['name']:<20} tensors={len(g['params']):<5} params={n:>12,} "
                  f"lr={g['lr']:.2e} weight_decay={g['weight_decay']}")
    return out


def unsupported_options(args) -> list[str]:
    """The TrainingArguments values this trainer refuses, each as one sentence that starts with the option's name:
    they would make the Trainer weigh or compute the loss otherwise than the model's token-weighted loss, or train
    otherwise than asked (FSDP on CPU). Whoever builds a VLMTrainer checks them first (train.py does, before it
    builds the model or clears output_dir); the trainer itself does not check again."""
    problems = []
    if not args.average_tokens_across_devices:
        problems.append("average_tokens_across_devices: false is not supported: the loss weighs every supervised "
                        "token of an optimizer step the same on every rank, which needs the token count of all ranks")
    if args.label_names not in (None, ["labels"]):
        problems.append(f"label_names: {args.label_names} is not supported: the batches carry their targets as "
                        "`labels`, and the loss is the model's")
    if not 0.0 <= args.label_smoothing_factor < 1.0:
        problems.append(f"label_smoothing_factor: {args.label_smoothing_factor} is not in [0, 1)")
    if args.deepspeed and "LOCAL_RANK" not in os.environ:
        problems.append("deepspeed: start it with torchrun "
                        "(`bash train.sh --deepspeed ...` does, also for one process): "
                        "DeepSpeed needs a launcher's environment (LOCAL_RANK, WORLD_SIZE, ...)")
    if args.fsdp and args.use_cpu:
        problems.append("fsdp: not on CPU: accelerate runs FSDP on GPUs only, and with use_cpu the Trainer would train "
                        "with plain DDP instead, silently (DeepSpeed ZeRO-2 and ZeRO-3 do run on CPU)")
    try:
        non_reentrant(args.activation_checkpointing_kwargs)
    except ValueError as e:
        problems.append(f"use_reentrant: true (activation_checkpointing_kwargs): {e}")
    return problems


class VLMTrainer(Trainer):
    def __init__(self, *args, bundle_config: VLMConfig, projector_learning_rate: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.bundle_config = bundle_config
        self.projector_learning_rate = projector_learning_rate
        # Label smoothing happens inside the model's loss (shifted, supervised positions, num_items_in_batch): the
        # stock smoother would pop the labels and smooth an unshifted loss over full logits.
        self.label_smoothing = float(self.args.label_smoothing_factor)
        self.label_smoother = None
        self._eval_sums = [0.0, 0]  # [summed token loss, supervised tokens] of the evaluation under way

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.label_smoothing and model.training and "labels" in inputs:
            inputs = {**inputs, "label_smoothing": self.label_smoothing}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation step: per-row summed token losses, gathered over ranks (padding duplicates dropped) into
        the running totals of `evaluation_loop`; no KV cache, no [B, T, vocab] logits."""
        if not prediction_loss_only or inputs.get("labels") is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs, use_cache=False, return_row_loss_sums=True)
        sums = outputs.row_loss_sums.detach().float()  # [B]
        counts = (inputs["labels"][:, 1:] != -100).sum(-1).to(sums.dtype)  # [B]
        everyone = self.accelerator.gather_for_metrics(torch.stack([sums, counts], dim=-1))  # [B x ranks, 2]
        total = everyone.sum(0).tolist()
        self._eval_sums[0] += total[0]
        self._eval_sums[1] += int(total[1])
        return (sums.sum() / counts.sum().clamp(min=1)).detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_sums = [0.0, 0]
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        loss_sum, tokens = self._eval_sums
        if tokens and f"{metric_key_prefix}_loss" in output.metrics:
            output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / tokens
        if skipped := self.skipped_samples(getattr(dataloader, "dataset", None)):
            output.metrics[f"{metric_key_prefix}_skipped_samples"] = skipped
        return output

    # ------------------------------------------------------------------ logging

    def skipped_samples(self, dataset=None) -> int:
        """Samples of `dataset` (default: the training set) skipped so far for an image that did not load, added
        up over every rank (and, by the dataset, over its DataLoader workers). Every rank must call it."""
        dataset = self.train_dataset if dataset is None else dataset
        count = torch.tensor([getattr(dataset, "skipped", 0)], dtype=torch.int64, device=self.args.device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return int(count.item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # a training log line ("loss") is written by every rank at the same step: the counts can be added up
        if "loss" in logs and (skipped := self.skipped_samples()):
            logs["skipped_samples"] = skipped
        super().log(logs, start_time)

    # ------------------------------------------------------------------ optimizer, sampler, checkpoints

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = build_param_groups(
                opt_model,
                learning_rate=self.args.learning_rate,
                projector_learning_rate=self.projector_learning_rate,
                weight_decay=self.args.weight_decay,
                verbose=self.args.should_log,
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        grouped = self.args.train_sampling_strategy == "group_by_length"
        # The sampler also hands the epoch to the dataset (accelerate does not under DDP when a sampler has set_epoch).
        return LengthGroupedSampler(
            dataset.lengths, batch_size=self.args.train_batch_size, seed=self.args.seed, dataset=dataset,
            group_by_length=grouped,
        )

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Every process comes here (the Trainer's `save_model`); one writes the bundle."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        weights = full_trainable_weights(self.model, state_dict, deepspeed=self.is_deepspeed_enabled)
        if self.args.should_save:
            save_bundle(self.model, output_dir, self.bundle_config, state_dict=weights)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            unseal_checkpoint(folder)  # rewritten (a resumed run reaching the step of an interrupted save)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # no rotation before the new checkpoint is sealed
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        for own in rank_files(folder, self.args.process_index):
            fsync_file(own)  # each rank flushes its own files (RNG state, DeepSpeed's optimizer shard)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            seal_checkpoint(folder, self.state.global_step)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()  # nobody reads a checkpoint before it is sealed

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume (the Trainer calls it without DeepSpeed, which loads its own state): the bundle's adapter and
        projector; FSDP's own state instead, after the same compatibility check (FSDP has not run here: it needs
        GPUs, and bench/engines.py is its check)."""
        model = model if model is not None else self.model
        check_compatible(resume_from_checkpoint, self.bundle_config, self.model)
        if self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_trainable(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: restore the best checkpoint's adapter AND projector (the stock method
        would reload the adapter only, leaving the last projector beside the best adapter). DeepSpeed and FSDP:
        the stock method, which reloads the engine's own state of that checkpoint, projector included (not run
        here yet)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            super()._load_best_model()
            return
        best = self.state.best_model_checkpoint
        if best is None or not Path(best).is_dir():
            raise FileNotFoundError(f"load_best_model_at_end: best checkpoint not found: {best}")
        self._load_from_checkpoint(best)

