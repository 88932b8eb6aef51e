"""`on_every_process`: the start-up checks of two real processes (a gloo group) pass together or stop together."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from training.distributed import ProcessFailedError, on_every_process

# per case: what each process's check does (return a value, or raise), and `agree` on the result
CASES = {
    "all_pass": ({0: "ok-0", 1: "ok-1"}, None),
    "one_fails": ({0: "ok-0", 1: FileNotFoundError("no data on this machine")}, None),
    "both_fail": ({0: ValueError("bad config"), 1: FileNotFoundError("no data on this machine")}, None),
    "disagree": ({0: "checkpoint-3", 1: "checkpoint-2"}, str),
    "agree": ({0: "checkpoint-3", 1: "checkpoint-3"}, str),
}


def check(outcome):
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def process(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    seen = {}
    for name, (outcomes, agree) in CASES.items():
        try:
            seen[name] = ["returned", on_every_process(check, outcomes[rank], world_size=2, agree=agree)]
        except (FileNotFoundError, ValueError) as e:
            seen[name] = [type(e).__name__, str(e)]
    Path(out_dir, f"{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_start_up_checks_pass_or_stop_on_every_process(tmp_path):
    mp.spawn(process, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    host = socket.gethostname()
    assert [s["all_pass"] for s in seen] == [["returned", "ok-0"], ["returned", "ok-1"]]
    assert seen[1]["one_fails"] == ["FileNotFoundError", "no data on this machine"]
    assert seen[0]["one_fails"] == [ProcessFailedError.__name__,
                                    f"process 1 (of 2, on {host}) stopped: no data on this machine"]
    assert [s["both_fail"] for s in seen] == [["ValueError", "bad config"],
                                              ["FileNotFoundError", "no data on this machine"]]
    expected = [ProcessFailedError.__name__, f"the processes disagree: process 0 (on {host}): checkpoint-3; "
                                             f"process 1 (on {host}): checkpoint-2"]
    assert [s["disagree"] for s in seen] == [expected, expected]
    assert [s["agree"] for s in seen] == [["returned", "checkpoint-3"], ["returned", "checkpoint-3"]]


def test_one_process_needs_no_group():
    assert on_every_process(check, "ok", world_size=1) == "ok"
