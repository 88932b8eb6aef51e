"""Training on several processes and machines, whatever the engine (DDP, DeepSpeed ZeRO, FSDP): what train.py and
the Trainer need beyond the stock ones.

- `on_every_process(check, ...)`: the start-up checks pass on every process or stop every one. One machine whose
  own disk lacks a file (data, a checkpoint to resume) would otherwise stop alone, while the others wait at their
  first collective until its timeout (30 minutes by default).
- `start_deepspeed`: DeepSpeed's communication set up before the model loads, as ZeRO-3 partitions the weights
  while they load.
- `full_trainable_weights`: the trained tensors (LoRA, projector) whole, as fp32, where the engine holds them in
  shards or as low-precision copies (DeepSpeed); every process takes part, one writes.
- `shards_parameters`: whether each process holds only a shard of the weights (ZeRO-3, FSDP).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import nullcontext
from typing import TypeVar

import torch
import torch.distributed as dist

from model.bundle import unwrap

T = TypeVar("T")


class ProcessFailedError(ValueError):
    """Another process's start-up check failed; the message names it and says why."""


def on_every_process(check: Callable[..., T], *args, world_size: int, agree: Callable[[T], object] | None = None) -> T:
    """`check(*args)` on this process, then a verdict that every process shares (a collective: every process calls
    it once, at the same point, before the model loads): its result when it passed everywhere and `agree(result)`
    is the same on every process; else this process's own error or, where this one passed, a `ProcessFailedError`
    naming the first process that failed (rank and host) with its message, or what each process found where they
    disagree. Errors are those train.py reports as bad input: FileNotFoundError and ValueError."""
    try:
        result, error = check(*args), None
    except (FileNotFoundError, ValueError) as e:
        result, error = None, e
    if world_size > 1:
        mine = (socket.gethostname(), None if error is None else str(error),
                None if error is not None or agree is None else agree(result))
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, mine)
        failed = [(rank, host, message) for rank, (host, message, _) in enumerate(everyone) if message is not None]
        if error is None and failed:
            rank, host, message = failed[0]
            raise ProcessFailedError(f"process {rank} (of {world_size}, on {host}) stopped: {message}")
        if not failed and len({key for _, _, key in everyone}) > 1:
            raise ProcessFailedError("the processes disagree: " + "; ".join(
                f"process {rank} (on {host}): {key}" for rank, (host, _, key) in enumerate(everyone)))
    if error is not None:
        raise error
    return result


def start_deepspeed(args) -> None:
    """Set up DeepSpeed's own communication over the running process group before the model is built. ZeRO-3 loads
    the weights partitioned (transformers' `deepspeed.zero.Init`), which asks DeepSpeed for the world size;
    accelerate sets DeepSpeed up first on GPUs, but with `use_cpu` it leaves that to the engine's start, after the
    model is built, and ZeRO-3's load took the world for one process (its batch check failed: `4 != 2 * 1 * 1`)."""
    if not args.deepspeed or not (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def shards_parameters(trainer) -> bool:
    """Whether each process holds a shard of the weights rather than a replica (DeepSpeed ZeRO-3, FSDP)."""
    if trainer.is_fsdp_enabled:
        return True
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return plugin is not None and plugin.zero_stage == 3


def full_trainable_weights(model, state_dict: dict | None, deepspeed: bool) -> dict[str, torch.Tensor] | None:
    """The trained parameters of `model` (the VisionLanguageModel, or a wrapper), whole and fp32 on the CPU, named
    as in the VisionLanguageModel's `state_dict()` (what `save_bundle` takes; a parameter that two modules share, as
    the trained copy of tied embeddings, under both names); None where the model's own parameters are already that
    (plain or DDP training). Under DeepSpeed each is gathered from the optimizer's fp32 master copy (ZeRO-1/2 keep
    low-precision module copies, ZeRO-3 keeps shards): a collective, which every process must call. Under FSDP,
    `state_dict` is the full one the Trainer gathered."""
    if deepspeed:
        from deepspeed.utils import safe_get_full_fp32_param

        weights, whole = {}, {}
        for name, p in unwrap(model).named_parameters(remove_duplicate=False):  # a tied copy under each of its names
            if p.requires_grad:
                if id(p) not in whole:
                    full = safe_get_full_fp32_param(p)
                    if full is None:
                        raise RuntimeError(f"DeepSpeed holds no fp32 master copy of the trained parameter {name}")
                    whole[id(p)] = full.detach().float().cpu()
                weights[name] = whole[id(p)]
        return weights
    return state_dict


def gathered(parameters) -> object:
    """A context in which DeepSpeed ZeRO-3's shards of `parameters` are whole on every process and what process 0
    writes into them is partitioned again on exit (loading weights into a model built under ZeRO-3); a no-op for
    parameters that are not sharded."""
    parameters = [p for p in parameters if hasattr(p, "ds_id")]
    if not parameters:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=0)
