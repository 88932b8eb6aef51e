"""Fold the LoRA into the base weights and export a standalone folder that loads without peft.

    python -m model.export --checkpoint outputs/demo --output exported/

The output holds the QWen weights in the official Qwen-7B layout (the base model's config.json,
generation_config.json, tokenizer files, sharded safetensors with the official tensor names), so any
Qwen-7B loader reads them, plus `projector.safetensors`, `vlm_config.json` (merged: true) and, unless
`--no-copy-vision`, a copy of the CLIP folder in `vision/`. `model.load_vlm(output)` rebuilds the model.
The base config's `auto_map` entries (the official repository's remote code) are kept only for the code
files the base folder has, which are then copied too: an export never names a file it does not ship.

The folder is written aside and renamed into place whole, with a marker file saying that this command made
it and, written last, the list of the files it wrote (common/owned_folder.py). `--overwrite` replaces only a
previous export whose every file is on its list: anything else in it (evaluate.py's results, a user's notes)
is named and nothing is changed. One export at a time per output folder; a killed one's leftovers are cleaned,
and a replacement it left half done is finished or rolled back, by the next export to that folder. An output
that is a file, or that is, contains or lies inside the checkpoint or a base model folder being read, is
refused before any work. A failed write (disk full, read-only folder) is one message; the output is as it was.

`--format llava` writes a transformers-native folder instead, for any pair of backbones (LlavaForConditionalGeneration
with a Qwen2 or Qwen3 text model and a CLIP or SigLIP tower, tokenizer.json, processor files, chat template, model
card; model/export_llava.py lists them), under the same rules for the output folder. `--format qwen` is the default,
for a QWen v1 language model only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from common.owned_folder import FolderBusyError, owned_folder
from common.paths import is_within
from llm.quantization import NONE
from qwen.checkpoint import INDEX_FILE, SINGLE_FILE, save_sharded_safetensors

from .config import VLMConfig

# .bundle (peft) and .export_llava (transformers' models) load where an export runs: seconds that --help and the
# argument checks do without.

BASE_FILES = ("config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json")
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")  # may name remote code files in `auto_map`
VISION_FILES = ("config.json", "preprocessor_config.json", SINGLE_FILE, INDEX_FILE)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CREATED_BY = "model.export"


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


def check_output(output: Path, inputs: dict[str, Path]) -> None:
    """Before any work: `output` is a folder (or new), and none of the `inputs` (FileExistsError / ValueError
    naming the problem). Whether an existing folder may be replaced is owned_folder's check."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; name a folder")
    for label, folder in inputs.items():
        if is_within(folder, output):
            raise ValueError(f"--output {output} is or contains the {label} being read ({folder}); name another folder")
        if is_within(output, folder):
            raise ValueError(f"--output {output} is inside the {label} being read ({folder}); name another folder")


def portable_config(source: Path, staging: Path) -> None:
    """Copy a base config (config.json, tokenizer_config.json) keeping only the `auto_map` entries whose code
    file the base folder has; those files are copied too. Without any, `auto_map` is dropped."""
    config = json.loads(source.read_text())
    auto_map = config.pop("auto_map", None)
    kept = {}
    for name, target in (auto_map or {}).items():
        refs = [t for t in (target if isinstance(target, list) else [target]) if t]
        files = [ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs]
        if refs and all((source.parent / f).is_file() for f in files):
            kept[name] = target
            for f in files:
                shutil.copy2(source.parent / f, staging / f)
    if kept:  # the code those entries load imports its neighbours: ship every code file of the base folder
        config["auto_map"] = kept
        for code in sorted(source.parent.glob("*.py")):
            shutil.copy2(code, staging / code.name)
    (staging / source.name).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _base_folders(checkpoint: Path, output: Path) -> tuple[Path, Path]:
    """(base LLM folder, vision tower folder) of `checkpoint`, once `output` is known to be none of the inputs."""
    llm_path, vision_path = (Path(p) for p in VLMConfig.load(checkpoint).resolve(checkpoint))
    check_output(output, {"checkpoint": checkpoint, "base LLM folder": llm_path, "vision tower folder": vision_path})
    return llm_path, vision_path


