"""The tiny project that the distributed tests train, and launching train.sh as each machine would.

Every run of the package trains the same thing: global batch 4, 3 AdamW steps (weight decay on), a checkpoint at
step 2, a start projector (so that loading one is checked too), no evaluation. Runs differ only in how the batch
is spread: machines, processes per machine, engine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.projects import write_test_project

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
GLOBAL_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_train_sh(config: Path, *flags: str, env: dict[str, str]) -> subprocess.Popen:
    """`bash train.sh FLAGS` with CONFIG=config and `env` (NPROC, NNODES, ...), started, not awaited."""
    environment = {**ENV, "CONFIG": str(config), "PYTHON": sys.executable, **env}
    return subprocess.Popen(["bash", "train.sh", *flags], cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(*processes: subprocess.Popen, timeout: int = 300) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each, once all have ended."""
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        results.append((process.returncode, out, err))
    return results


def train_sh(config: Path, *flags: str, env: dict[str, str]) -> tuple[int, str, str]:
    return finish(start_train_sh(config, *flags, env=env))[0]


def per_device(processes: int) -> list[str]:
    """The flags of a run on `processes` processes in all: the same global batch, no evaluation."""
    return ["--per_device_train_batch_size", str(GLOBAL_BATCH // processes), "--eval_file", ""]


def bundle_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The LoRA and projector tensors of a bundle or checkpoint."""
    projector = {f"projector.{k}": v for k, v in load_file(str(folder / "projector.safetensors")).items()}
    return {**load_file(str(folder / "adapter_model.safetensors")), **projector}


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = bundle_weights(a), bundle_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].shape == wb[key].shape, (key, wa[key].shape, wb[key].shape)
        torch.testing.assert_close(wb[key], wa[key], atol=atol, rtol=0, msg=key)


def log_history(run: Path) -> list[tuple[int, float, float]]:
    """(step, loss, gradient norm) of every training step of a run."""
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    return [(e["step"], e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]


@pytest.fixture(scope="package")
def dist_project(tmp_path_factory, tiny_llm_dir, tiny_clip_dir, tiny_bundle_dir):
    """Tiny models, a processed synthetic data set and its config (the training settings above)."""
    root = tmp_path_factory.mktemp("dist_project")
    training = {
        "output_dir": str(root / "out"), "seed": 3, "max_steps": 3, "save_steps": 2, "logging_steps": 1,
        "learning_rate": 5.0e-3, "projector_learning_rate": 1.0e-2, "weight_decay": 0.1, "warmup_steps": 0,
        "lr_scheduler_type": "linear", "train_sampling_strategy": "random", "report_to": "none",
        "disable_tqdm": True, "eval_strategy": "no",
    }
    return write_test_project(root, tiny_llm_dir, tiny_clip_dir, model={"projector_path": str(tiny_bundle_dir)},
                              training=training)


@pytest.fixture(scope="package")
def ddp_run(dist_project, tmp_path_factory) -> Path:
    """The reference: one machine, two processes (DDP), the output folder of the run."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    code, _, err = train_sh(dist_project / "config.yaml", *per_device(2), "--output_dir", str(out),
                            env={"NPROC": "2", "MASTER_PORT": str(free_port())})
    assert code == 0, err[-3000:]
    return out
