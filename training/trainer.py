"""The stock Hugging Face Trainer with only what this model needs overridden.

- `create_optimizer`: four parameter groups (`build_param_groups`): weight decay only on matrices, and the
  projector on its own, larger learning rate.
- `_get_train_sampler`: a seeded sampler that also tells the dataset the epoch (AI Challenger samples pick
  one of their five captions per epoch), grouping samples of similar length with
  `train_sampling_strategy: group_by_length`.
- `_save` / `_load_from_checkpoint`: every checkpoint is a complete bundle (adapter + projector + config,
  see `model/bundle.py`), and resuming restores both the adapter and the projector.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer

from dataset.sampler import LengthGroupedSampler
from model.bundle import BundleConfig, check_compatible, load_trainable, save_bundle


def build_param_groups(
    model: torch.nn.Module, *, learning_rate: float, projector_learning_rate: float, weight_decay: float, verbose: bool = True
) -> list[dict]:
    """Trainable parameters in four groups: {LLM side, projector} x {matrices: decayed, biases/norms: not}."""
    groups = {
        ("llm", True): [], ("llm", False): [], ("projector", True): [], ("projector", False): [],
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        side = "projector" if ".projector." in f".{name}" else "llm"
        groups[(side, p.ndim >= 2)].append(p)
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
            n = sum(p.numel() for p in g["params"])
            print(f"optimizer group {g['name']:<20} tensors={len(g['params']):<5} params={n:>12,} "
                  f"lr={g['lr']:.2e} weight_decay={g['weight_decay']}")
    return out


class VLMTrainer(Trainer):
    def __init__(self, *args, bundle_config: BundleConfig, projector_learning_rate: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.bundle_config = bundle_config
        self.projector_learning_rate = projector_learning_rate

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
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            save_bundle(self.model, output_dir, self.bundle_config)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        check_compatible(resume_from_checkpoint, self.bundle_config, model)
        load_trainable(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: restore the best checkpoint's adapter AND projector (the stock method
        would reload the adapter only, leaving the last projector beside the best adapter)."""
        best = self.state.best_model_checkpoint
        if best is None or not Path(best).is_dir():
            raise FileNotFoundError(f"load_best_model_at_end: best checkpoint not found: {best}")
        self._load_from_checkpoint(best)

