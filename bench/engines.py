"""The training engines on this machine's GPUs, through train.sh as a user runs them: `python -m bench.engines`
(one JSON line per engine). It checks what the CPU tests (tests/distributed: DDP, ZeRO-2, ZeRO-3 in fp32 over gloo)
cannot: bf16 on CUDA over NCCL, FSDP at all (accelerate runs it on GPUs only), and what each engine costs.

A mid-size QWen with random weights (hidden 1024, 8 layers, the real 151,936-row vocabulary, bf16) and a small CLIP,
the demo's synthetic data; LoRA + projector from a start projector. Per engine (ddp, zero2, zero3, fsdp):
`bash train.sh [engine flags]` for --steps steps with a checkpoint at half-way, then the same resumed from that
checkpoint, then `python -m model.export` of it. Each line records:
- ok (every part exited 0, the bundles are whole), and the error's last lines otherwise;
- seconds per step (the Trainer's train_runtime / steps) and peak GPU memory (nvidia-smi, every 0.2 s, the
  largest GPU; it includes the CUDA context);
- max_abs_vs_ddp: the largest difference of the final LoRA + projector from the DDP run's (bf16 compute:
  expected well under 1e-2); max_abs_resumed: from the run resumed at half-way (expected 0, or bf16 rounding);
- exported: model.export of the sharded checkpoint's bundle exited 0.
Record them in docs/BENCHMARKS.md with the GPU count: on one GPU the engines shard nothing (world size 1), so
their memory savings need --nproc 2 or more; one GPU still runs every code path (partitioned loading, gathering
the bundle, the engines' own checkpoints).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from bench.harness import emit, versions

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "ddp": [],
    "zero2": ["--deepspeed", "configs/zero2.json"],
    "zero3": ["--deepspeed", "configs/zero3.json"],
    "fsdp": ["--fsdp", "full_shard auto_wrap", "--fsdp_config", "configs/fsdp.json"],
}


def build_project(work: Path, steps: int) -> Path:
    """Models, processed data, a start projector and the config; returns the config's path."""
    from common.safetensors_file import save_safetensors
    from demo.synthetic import demo_data_section, write_demo_raw_data
    from model.modeling_vlm import Projector
    from qwen.tiny import write_tiny_qwen_checkpoint
    from visual import write_tiny_clip_checkpoint

    llm = write_tiny_qwen_checkpoint(work / "qwen", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                                     intermediate_size=2816, dtype=torch.bfloat16)
    clip = write_tiny_clip_checkpoint(work / "clip", image_size=112, hidden_size=256, intermediate_size=1024,
                                      num_hidden_layers=4, num_attention_heads=4)
    torch.manual_seed(0)
    (work / "start").mkdir()
    save_safetensors(Projector(256, 1024, init_std=0.05).state_dict(), work / "start" / "projector.safetensors")
    paths = write_demo_raw_data(work / "raw", n_train=200, n_aic=50, n_heldout=2, image_size=112, seed=0)
    config = {
        "model": {"llm_path": str(llm), "vision_path": str(clip), "projector_path": str(work / "start")},
        "data": {**demo_data_section(paths, str(work / "data" / "train.jsonl"), val_size=2), "max_length": 512},
        "lora": {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "training": {"output_dir": str(work / "out"), "seed": 0, "max_steps": steps, "save_steps": steps // 2,
                     "logging_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-4,
                     "projector_learning_rate": 1e-3, "weight_decay": 0.1, "warmup_steps": 0,
                     "train_sampling_strategy": "random", "eval_strategy": "no", "report_to": "none",
                     "disable_tqdm": True},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "process_image.py", "--config", str(path)], cwd=ROOT, check=True,
                   capture_output=True)  # (stdout carries only the JSON lines)
    return path


class PeakMemory:
    """The largest memory.used (MiB) of any GPU while the block runs, sampled from nvidia-smi."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=False).stdout
            self.peak = max([self.peak, *(int(x) for x in out.split() if x.isdigit())])
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_sh(config: Path, nproc: int, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONFIG": str(config), "NPROC": str(nproc), "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(["bash", "train.sh", *flags], cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(folder / "adapter_model.safetensors")),
            **{f"projector.{k}": v for k, v in load_file(str(folder / "projector.safetensors")).items()}}


def max_abs(a: Path, b: Path) -> float | None:
    wa, wb = weights(a), weights(b)
    if wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        return None  # a bundle with missing or empty tensors
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def run_engine(name: str, config: Path, work: Path, nproc: int, steps: int) -> dict:
    record = {"bench": "engines", "engine": name, "gpus": nproc, "steps": steps, "ok": False}
    out, resumed = work / name, work / f"{name}-resumed"
    with PeakMemory() as memory:
        trained = train_sh(config, nproc, *ENGINES[name], "--output_dir", str(out))
    record["peak_gpu_memory_mib"] = memory.peak
    if trained.returncode != 0:
        record["error"] = trained.stderr[-2500:]
        return record
    runtime = re.search(r"'train_runtime': '([0-9.]+)'", trained.stdout)  # the Trainer's summary line
    record["seconds_per_step"] = float(runtime.group(1)) / steps if runtime else None
    half = out / f"checkpoint-{steps // 2}"
    again = train_sh(config, nproc, *ENGINES[name], "--output_dir", str(resumed), "--resume_from_checkpoint", str(half))
    if again.returncode != 0:
        record["error"] = "resume: " + again.stderr[-2500:]
        return record
    record["max_abs_resumed"] = max_abs(out, resumed)
    if (work / "ddp").is_dir():
        record["max_abs_vs_ddp"] = max_abs(work / "ddp", out)
    export = subprocess.run([sys.executable, "-m", "model.export", "--checkpoint", str(half), "--output",
                             str(work / f"{name}-export"), "--no-copy-vision"], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    record["exported"] = export.returncode == 0
    if not record["exported"]:
        record["error"] = "export: " + export.stderr[-2500:]
    whole = record["max_abs_resumed"] is not None and record.get("max_abs_vs_ddp", 0.0) is not None
    record["ok"] = record["exported"] and whole
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES),
                        help="engines to run, in order (ddp first: the others are compared with it)")
    parser.add_argument("--nproc", type=int, default=torch.cuda.device_count(), help="processes (GPUs) per run")
    parser.add_argument("--steps", type=int, default=8, help="training steps (a checkpoint at half-way)")
    parser.add_argument("--workdir", help="where to build and train (default: a temporary folder, deleted after)")
    args = parser.parse_args(argv)
    if args.nproc < 1 or not torch.cuda.is_available():
        print("bench.engines: needs a CUDA GPU (the CPU engines are checked by tests/distributed)", file=sys.stderr)
        return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-engines-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        config = build_project(work, args.steps)
        for name in args.engines:
            record = run_engine(name, config, work, args.nproc, args.steps)
            record.update(device=torch.cuda.get_device_name(0), versions=versions())
            emit(record)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
