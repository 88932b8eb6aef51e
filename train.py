"""Train the VLM: LoRA on the LLM + the projector, the vision tower frozen, with the Hugging Face Trainer.

    python train.py --config config.yaml [--any_training_argument value ...]
    python train.py --config C --stage align   (the projector alone, from the config's align section; then
    python train.py --config C                  LoRA + projector, starting from the align run's projector)
    torchrun --nproc_per_node 4 train.py --config configs/qwen7b_coco.yaml     (what train.sh runs)

Every checkpoint (`<output_dir>/checkpoint-N`) and the final `<output_dir>` are complete bundles that
`infer.py --checkpoint` loads; `--resume_from_checkpoint <dir>` (or `latest`: the newest complete checkpoint,
passing over one whose save was interrupted) continues a run exactly. A non-empty output_dir is refused unless
the run resumes or `--overwrite_output_dir` replaces the previous run (see training/checkpoints.py).

Exit status 2, with one line, for anything wrong found before training: a config or flag error, a missing
model, data file or every image, an output_dir that is a file or holds another run, an incomplete checkpoint, a
resume that asks for a learning rate (or another setting) that the checkpoint restores (training/checkpoints.py).

With `model.quantization: nf4` (or `--quantization nf4`) the LLM's linear weights are held in 4-bit NF4 (QLoRA,
llm/quantization.py; needs bitsandbytes): the rest trains as without it, and every bundle records it.

With `data.feature_cache` set (or `--feature_cache DIR`; `--feature_cache ""` ignores the config's), batches
carry the vision features precomputed by `process_image.py --cache-features` instead of pixels, and the tower
never runs; the cache must have been computed with this model's tower, layer and preprocessing and hold every
image of the training and validation files, which is checked before anything is loaded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import set_seed

from common.paths import is_within
from dataprocess.features import FeatureCache, cache_identity, images_of_jsonl
from dataset import DataCollator, NoUsableSampleError, SupervisedDataset
from llm import load_tokenizer
from llm.quantization import NONE, check_quantization, require_bitsandbytes
from model import apply_lora, build_vlm, vlm_config_for
from model.bundle import check_compatible
from settings import ConfigError
from settings.training import TrainSetup, parse_train_args
from training.checkpoints import check_output_dir, check_resume_settings, clear_previous_run, resolve_resume
from training.distributed import on_every_process, shards_parameters, start_deepspeed
from training.stages import (
    check_projector_folder,
    load_start_projector,
    prepare_align,
    resolve_sources,
    sample_filter,
)
from training.trainer import VLMTrainer, unsupported_options
from visual import load_image_preprocessor


def check_inputs(setup: TrainSetup) -> None:
    """Everything that can be wrong with the inputs, found before any output is written."""
    if check_quantization(setup.model.quantization) != NONE:
        require_bitsandbytes()
    for label, path in (("model.llm_path", setup.model.llm_path), ("model.vision_path", setup.model.vision_path)):
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"{label}: folder not found: {path}")
    start = setup.model.projector_path
    if setup.args.stage == "instruct" and start and not setup.args.resume_from_checkpoint:
        if is_within(start, setup.args.output_dir):
            raise ValueError(f"model.projector_path {start} is in output_dir {setup.args.output_dir}: an output is "
                             "never one of the inputs (give each stage its own folder)")
        check_projector_folder(start)
    data = setup.data
    if not data.train_file or not Path(data.train_file).is_file():
        raise FileNotFoundError(
            f"processed training data not found: {data.train_file} (run `python process_image.py --config ...` first)"
        )
    if data.eval_file and not Path(data.eval_file).is_file():
        raise FileNotFoundError(f"validation data not found: {data.eval_file} (written by process_image.py)")
    if not data.feature_cache:  # (the cache's own check covers its images)
        for path in filter(None, (data.train_file, data.eval_file)):
            check_images_exist(path, verbose=setup.args.should_log)


def check_images_exist(jsonl: str, verbose: bool = True) -> None:
    """Refuse a data file none of whose images exists (moved since process_image.py?); name how many are missing
    when only some are (their samples are skipped)."""
    images = images_of_jsonl([jsonl])
    missing = [p for p in images if not os.path.isfile(p)]
    if images and len(missing) == len(images):
        raise FileNotFoundError(f"none of the {len(images)} images of {jsonl} exists (first: {missing[0]}); were "
                                "they moved after process_image.py? Rerun it with the images in place")
    if missing and verbose:
        print(f"train.py: {len(missing)} of the {len(images)} images of {jsonl} are missing (first: {missing[0]}): "
              "their samples are skipped", file=sys.stderr)


def open_feature_cache(setup: TrainSetup) -> FeatureCache | None:
    """The feature cache of `data.feature_cache` (None if unset), checked to have been computed by this model's
    tower, layer and preprocessing and to hold every image of the training and validation files."""
    data = setup.data
    if not data.feature_cache:
        return None
    cache = FeatureCache(data.feature_cache)
    cache.check_identity(cache_identity(setup.model.vision_path, setup.model.vision_feature_layer))
    files = [f for f in (data.train_file, data.eval_file) if f]
    missing = cache.missing(images_of_jsonl(files))
    if missing:
        raise FileNotFoundError(
            f"feature cache {data.feature_cache} lacks {len(missing)} images of {', '.join(files)} (first: "
            f"{missing[0]}); complete it: `python process_image.py --config <config> --cache-features`"
        )
    return cache


def build_datasets(setup: TrainSetup, tokenizer, num_image_tokens: int, feature_cache) -> dict[str, SupervisedDataset]:
    """The training dataset and, when the validation file has usable samples, the evaluation one; only the samples
    of `sources` (and, in the align stage, only samples with an image)."""
    # With the feature cache, items carry `patch_features` instead of `pixel_values`: the tower never runs.
    processor = load_image_preprocessor(setup.model.vision_path) if feature_cache is None else None
    sources = resolve_sources(setup.data.sources, setup.config.data) if setup.data.sources else None
    keep = sample_filter(sources, need_images=setup.args.stage == "align")

    def make(path):
        return SupervisedDataset(
            path, tokenizer, processor, num_image_tokens=num_image_tokens, system=setup.model.system_prompt,
            max_length=setup.data.max_length, seed=setup.args.seed, feature_loader=feature_cache, keep=keep,
        )

    datasets = {"train": make(setup.data.train_file)}
    if keep is not None and setup.args.should_log:
        print(f"{setup.args.stage} stage: {len(datasets['train'])} training samples of "
              f"{'sources ' + ', '.join(sources) if sources else 'every source'}"
              f"{' with an image' if setup.args.stage == 'align' else ''} "
              f"({datasets['train'].num_filtered} others left out)")
    if setup.data.eval_file:
        try:
            datasets["eval"] = make(setup.data.eval_file)
        except NoUsableSampleError as e:  # e.g. val_size: 0 in the data section: train without evaluation
            print(f"train.py: no evaluation: {e}", file=sys.stderr)
            setup.args.eval_strategy = "no"
    return datasets


def trainable_fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_ranks_agree(model) -> None:
    """After a multi-process run, every rank must hold the same trainable weights."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = trainable_fingerprint(model)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        print(f"trainable weights fingerprint per rank: {everyone} (equal: {len(set(everyone)) == 1})")
    if len(set(everyone)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {everyone}")


def check_start(setup: TrainSetup) -> tuple[str | None, list[str], FeatureCache | None]:
    """The inputs, the output folder and the checkpoint to resume from checked, and the feature cache opened, before
    anything is loaded or written: (checkpoint to resume or None, notes to print, feature cache or None)."""
    args = setup.args
    check_inputs(setup)
    check_output_dir(args.output_dir, resume=args.resume_from_checkpoint, overwrite=args.overwrite_output_dir)
    resume, notes = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    return resume, notes, open_feature_cache(setup)  # FeatureCacheError is a ValueError


def resumed_checkpoint(start: tuple) -> str:
    """What every process must agree on after `check_start`: the checkpoint it resumes, by name (per-machine output
    folders may have different paths), and so its step."""
    return f"resumes from {Path(start[0]).name}" if start[0] else "starts a new run"


def build(setup: TrainSetup, resume: str | None, feature_cache):
    """The model to train (instruct: with LoRA; align: the projector alone trainable), the tokenizer, the datasets
    and the bundle config; ValueError/FileNotFoundError."""
    args = setup.args
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    tokenizer = load_tokenizer(setup.model.llm_path)
    model = build_vlm(setup.model.llm_path, setup.model.vision_path,
                      vision_feature_layer=setup.model.vision_feature_layer, dtype=dtype, tokenizer=tokenizer,
                      quantization=setup.model.quantization)
    datasets = build_datasets(setup, tokenizer, model.vision_tower.num_patches, feature_cache)
    bundle_config = vlm_config_for(model, setup.model.llm_path, setup.model.vision_path, setup.model.system_prompt)
    start = setup.model.projector_path
    if args.stage == "align":
        if start and args.should_log:
            print(f"train.py: model.projector_path ({start}) starts the instruct stage: the align stage trains a "
                  "fresh projector")
        trained = prepare_align(model, verbose=args.should_log)
    else:
        if start and resume:
            if args.should_log:
                print(f"train.py: model.projector_path ({start}) not loaded: resuming restores the checkpoint's "
                      "projector")
        elif start:
            load_start_projector(model, start, bundle_config, verbose=args.should_log)
        lora = setup.lora
        trained = apply_lora(model, r=lora.lora_r, alpha=lora.lora_alpha, dropout=lora.lora_dropout,
                             target_modules=lora.lora_target_modules, train_embeddings=lora.train_embeddings,
                             verbose=args.should_log)
    if resume:
        check_compatible(resume, bundle_config, trained)
    return trained, tokenizer, datasets, bundle_config


def prepare_output_dir(args, resume: str | None) -> None:
    """With --overwrite_output_dir (and no resume), delete the previous run's files before anything is written:
    the main process does it while the others wait."""
    if resume or not args.overwrite_output_dir:
        return
    with args.main_process_first(desc="clearing output_dir", local=False):
        if args.should_save:
            deleted, kept = clear_previous_run(args.output_dir)
            if deleted:
                print(f"--overwrite_output_dir: replacing the previous run in {args.output_dir} (deleted: "
                      f"{', '.join(deleted)})" + (f"; left in place: {', '.join(kept)}" if kept else ""))


def main(argv: list[str] | None = None) -> int:
    try:
        setup = parse_train_args(argv)
        args = setup.args
        if problems := unsupported_options(args):
            raise ConfigError("; ".join(problems))
        # on every process (every machine's own files): passing everywhere, resuming the same checkpoint, or stopping
        resume, notes, feature_cache = on_every_process(check_start, setup, world_size=args.world_size,
                                                        agree=resumed_checkpoint)
        start_deepspeed(args)
        set_seed(args.seed)
        model, tokenizer, datasets, bundle_config = build(setup, resume, feature_cache)
        # (after build's check that the checkpoint is this model's; on every process, as the start-up checks)
        on_every_process(check_resume_settings, resume, args, world_size=args.world_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2

    if args.should_log:
        for note in notes:
            print(f"train.py: {note}")
        if resume and args.overwrite_output_dir:
            print("train.py: --overwrite_output_dir ignored: resuming continues the run in output_dir")
    if feature_cache is not None and args.should_log:
        print(f"image features from the cache {setup.data.feature_cache} ({len(feature_cache)} images, "
              f"{feature_cache.manifest['dtype']}): the vision tower is not run")
    prepare_output_dir(args, resume)
    trainer = VLMTrainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("eval"),
        data_collator=DataCollator(pad_token_id=tokenizer.pad_token_id),
        bundle_config=bundle_config,
        projector_learning_rate=args.projector_learning_rate,
    )
    if args.eval_generation_samples and "eval" in datasets:  # generation metrics beside the eval loss
        from evaluation.callback import GenerationEvalCallback

        trainer.add_callback(GenerationEvalCallback(trainer, setup.data.eval_file, args.eval_generation_samples,
                                                    tokenizer, bundle_config))
    if resume and args.should_log:
        step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
        print(f"Resuming from {resume} at step {step}")
    try:
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()  # the final bundle, in output_dir itself
        if "eval" in datasets:
            metrics = trainer.evaluate()
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)
    except NoUsableSampleError:  # every image failed during the run (in a DataLoader worker, maybe: its traceback text)
        print("train.py: error: no sample could be loaded any more: every image failed (see the warnings above)",
              file=sys.stderr)
        return 2
    if not shards_parameters(trainer):  # (ZeRO-3 and FSDP hold shards: no replicas to compare)
        check_ranks_agree(model)
    skipped = trainer.skipped_samples()
    if skipped and args.should_log:
        print(f"samples skipped for unreadable images (all processes, all epochs): {skipped}")
    shut_down_distributed(trainer)
    return 0


def shut_down_distributed(trainer) -> None:
    """Tear the process group down in an order that cannot deadlock. The DDP wrapper's reducer holds the group; if
    it is the last holder, the group's destructor joins gloo's worker threads while holding the GIL, and a worker
    still freeing the tensors of the last collective waits for the GIL: a rank hangs at exit (1 run in 5 on
    CPU). So the wrapper is freed first, while the group is still registered, and destroy_process_group then
    frees the group with the GIL released."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # every rank done with the group before any tears it down
    trainer.accelerator.free_memory()
    trainer.model_wrapped = trainer.model
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
