"""model.export's output: never a folder it reads from, --overwrite replaces only a previous export whose every
file is on its list (never deletes anything else), and the exported config names no code file it does not ship."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from common.owned_folder import MANIFEST_FILE
from model import apply_lora, build_vlm, save_bundle, vlm_config_for
from model.export import main as export_main
from model.export import portable_config
from qwen.tiny import write_tiny_qwen_checkpoint
from visual import write_tiny_clip_checkpoint

AUTO_MAP = {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}


@pytest.fixture(scope="module")
def base(tmp_path_factory, byte_vocab_file) -> Path:
    """A tiny QWen whose config.json and tokenizer_config.json carry the official `auto_map`, as the real
    Qwen-7B-Chat's do, without the code files they name."""
    folder = write_tiny_qwen_checkpoint(tmp_path_factory.mktemp("base") / "qwen", hidden_size=32,
                                        intermediate_size=64, vocab_file=byte_vocab_file)
    for name, auto_map in (("config.json", AUTO_MAP), ("tokenizer_config.json", TOKENIZER_AUTO_MAP)):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, "auto_map": auto_map}, indent=2))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, base, tiny_clip_dir) -> Path:
    """outputs/run with the final bundle in it and a checkpoint-2 folder, as train.py leaves them."""
    model = build_vlm(base, tiny_clip_dir)
    peft_model = apply_lora(model, r=4, alpha=8, verbose=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    run = tmp_path_factory.mktemp("outputs") / "run"
    config = vlm_config_for(model, base, tiny_clip_dir, "x")
    save_bundle(peft_model, run, config)
    save_bundle(peft_model, run / "checkpoint-2", config)
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def beside(out: Path) -> list[str]:
    """What an export to `out` keeps beside it while it runs (lock, staging and old folders)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def export(*args) -> int:
    return export_main([*map(str, args)])


def test_the_output_is_never_a_folder_being_read(run_dir, base, tmp_path, capsys):
    before, base_before = snapshot(run_dir), snapshot(base)
    (tmp_path / "afile").write_text("x")
    cases = [
        (run_dir, "is or contains the checkpoint being read"),
        (run_dir.parent, "is or contains the checkpoint being read"),
        (run_dir / "exported", "is inside the checkpoint being read"),
        (base, "is or contains the base LLM folder"),
        (tmp_path / "afile", "is a file; name a folder"),
    ]
    for output, message in cases:
        assert export("--checkpoint", run_dir, "--output", output, "--overwrite") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("export: error: ") and message in err, err
    # relative spelling and a link to the run folder are the same folder
    (tmp_path / "link").symlink_to(run_dir)
    assert export("--checkpoint", tmp_path / "link" / "checkpoint-2", "--output", run_dir, "--overwrite") == 2
    assert "is or contains the checkpoint" in capsys.readouterr().err
    assert snapshot(run_dir) == before and snapshot(base) == base_before
    assert (tmp_path / "afile").read_text() == "x"


def test_overwrite_replaces_only_a_previous_export(run_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert export("--checkpoint", run_dir, "--output", mine) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert export("--checkpoint", run_dir, "--output", mine, "--overwrite") == 2
    assert "is not a previous output of model.export" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"

    out = tmp_path / "exported"
    assert export("--checkpoint", run_dir / "checkpoint-2", "--output", out, "--no-copy-vision", "--dtype", "fp16") == 0
    assert export("--checkpoint", run_dir, "--output", tmp_path / "reference", "--no-copy-vision") == 0
    assert snapshot(out) != snapshot(tmp_path / "reference")
    assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision", "--overwrite") == 0
    assert snapshot(out) == snapshot(tmp_path / "reference")
    assert beside(out) == []  # no staging, old or lock file left
    # an export without the list of its files (written before the list existed) is not replaced
    (out / MANIFEST_FILE).unlink()
    before = snapshot(out)
    capsys.readouterr()
    assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision", "--overwrite") == 2
    assert f"no {MANIFEST_FILE}" in capsys.readouterr().err and snapshot(out) == before


def test_overwrite_never_deletes_what_the_export_did_not_write(run_dir, tmp_path, capsys):
    """evaluate.py's results in the export folder (its default output for an export) and a user's notes: named,
    and nothing changes; once they are moved out, --overwrite replaces the export."""
    out = tmp_path / "exported"
    assert export("--checkpoint", run_dir / "checkpoint-2", "--output", out, "--no-copy-vision") == 0
    first = snapshot(out)
    (out / "eval-val").mkdir()
    (out / "eval-val" / "metrics.json").write_text('{"accuracy": 0.9}')
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    capsys.readouterr()
    assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision", "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not write: eval-val/, notes.txt; nothing was changed" in err, err
    assert snapshot(out) == before and beside(out) == []
    shutil.rmtree(out / "eval-val")
    (out / "notes.txt").unlink()
    assert snapshot(out) == first
    assert export("--checkpoint", run_dir, "--output", out, "--overwrite") == 0
    assert (out / "vision").is_dir() and beside(out) == []


def test_the_exported_config_names_only_code_it_ships(run_dir, base, tmp_path):
    out = tmp_path / "exported"
    assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision") == 0
    config = json.loads((out / "config.json").read_text())
    expected = json.loads((base / "config.json").read_text())
    assert "auto_map" not in config and config == {k: v for k, v in expected.items() if k != "auto_map"}
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not list(out.glob("*.py"))

    # with the official code files in the base folder, the entries are kept and the files shipped
    with_code = tmp_path / "with-code"
    shutil.copytree(base, with_code)
    for name in ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py", "qwen_generation_utils.py"):
        (with_code / name).write_text(f"# {name}\n")
    staging = tmp_path / "staging"
    staging.mkdir()
    portable_config(with_code / "config.json", staging)
    portable_config(with_code / "tokenizer_config.json", staging)
    assert json.loads((staging / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert json.loads((staging / "tokenizer_config.json").read_text())["auto_map"] == TOKENIZER_AUTO_MAP
    assert sorted(p.name for p in staging.glob("*.py")) == [
        "configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py", "tokenization_qwen.py"]


def test_every_written_file_is_readable_by_others(tmp_path, byte_vocab_file):
    """safetensors' save_file makes owner-only files (0600) whatever the umask. Under the usual umask 022, every
    file of the tiny QWen and CLIP checkpoints, of a bundle and of both export formats is readable by others."""
    def private(folder: Path) -> list[str]:
        return [str(p.relative_to(tmp_path)) for p in sorted(folder.rglob("*"))
                if p.is_file() and p.stat().st_mode & 0o044 != 0o044]

    old_umask = os.umask(0o022)
    try:
        qwen = write_tiny_qwen_checkpoint(tmp_path / "qwen", hidden_size=32, intermediate_size=64,
                                          vocab_file=byte_vocab_file, num_shards=2)
        clip = write_tiny_clip_checkpoint(tmp_path / "clip", image_size=28, hidden_size=32, intermediate_size=64)
        model = build_vlm(qwen, clip)
        bundle = tmp_path / "bundle"
        save_bundle(apply_lora(model, r=2, alpha=4, verbose=False), bundle, vlm_config_for(model, qwen, clip, "x"))
        assert export("--checkpoint", bundle, "--output", tmp_path / "qwen-format") == 0
        assert export("--checkpoint", bundle, "--output", tmp_path / "llava-format", "--format", "llava") == 0
    finally:
        os.umask(old_umask)
    written_by = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*.safetensors")}
    assert written_by == {"qwen", "clip", "bundle", "qwen-format", "llava-format"}
    assert private(tmp_path) == []
