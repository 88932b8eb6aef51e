"""train.sh on several machines, two of them simulated on this host: two train.sh launches in parallel (NNODES=2, one
process each, gloo), as each machine would run it.

- They train exactly as one machine with two processes (two ranks, whichever machines they are on: the same sums),
  and as one process with the same global batch within fp32 rounding: one process adds the gradients of its 4
  samples in another order than two processes that add 2 each and then all-reduce. Measured 4e-7 after 3 steps on
  weights up to 0.6; the tolerance, 1e-5, is 25 times that and 500 times below what one step moves a weight here
  (the learning rates are 5e-3 and 1e-2, and Adam's first step moves every weight by the learning rate).
- A checkpoint written by two machines resumes on one machine with two processes, exactly.
- With per-machine output folders, resuming where one machine lacks the checkpoint stops both, with its message.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.distributed.conftest import (
    assert_same_weights,
    bundle_weights,
    finish,
    free_port,
    log_history,
    per_device,
    start_train_sh,
    train_sh,
)
from tests.e2e.test_train_sh_stages import DEMO, SINGLE, run_train_sh

LAUNCH_VARIABLES = ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "RDZV_ID")


def two_machines_env(**rendezvous: str) -> list[dict[str, str]]:
    """The environment of each of two machines of one process each (default rendezvous: node 0 at 127.0.0.1)."""
    common = {"NNODES": "2", "NPROC": "1",
              **(rendezvous or {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})}
    return [{**common, "NODE_RANK": str(rank)} for rank in (0, 1)]


@pytest.fixture(scope="module")
def runs(dist_project, tmp_path_factory) -> dict[str, Path]:
    """The same training on two machines (one process each, one shared output folder) and on one process."""
    config = dist_project / "config.yaml"
    root = tmp_path_factory.mktemp("layouts")
    folders = {"two_machines": root / "two_machines", "one_process": root / "one_process"}
    launches = [start_train_sh(config, *per_device(2), "--output_dir", str(folders["two_machines"]), env=env)
                for env in two_machines_env()]
    launches.append(start_train_sh(config, *per_device(1), "--output_dir", str(folders["one_process"]),
                                   env={"NPROC": "1"}))
    for code, _, err in finish(*launches):
        assert code == 0, err[-3000:]
    return folders


def test_two_machines_train_as_one_machine_and_as_one_process(runs, ddp_run):
    two, one = runs["two_machines"], runs["one_process"]
    for folder in ("checkpoint-2", "."):
        assert_same_weights(ddp_run / folder, two / folder, atol=0)
        assert_same_weights(one / folder, two / folder, atol=1e-5)
    assert log_history(two) == log_history(ddp_run)
    for (step, loss, norm), (step_one, loss_one, norm_one) in zip(log_history(two), log_history(one), strict=True):
        assert step == step_one
        assert loss == pytest.approx(loss_one, rel=1e-5) and norm == pytest.approx(norm_one, rel=1e-4)
    # both machines wrote into the shared checkpoint: process 0 the bundle and the Trainer's state, process 1 its RNG
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "vlm_config.json", "checkpoint_complete.json"} <= {
        p.name for p in (two / "checkpoint-2").iterdir()}
    name = "projector.linear_1.weight"
    moved = bundle_weights(two)[name] - bundle_weights(two / "checkpoint-2")[name]
    assert moved.abs().max() > 1e-3  # the last step trained: the comparisons above are not vacuous


def test_a_checkpoint_of_two_machines_resumes_on_one_machine(dist_project, runs, tmp_path):
    two = runs["two_machines"]
    code, out, err = train_sh(dist_project / "config.yaml", *per_device(2), "--output_dir", str(tmp_path / "resumed"),
                              "--resume_from_checkpoint", str(two / "checkpoint-2"),
                              env={"NPROC": "2", "MASTER_PORT": str(free_port())})
    assert code == 0, err[-3000:]
    assert f"Resuming from {two / 'checkpoint-2'} at step 2" in out
    assert_same_weights(two, tmp_path / "resumed", atol=0)
    assert log_history(tmp_path / "resumed") == log_history(two)


def test_a_machine_without_the_checkpoint_stops_every_machine(dist_project, runs, tmp_path):
    """Per-machine output folders: the machine of process 0 holds the checkpoints (here a copy of the two-machine
    run's folder), another only its processes' RNG states. Resuming there stops both machines before anything is
    loaded or written, each with the reason (not one machine stopping while the other waits at its first collective).
    The machines meet at a c10d rendezvous, which numbers the processes itself."""
    writer, other = tmp_path / "machine0", tmp_path / "machine1"
    shutil.copytree(runs["two_machines"], writer)
    for step in (2, 3):
        (other / f"checkpoint-{step}").mkdir(parents=True)
        shutil.copy(writer / f"checkpoint-{step}" / "rng_state_1.pth", other / f"checkpoint-{step}")
    before = sorted((p.relative_to(tmp_path).as_posix(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))

    envs = two_machines_env(RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID="per-machine-resume")
    results = finish(*[start_train_sh(dist_project / "config.yaml", *per_device(2), "--output_dir", str(folder),
                                      "--resume_from_checkpoint", "latest", env=env)
                       for folder, env in zip((writer, other), envs, strict=True)])
    errors = [[line for line in err.splitlines() if line.startswith("train.py: error:")] for _, _, err in results]
    assert all(code != 0 for code, _, _ in results)
    assert all(len(lines) == 1 and f"no complete checkpoint in {other}" in lines[0] for lines in errors), errors
    # the process that found its checkpoint names the one that did not
    assert sum(lines[0].startswith("train.py: error: process ") for lines in errors) == 1, errors
    assert sorted((p.relative_to(tmp_path).as_posix(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------- the launch commands


@pytest.fixture
def clean_launch_env(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("clean_launch_env")
@pytest.mark.parametrize("env,launch", [
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"},
     "-m torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 1 --master_addr node0 --master_port 29400"),
    ({"NNODES": "2", "NPROC": "8", "RDZV_ENDPOINT": "node0:29400", "RDZV_ID": "job7"},
     "-m torch.distributed.run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29400 "
     "--rdzv_id job7"),
    ({"NPROC": "4"}, "-m torch.distributed.run --nproc_per_node 4 --master_port 29500"),
    ({}, ""),
])
def test_train_sh_launches_torchrun_for_several_processes_or_machines(tmp_path, env, launch):
    code, calls, _ = run_train_sh(tmp_path, SINGLE, "--seed", "1", env=env)
    assert code == 0 and calls == [f"{launch} train.py --config C --seed 1".strip()]


@pytest.mark.usefixtures("clean_launch_env")
def test_the_demo_is_prepared_and_evaluated_on_node_0_only(tmp_path):
    env = {"NNODES": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    code, calls, _ = run_train_sh(tmp_path, DEMO, env={**env, "NODE_RANK": "1"})
    launch = ("-m torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 1 "
              "--master_addr node0 --master_port 29400")
    assert code == 0 and calls == [f"{launch} train.py --config C --stage align --overwrite_output_dir",
                                   f"{launch} train.py --config C --overwrite_output_dir"]
    code, calls, _ = run_train_sh(tmp_path, DEMO, env={**env, "NODE_RANK": "0"})
    assert code == 0 and calls[:2] == ["-m demo.prepare --config C", "process_image.py --config C"]
    assert calls[-1] == "-m demo.evaluate --config C" and len(calls) == 5


@pytest.mark.usefixtures("clean_launch_env")
@pytest.mark.parametrize("env,message", [
    ({"NNODES": "2"}, "NNODES=2 needs NODE_RANK (this machine's number, 0 to 1) and MASTER_ADDR (the address of "
                      "node 0), or RDZV_ENDPOINT=host:port"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "node0"}, "NODE_RANK must be a number from 0 to 1 (NNODES=2), "
                                                                "got '2'"),
    ({"NNODES": "two"}, "NNODES must be a positive number of machines, got 'two'"),
])
def test_train_sh_refuses_an_unusable_machine_setting(tmp_path, env, message):
    code, calls, err = run_train_sh(tmp_path, SINGLE, env=env)
    assert code == 2 and calls == [] and f"train.sh: {message}" in err

