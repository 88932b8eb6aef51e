"""Complete and incomplete checkpoints, what `latest` resumes from, and what may happen to a non-empty output_dir."""

from __future__ import annotations

import json

import pytest

from training.checkpoints import (
    COMPLETE_FILE,
    CheckpointError,
    OutputDirError,
    check_output_dir,
    clear_previous_run,
    incomplete_reason,
    resolve_resume,
    seal_checkpoint,
)


def fake_checkpoint(root, step, seal=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "vlm_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (folder / "optimizer.pt").write_bytes(b"o" * 1000)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if seal:
        seal_checkpoint(folder, step)
    return folder


def test_latest_passes_over_interrupted_and_truncated_saves(tmp_path):
    fake_checkpoint(tmp_path, 3)
    truncated = fake_checkpoint(tmp_path, 6)
    (truncated / "optimizer.pt").write_bytes(b"o" * 200)  # cut short after it was sealed
    interrupted = fake_checkpoint(tmp_path, 9, seal=False)  # killed before the record was written
    (interrupted / "trainer_state.json").unlink()
    assert incomplete_reason(tmp_path / "checkpoint-3") is None
    assert incomplete_reason(truncated) == "optimizer.pt has 200 bytes, 1000 when it was saved"
    assert incomplete_reason(interrupted) == f"no {COMPLETE_FILE}: its save was interrupted"
    folder, notes = resolve_resume("latest", tmp_path)
    assert folder == str(tmp_path / "checkpoint-3")
    assert notes == [f"checkpoint-9 is incomplete (no {COMPLETE_FILE}: its save was interrupted): skipped",
                     "checkpoint-6 is incomplete (optimizer.pt has 200 bytes, 1000 when it was saved): skipped",
                     "resuming from checkpoint-3, the newest complete checkpoint"]
    with pytest.raises(CheckpointError, match="cannot resume from .*checkpoint-9: not a complete checkpoint"):
        resolve_resume(str(interrupted), tmp_path)


def test_a_missing_file_or_no_complete_checkpoint(tmp_path):
    folder = fake_checkpoint(tmp_path, 2)
    (folder / "adapter_model.safetensors").unlink()
    assert incomplete_reason(folder) == "adapter_model.safetensors is missing"
    with pytest.raises(CheckpointError, match="no complete checkpoint in"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint-N folder"):
        resolve_resume("latest", tmp_path / "elsewhere")


def test_a_non_empty_output_dir_needs_resume_or_consent(tmp_path):
    (tmp_path / "out").mkdir()
    check_output_dir(tmp_path / "out", resume=None, overwrite=False)  # empty: fine
    check_output_dir(tmp_path / "new", resume=None, overwrite=False)  # absent: fine
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"out is not empty \(notes.txt\): pass --resume_from_checkpoint latest"):
        check_output_dir(tmp_path / "out", resume=None, overwrite=False)
    check_output_dir(tmp_path / "out", resume="latest", overwrite=False)
    check_output_dir(tmp_path / "out", resume=None, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputDirError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file", resume=None, overwrite=True)


def test_clearing_a_previous_run_keeps_what_it_did_not_write(tmp_path):
    fake_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / ".partial-abc").mkdir()
    for name in ("vlm_config.json", "projector.safetensors", "demo_eval.json", "eval_results.json", "all_results.json",
                 "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "my-checkpoint-copy").mkdir()
    deleted, kept = clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == kept == ["my-checkpoint-copy", "notes.txt"]
    assert set(deleted) == {".partial-abc", "all_results.json", "checkpoint-4", "checkpoint-8", "demo_eval.json",
                            "eval_results.json", "projector.safetensors", "runs", "vlm_config.json"}


def test_sealing_flushes_what_no_writer_flushed_and_lists_everything(tmp_path, monkeypatch):
    from training import checkpoints

    folder = tmp_path / "checkpoint-3"
    names = ["vlm_config.json", "projector.safetensors", "adapter_config.json", "adapter_model.safetensors",
             "README.md", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth", "rng_state_0.pth",
             "rng_state_1.pth", "global_step3/mp_rank_00_model_states.pt",
             "global_step3/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "global_step3/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * len(name))
    flushed = []
    monkeypatch.setattr(checkpoints, "fsync_file", lambda path: flushed.append(path.relative_to(folder).as_posix()))
    seal_checkpoint(folder, 3)
    # the bundle (staged_files fsyncs it) and each rank's own files (that rank fsyncs them) are not flushed again
    assert sorted(flushed) == ["README.md", "global_step3/mp_rank_00_model_states.pt", "optimizer.pt",
                               "rng_state.pth", "scheduler.pt", "trainer_state.json"]
    record = json.loads((folder / COMPLETE_FILE).read_text())
    assert record["files"] == {name: len(name) for name in sorted(names)}
    assert sorted(p.name for p in checkpoints.rank_files(folder, 1)) == [
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_1.pth"]
