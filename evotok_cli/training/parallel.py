"""What a fine-tune does across the processes of torchrun / accelerate launch: FSDP2 sharding, summing
gradients and losses, stopping together, and gathering sharded weights for the export. With one process
each is a no-op (or the identity)."""

from __future__ import annotations

from typing import Any

import torch


def shard(transformer: Any, device: torch.device) -> None:
    """FSDP2: each transformer block is one unit, gathered for its forward and backward. On a GPU the
    gathered weights are bf16 (half the traffic and memory of fp32) while the shards the optimiser
    updates stay fp32, and gradients are reduced in fp32 so that summing over processes loses nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {}
    if device.type == "cuda":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in transformer.shard_units():
        fully_shard(unit, **options)
    fully_shard(transformer, **options)


def sync(group: Any, params: dict[str, torch.nn.Parameter], *, sharded: bool, loss: float, parts: list[float],
         device: torch.device) -> tuple[float, list[float]]:
    """Data parallel: sum the processes' gradients and loss shares (each is its share of the global
    mean, so the sum is exactly what one process with the global batch computes)."""
    if group.world == 1:
        return loss, parts
    import torch.distributed as dist
    if not sharded:  # FSDP has reduce-scattered the gradients already
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
    totals = torch.tensor([loss, *parts], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return float(totals[0]), totals[1:].tolist()


def any_stopped(group: Any, stopped: bool, device: torch.device) -> bool:
    """Whether a signal was seen by any process, so that all of them stop at the same step."""
    if group.world == 1:
        return stopped
    import torch.distributed as dist
    flag = torch.tensor([1 if stopped else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def gathered(group: Any, state: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Sharded tensors gathered one at a time, kept (on the CPU, in `dtype`) by process 0 only: no
    process ever holds more than one full tensor on its GPU (a collective: every process calls it)."""
    out = {}
    for key, value in state.items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if group.is_main:
            out[key] = full.detach().to("cpu", dtype=dtype or full.dtype)
        del full
    return out
