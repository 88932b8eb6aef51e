"""The training project the end-to-end tests share: a small synthetic raw set, processed, and a config that trains a
tiny LoRA on it. Each test module says what differs (its models, training values, sizes); the rest is here once."""

from __future__ import annotations

from pathlib import Path

import yaml

TEST_LORA = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
MAX_LENGTH = 256  # tokens per sample: the 56 px images' placeholders and the longest synthetic conversation fit
IMAGE_SIZE = 56


def write_test_config(root: Path, llm_dir, vision_dir, *, training: dict, model: dict | None = None,
                      data: dict | None = None, align: dict | None = None) -> Path:
    """root/config.yaml: the tiny models (plus `model`'s keys), `data` when given (a whole data section), the test
    LoRA, `training`, and `align` when given. Returns its path."""
    config = {"model": {"llm_path": str(llm_dir), "vision_path": str(vision_dir), **(model or {})}}
    if data is not None:
        config["data"] = data
    config.update(lora=dict(TEST_LORA), training=training)
    if align is not None:
        config["align"] = align
    path = Path(root) / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def write_test_project(root: Path, llm_dir, vision_dir, *, training: dict, n_train: int = 24, n_aic: int = 8,
                       n_heldout: int = 2, seed: int = 1, val_size: int = 2, cache_features: bool = False,
                       model: dict | None = None, align: dict | None = None) -> Path:
    """In `root`: the demo's synthetic raw data (root/raw: LLaVA conversations on n_train images, AI Challenger
    captions on n_aic others, n_heldout held-out images, 56 px), processed by process_image.py (in this process)
    into root/data/train.jsonl and its validation split of val_size samples, with CLIP / SigLIP features in
    root/data/features if `cache_features`; and root/config.yaml (`write_test_config`) that trains on it.
    Returns root."""
    import process_image
    from demo.synthetic import demo_data_section, write_demo_raw_data

    root = Path(root)
    paths = write_demo_raw_data(root / "raw", n_train=n_train, n_aic=n_aic, n_heldout=n_heldout,
                                image_size=IMAGE_SIZE, seed=seed)
    data = {**demo_data_section(paths, str(root / "data" / "train.jsonl"), val_size=val_size), "max_length": MAX_LENGTH}
    if cache_features:
        data["feature_cache"] = str(root / "data" / "features")
    config = write_test_config(root, llm_dir, vision_dir, training=training, model=model, data=data, align=align)
    assert process_image.main(["--config", str(config), *(["--cache-features"] if cache_features else [])]) == 0
    return root