def _load_merged(checkpoint: Path):
    """The model of `checkpoint` with its LoRA folded in, and its bundle config. Merged in fp32, whatever the base
    dtype, so the fold-in adds no rounding of its own, into the original base weights read from the base folder
    even when the bundle was trained on 4-bit ones (QLoRA), never into their dequantised 4-bit values."""
    from .bundle import load_vlm

    return load_vlm(checkpoint, dtype=torch.float32, merge_lora=True, quantization=NONE)


def _say(message: str) -> None:
    print(f"export: {message}", file=sys.stderr)


def export_merged(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    copy_vision: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """The merged folder of a bundle in the official Qwen-7B layout (module docstring), written whole."""
    from .bundle import PROJECTOR_FILE

    checkpoint, output = Path(checkpoint), Path(output)
    family = VLMConfig.load(checkpoint).text.family
    if family != "qwen":
        raise ValueError(f"--format qwen writes Qwen-7B's official layout, for a QWen v1 language model only; "
                         f"{checkpoint} was trained on a {family} model: use --format llava")
    llm_path, vision_path = _base_folders(checkpoint, output)
    dtype = dtype or checkpoint_dtype(llm_path)
    with owned_folder(output, CREATED_BY, overwrite=overwrite, say=_say) as staging:
        model, config = _load_merged(checkpoint)
        for name in BASE_FILES:
            if not (llm_path / name).is_file():
                continue
            if name in AUTO_MAP_FILES:
                portable_config(llm_path / name, staging)
            else:
                shutil.copy2(llm_path / name, staging / name)
        llm_state = {k: v.to(dtype) for k, v in model.llm.state_dict().items()}
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
            config, text=dataclasses.replace(config.text, path=".", quantization=NONE),
            vision=dataclasses.replace(config.vision, path="vision" if copy_vision else str(vision_path)),
            merged=True, adapter=False,
        )
        merged.save(staging)
    return output


def export_llava(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """The transformers-native LLaVA folder of a bundle (model/export_llava.py), written whole. `dtype` defaults
    to the base language model checkpoint's (bf16 for Qwen-7B-Chat and the published Qwen2.5 / Qwen3)."""
    from .export_llava import write_llava

    checkpoint, output = Path(checkpoint), Path(output)
    llm_path, vision_path = _base_folders(checkpoint, output)
    with owned_folder(output, CREATED_BY, overwrite=overwrite, say=_say) as staging:
        model, config = _load_merged(checkpoint)
        write_llava(staging, model, config, checkpoint=checkpoint, llm_path=llm_path, vision_path=vision_path,
                    dtype=dtype or checkpoint_dtype(llm_path), max_shard_bytes=max_shard_bytes, name=output.name)
    return output


def describe_os_error(e: OSError) -> str:
    """"No space left on device: PATH" rather than "[Errno 28] ..."."""
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return e.strerror or str(e)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint bundle folder")
    parser.add_argument("--output", required=True, help="the folder to write (new, empty, or a previous export "
                        "with --overwrite)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the base model's)")
    parser.add_argument("--no-copy-vision", dest="copy_vision", action="store_false",
                        help="reference the vision tower folder instead of copying it into <output>/vision")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard, in GiB")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous export in --output, only when "
                        "every file in it is one the export wrote (it is listed)")
    parser.add_argument("--format", choices=("qwen", "llava"), default="qwen",
                        help="qwen: the official Qwen-7B layout + projector (default; QWen v1 only); llava: "
                             "transformers-native LlavaForConditionalGeneration, any backbones (vLLM, SGLang, "
                             "lmms-eval)")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    max_shard_bytes = int(args.max_shard_gb * 1024**3)
    try:
        if args.format == "llava":
            if not args.copy_vision:
                raise ValueError("--no-copy-vision applies to --format qwen only (the llava folder holds the tower)")
            out = export_llava(args.checkpoint, args.output, dtype=dtype, max_shard_bytes=max_shard_bytes,
                               overwrite=args.overwrite)
        else:
            out = export_merged(args.checkpoint, args.output, dtype=dtype, copy_vision=args.copy_vision,
                                max_shard_bytes=max_shard_bytes, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, FolderBusyError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, a read-only folder, no permission
        print(f"export: error: {describe_os_error(e)}; nothing was exported, {args.output} is as it was",
              file=sys.stderr)
        return 2
    print(f"exported {'transformers-native LLaVA' if args.format == 'llava' else 'merged'} model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
