"""Train the VLM: LoRA on QWen + the projector, CLIP frozen, with the Hugging Face Trainer.

    python train.py --config config.yaml [--any_training_argument value ...]
    torchrun --nproc_per_node 4 train.py --config configs/qwen7b_coco.yaml     (what train.sh runs)

Every checkpoint (`<output_dir>/checkpoint-N`) and the final `<output_dir>` are complete bundles that
`infer.py --checkpoint` loads; `--resume_from_checkpoint <dir>` (or `latest`) continues a run exactly.

With `data.feature_cache` set (or `--feature_cache DIR`; `--feature_cache ""` ignores the config's), batches
carry the CLIP features precomputed by `process_image.py --cache-features` instead of pixels, and the tower
never runs; the cache must have been computed with this model's tower, layer and preprocessing and hold every
image of the training and validation files, which is checked before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from dataprocess.features import FeatureCache, cache_identity, images_of_jsonl
from dataset import DataCollator, NoUsableSampleError, SupervisedDataset
from model import apply_lora, build_vlm, bundle_config_for
from model.bundle import BUNDLE_CONFIG_FILE, check_compatible
from qwen import QWenTokenizer
from settings import ConfigError
from settings.training import TrainSetup, parse_train_args
from training.trainer import VLMTrainer
from visual import CLIPImagePreprocessor


def check_inputs(setup: TrainSetup) -> None:
    """Everything that can be wrong with the inputs, found before any output is written."""
    for label, path in (("model.llm_path", setup.model.llm_path), ("model.vision_path", setup.model.vision_path)):
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"{label}: folder not found: {path}")
    data = setup.data
    if not data.train_file or not Path(data.train_file).is_file():
        raise FileNotFoundError(
            f"processed training data not found: {data.train_file} (run `python process_image.py --config ...` first)"
        )
    if data.eval_file and not Path(data.eval_file).is_file():
        raise FileNotFoundError(f"validation data not found: {data.eval_file} (written by process_image.py)")


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


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from (`latest`: the newest in output_dir), checked to be complete."""
    if not resume:
        return None
    if resume.lower() in ("latest", "true"):
        found = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if found is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-N folder in {output_dir}")
        resume = found
    for name in (BUNDLE_CONFIG_FILE, "trainer_state.json"):
        if not (Path(resume) / name).is_file():
            raise FileNotFoundError(f"cannot resume from {resume}: no {name} (not a complete checkpoint)")
    return resume


def build_datasets(setup: TrainSetup, tokenizer, num_image_tokens: int, feature_cache) -> dict[str, SupervisedDataset]:
    """The training dataset and, when the validation file has usable samples, the evaluation one."""
    # With the feature cache, items carry `patch_features` instead of `pixel_values`: the tower never runs.
    processor = CLIPImagePreprocessor.from_pretrained(setup.model.vision_path) if feature_cache is None else None

    def make(path):
        return SupervisedDataset(
            path, tokenizer, processor, num_image_tokens=num_image_tokens, system=setup.model.system_prompt,
            max_length=setup.data.max_length, seed=setup.args.seed, feature_loader=feature_cache,
        )

    datasets = {"train": make(setup.data.train_file)}
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


def build(setup: TrainSetup, resume: str | None, feature_cache):
    """The model with LoRA, the tokenizer, the datasets and the bundle config; ValueError/FileNotFoundError."""
    args = setup.args
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    model = build_vlm(setup.model.llm_path, setup.model.vision_path,
                      vision_feature_layer=setup.model.vision_feature_layer, dtype=dtype)
    tokenizer = QWenTokenizer.from_pretrained(setup.model.llm_path)
    datasets = build_datasets(setup, tokenizer, model.vision_tower.num_patches, feature_cache)
    lora = setup.lora
    peft_model = apply_lora(model, r=lora.lora_r, alpha=lora.lora_alpha, dropout=lora.lora_dropout,
                            target_modules=lora.lora_target_modules, train_embeddings=lora.train_embeddings,
                            verbose=args.should_log)
    bundle_config = bundle_config_for(model, setup.model.llm_path, setup.model.vision_path, setup.model.system_prompt)
    if resume:
        check_compatible(resume, bundle_config, peft_model)
    return peft_model, tokenizer, datasets, bundle_config


def main(argv: list[str] | None = None) -> int:
    try:
        setup = parse_train_args(argv)
        check_inputs(setup)
        resume = resolve_resume(setup.args.resume_from_checkpoint, setup.args.output_dir)
        feature_cache = open_feature_cache(setup)  # FeatureCacheError is a ValueError
        set_seed(setup.args.seed)
        peft_model, tokenizer, datasets, bundle_config = build(setup, resume, feature_cache)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2

    args = setup.args
    if feature_cache is not None and args.should_log:
        print(f"image features from the cache {setup.data.feature_cache} ({len(feature_cache)} images, "
              f"{feature_cache.manifest['dtype']}): the vision tower is not run")
    trainer = VLMTrainer(
        model=peft_model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("eval"),
        data_collator=DataCollator(pad_token_id=tokenizer.pad_token_id),
        bundle_config=bundle_config,
        projector_learning_rate=args.projector_learning_rate,
    )
    if resume and args.should_log:
        step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
        print(f"Resuming from {resume} at step {step}")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # the final bundle, in output_dir itself
    if "eval" in datasets:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    check_ranks_agree(peft_model)
    skipped = sum(getattr(d, "skipped", 0) for d in datasets.values())
    if skipped and args.should_log:
        print(f"samples skipped for unreadable images (this process): {skipped}")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
