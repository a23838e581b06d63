"""What bf16 does to a LoRA adapter: measure it (`delta_stats`), and avoid it (`LoRALinear`).

A merge adds s * B @ A to W element by element, and W sits on the grid of its dtype: in bf16 (8
significant bits) an entry of the delta below half a grid step of its weight (0.2-0.4 % of it) is rounded
away, so an adapter whose deltas are ~0.1 % of the weights loses most of itself when merged on a GPU.
`runtime/lora.py` reads adapters and applies them with these.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DeltaStats:
    """How big an adapter's deltas are next to the weights, and what merging them into `dtype` keeps."""

    relative: float  # median over modules of ||dW|| / ||W|| (Frobenius)
    lost: float  # share of the non-zero dW entries that a merge rounds away entirely
    error: float  # ||what the merge adds - dW|| / ||dW||: the share of the delta a merge gets wrong
    dtype: str  # the dtype the merge is estimated in

    def as_dict(self) -> dict[str, Any]:
        return {"relative_median": self.relative, "lost_if_merged": self.lost, "merge_error": self.error,
                "dtype": self.dtype}


def delta_summary(stats: dict[str, Any]) -> str:
    """`DeltaStats.as_dict()` in words, for `evotok info`."""
    return (f"||dW||/||W|| {stats['relative_median']:.3g} (median); merged in {stats['dtype']}, "
            f"{stats['lost_if_merged']:.0%} of the delta entries round away ({stats['merge_error']:.0%} of its norm)")


@dataclass
class LoRAPair:
    """One adapted linear layer: its fp32 A (r, in) and B (out, r), and the scale of their product."""

    name: str
    module: nn.Linear
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def delta(self, device: torch.device | None = None) -> torch.Tensor:
        """scaling * B @ A, (out, in) in fp32 on `device` (default: the layer's)."""
        device = self.module.weight.device if device is None else device
        return (self.b.to(device) @ self.a.to(device)) * self.scaling


@functools.cache
def _fp32_out(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.mm(..., out_dtype=torch.float32)` takes `dtype` inputs on `device` (torch >= 2.8 on
    CUDA): an fp32 output of a bf16 matmul, before it is rounded. Tried once per device and dtype."""
    if device.type != "cuda" or "dtype" not in torch.ops.aten.mm.overloads():
        return False
    try:
        one = torch.ones(1, 1, device=device, dtype=dtype)
        return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


class LoRALinear(nn.Linear):
    """A linear layer with its adapter beside it: y = round(W x + s B A x), rounded once.

    Merged into bf16, a delta entry below half a grid step of its weight vanishes (W sits on the grid).
    Adding s B A x to a bf16 output has the same flaw one level up (the output also sits on the grid, and
    the delta is as small next to it), and so has PEFT's bf16 forward. Here W x is taken with fp32
    accumulation and kept in fp32 (CUDA: a bf16 matmul with an fp32 output; elsewhere an fp32 matmul),
    the branch s B A x is added in fp32, and the sum is rounded to bf16 once: the output is the adapted
    layer's exact output to bf16 precision, and the delta survives on average instead of being rounded
    away. fp32 weights (the CPU) need none of this: one addmm. A and s * B are fp32 buffers (rank r: a
    few MB), not parameters and not in the state dict, so the model keeps its parameter names and count.
    """

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor):
        nn.Module.__init__(self)  # not nn.Linear's: the base layer's weight is taken over, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.register_buffer("lora_A", a.float(), persistent=False)  # (r, in)
        self.register_buffer("lora_B", b.float(), persistent=False)  # (out, r), scale folded in
        self.fp32_out = _fp32_out(base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if x.dtype == torch.float32:
            y = torch.addmm(F.linear(x2, self.weight, self.bias), F.linear(x2, self.lora_A), self.lora_B.t())
            return y.view(*x.shape[:-1], -1)
        if self.fp32_out:
            y = torch.mm(x2, self.weight.t(), out_dtype=torch.float32)  # (N, out), not rounded
        else:  # an fp32 copy of W per call: slower, the same numbers
            y = F.linear(x2.float(), self.weight.float())
        if self.bias is not None:
            y = y + self.bias.float()
        y = torch.addmm(y, F.linear(x2.float(), self.lora_A), self.lora_B.t())  # + s B A x, in fp32
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def delta_stats(pairs: list[LoRAPair], weight_of: Callable[[LoRAPair], torch.Tensor],
                dtype: torch.dtype) -> DeltaStats:
    """Measure each delta against its weight (`weight_of(pair)`, any dtype) as if merged in `dtype`."""
    relative, lost, nonzero, err2, norm2 = [], 0, 0, 0.0, 0.0
    with torch.no_grad():
        for p in pairs:
            w = weight_of(p)
            delta = p.delta(w.device)
            relative.append(float(delta.norm() / w.float().norm().clamp(min=1e-30)))
            grid = w.to(dtype)  # the weight as a merge in `dtype` starts from it
            added = (grid.float() + delta).to(dtype).float() - grid.float()  # what the merge really adds
            moved = delta != 0
            lost += int(((added == 0) & moved).sum())
            nonzero += int(moved.sum())
            err2 += float((added - delta).pow(2).sum())
            norm2 += float(delta.pow(2).sum())
    return DeltaStats(relative=statistics.median(relative) if relative else 0.0, lost=lost / max(nonzero, 1),
                      error=math.sqrt(err2 / norm2) if norm2 else 0.0, dtype=str(dtype).removeprefix("torch."))
