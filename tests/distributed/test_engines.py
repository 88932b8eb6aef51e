"""The engines besides DDP, as `bash train.sh --deepspeed configs/zeroN.json` runs them on CPU (two processes, gloo):
LoRA + projector with the frozen tower, started from a projector, checkpoint at step 2 of 3.

- DeepSpeed ZeRO-2 and ZeRO-3 end with bundles (checkpoints and final) equal to DDP's: the same keys and shapes,
  and the same values: bit for bit with ZeRO-2, within 1e-5 with ZeRO-3, which reduces the gradients in its own
  order (fp32 rounding, which Adam's normalised step amplifies where a gradient is near zero; measured 3e-6 after
  3 steps on weights up to 0.85, while one step of the projector's weight decay alone moves them by up to 1e-3).
  ZeRO-3 shards every weight, the projector and the larger LoRA matrices included; before the bundle writer
  gathered them, its checkpoints held empty tensors there.
- A start projector loads into a projector that ZeRO-3 has already sharded (one built under `deepspeed.zero.Init`;
  train.py builds the projector whole and DeepSpeed shards it at the engine's start, but a model built under
  zero.Init, as the old QWen-based one was by `from_pretrained`, failed: `file (32, 32) vs model (0,)`), for QWen v1
  + CLIP and Qwen2.5 + SigLIP, each LLM loaded partitioned.
- A ZeRO checkpoint resumes (DeepSpeed's own sharded state, on the same number of processes) exactly.
- A ZeRO-3 checkpoint exports (`model.export`) to what the DDP one exports.
- FSDP is refused on CPU, where the Trainer would silently train with DDP instead.

deepspeed is an optional extra (not in requirements-dev.txt): without it, its tests are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.distributed.conftest import ENV, ROOT, assert_same_weights, free_port, per_device, train_sh

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (`DS_BUILD_OPS=0 pip install deepspeed==0.19.8`; its first run on CPU "
           "compiles a shared-memory op, about two minutes)")


def zero_flags(stage: str, out: Path) -> list[str]:
    return [*per_device(2), "--deepspeed", str(ROOT / "configs" / f"{stage}.json"), "--output_dir", str(out)]


TOLERANCE = {"zero2": 0.0, "zero3": 1e-5}  # against DDP (see above)


@pytest.fixture(scope="module", params=sorted(TOLERANCE))
def zero_run(request, dist_project, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param) / "run"
    code, _, err = train_sh(dist_project / "config.yaml", *zero_flags(request.param, out),
                            env={"NPROC": "2", "MASTER_PORT": str(free_port())})
    assert code == 0, err[-3000:]
    return request.param, out


@needs_deepspeed
def test_zero_bundles_are_whole_and_equal_ddp(zero_run, ddp_run):
    stage, out = zero_run
    for folder in ("checkpoint-2", "."):
        assert_same_weights(ddp_run / folder, out / folder, atol=TOLERANCE[stage])
    # beside the bundle, DeepSpeed's own state: one optimizer shard per process, listed in the completion record
    shards = sorted(p.name for p in (out / "checkpoint-2" / "global_step2").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt" in (
        out / "checkpoint-2" / "checkpoint_complete.json").read_text()


@needs_deepspeed
def test_a_zero_checkpoint_resumes_exactly(zero_run, dist_project, tmp_path):
    stage, out = zero_run
    code, stdout, err = train_sh(dist_project / "config.yaml", *zero_flags(stage, tmp_path / "resumed"),
                                 "--resume_from_checkpoint", str(out / "checkpoint-2"),
                                 env={"NPROC": "2", "MASTER_PORT": str(free_port())})
    assert code == 0, err[-3000:]
    assert "at step 2" in stdout
    assert_same_weights(out, tmp_path / "resumed", atol=0)


@needs_deepspeed
def test_a_zero3_checkpoint_exports_like_a_ddp_one(zero_run, ddp_run, tmp_path):
    from model.export import export_merged

    stage, out = zero_run
    if stage != "zero3":
        pytest.skip("the sharded checkpoint is ZeRO-3's")
    exports = {}
    for name, checkpoint in (("ddp", ddp_run / "checkpoint-2"), ("zero3", out / "checkpoint-2")):
        folder = export_merged(str(checkpoint), str(tmp_path / name), copy_vision=False)
        exports[name] = {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert exports["ddp"].keys() == exports["zero3"].keys()
    for key, tensor in exports["ddp"].items():
        torch.testing.assert_close(exports["zero3"][key], tensor, atol=TOLERANCE["zero3"], rtol=0, msg=key)


ZERO3 = {"zero_optimization": {"stage": 3}, "train_batch_size": 2}


def load_into_shards(rank: int, init_file: str, out_dir: str, pairs: dict[str, tuple[str, str, str]]) -> None:
    """One of two processes, for each (LLM, tower, start bundle) of `pairs`: the model loaded under ZeRO-3 (the LLM
    partitioned while it loads, as train.py's is) with its projector built sharded, the start projector loaded,
    then the whole projector gathered on each process, against the file's."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from model import build_vlm, vlm_config_for
    from model.modeling_vlm import Projector
    from training.stages import load_start_projector

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    deepspeed.init_distributed(dist_backend="gloo")
    zero3 = HfDeepSpeedConfig(ZERO3)  # (while it lives, from_pretrained loads under deepspeed.zero.Init)
    seen = {}
    for name, (llm, vision, start) in pairs.items():
        model = build_vlm(llm, vision)
        shape = model.projector.linear_1.in_features, model.projector.linear_1.out_features
        with deepspeed.zero.Init(config_dict_or_path=ZERO3):
            model.projector = Projector(*shape)
        sharded = [tuple(p.shape) for p in model.projector.parameters()]
        load_start_projector(model, start, vlm_config_for(model, llm, vision, "x"), verbose=False)
        with deepspeed.zero.GatheredParameters(list(model.projector.parameters())):
            whole = {k: v.clone() for k, v in model.projector.state_dict().items()}
        expected = load_file(str(Path(start) / "projector.safetensors"))
        seen[name] = {"llm_sharded": hasattr(model.llm.get_input_embeddings().weight, "ds_id"), "sharded": sharded,
                      "equal": whole.keys() == expected.keys() and all(torch.equal(whole[k], expected[k])
                                                                       for k in expected)}
    del zero3
    Path(out_dir, f"{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


@needs_deepspeed
def test_a_start_projector_loads_into_zero3_shards(request, tmp_path):
    """QWen v1 + CLIP and Qwen2.5 + SigLIP (whose strict loader also has to accept a partitioned load)."""
    pairs = {name: tuple(str(request.getfixturevalue(f)) for f in fixtures) for name, fixtures in {
        "qwen1-clip": ("tiny_llm_dir", "tiny_clip_dir", "tiny_bundle_dir"),
        "qwen2-siglip": ("tiny_qwen2_dir", "tiny_siglip_dir", "tiny_qwen2_siglip_bundle_dir")}.items()}
    mp.spawn(load_into_shards, args=(str(tmp_path / "init"), str(tmp_path), pairs), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    for name in pairs:
        assert all(s[name]["llm_sharded"] for s in seen), name
        assert all(s[name]["sharded"] == [[0]] * 4 for s in seen), name  # (outside a gather every shard looks empty)
        assert all(s[name]["equal"] for s in seen), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CPU only (a GPU machine runs FSDP)")
def test_fsdp_is_refused_on_cpu(dist_project, tmp_path):
    code, _, err = train_sh(dist_project / "config.yaml", "--fsdp", "full_shard auto_wrap", "--output_dir",
                            str(tmp_path / "out"), env={"NPROC": "1"})
    assert code == 2
    assert "train.py: error: fsdp: not on CPU: accelerate runs FSDP on GPUs only" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the command runs the engines (minutes)")
def test_the_gpu_check_says_it_needs_a_gpu():
    result = subprocess.run([sys.executable, "-m", "bench.engines"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bench.engines: needs a CUDA GPU (the CPU engines are checked by tests/distributed)" in result.stderr


@needs_deepspeed
def test_deepspeed_without_a_launcher_is_refused(dist_project, tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--config", str(dist_project / "config.yaml"), "--deepspeed",
                             "configs/zero2.json", "--output_dir", str(tmp_path / "out")], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.py: error: deepspeed: start it with torchrun (`bash train.sh --deepspeed ...` does" in result.stderr
    assert not (tmp_path / "out").exists()
