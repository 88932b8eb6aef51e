"""Fold the LoRA into the base weights and export a standalone folder that loads without peft.

    python -m model.export --checkpoint outputs/demo --output exported/

The output holds the QWen weights in the official Qwen-7B layout (the base model's config.json,
generation_config.json, tokenizer files, sharded safetensors with the official tensor names), so any
Qwen-7B loader reads them, plus `projector.safetensors`, `vlm_config.json` (merged: true) and, unless
`--no-copy-vision`, a copy of the CLIP folder in `vision/`. `model.load_vlm(output)` rebuilds the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from common.fileio import staged_folder
from qwen.checkpoint import INDEX_FILE, SINGLE_FILE, save_sharded_safetensors

from .bundle import PROJECTOR_FILE, load_vlm

BASE_FILES = ("config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json")
VISION_FILES = ("config.json", "preprocessor_config.json", SINGLE_FILE, INDEX_FILE)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype of the first floating tensor of a safetensors checkpoint (read from the header)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return torch.float32
    with safe_open(str(files[0]), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open objects are not iterable)
            dtype = f.get_slice(key).get_dtype()
            return {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    return torch.float32


def export_merged(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    copy_vision: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty (pass --overwrite to replace it)")
    # Merge in fp32, whatever the base dtype, so the fold-in adds no rounding of its own.
    model, config = load_vlm(checkpoint, dtype=torch.float32, merge_lora=True)
    llm_path, vision_path = (Path(p) for p in config.resolve(checkpoint))
    dtype = dtype or checkpoint_dtype(llm_path)

    with staged_folder(output) as staging:
        for name in BASE_FILES:
            if (llm_path / name).is_file():
                shutil.copy2(llm_path / name, staging / name)
        llm_state = {
            k: v.to(dtype)
            for k, v in model.state_dict().items()
            if not k.startswith(("projector.", "vision_tower."))
        }
        save_sharded_safetensors(llm_state, staging, max_shard_bytes=max_shard_bytes)
        shutil.copy2(checkpoint / PROJECTOR_FILE, staging / PROJECTOR_FILE)
        if copy_vision:
            (staging / "vision").mkdir()
            for name in VISION_FILES:
                if (vision_path / name).is_file():
                    shutil.copy2(vision_path / name, staging / "vision" / name)
            for shard in sorted(vision_path.glob("model-*-of-*.safetensors")):
                shutil.copy2(shard, staging / "vision" / shard.name)
        merged = dataclasses.replace(
            config, llm_path=".", vision_path="vision" if copy_vision else str(vision_path), merged=True, adapter=False
        )
        merged.save(staging)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint bundle folder")
    parser.add_argument("--output", required=True, help="the folder to write (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the base model's)")
    parser.add_argument("--no-copy-vision", dest="copy_vision", action="store_false",
                        help="reference the CLIP folder instead of copying it into <output>/vision")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard, in GiB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        out = export_merged(
            args.checkpoint,
            args.output,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            copy_vision=args.copy_vision,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported merged model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
