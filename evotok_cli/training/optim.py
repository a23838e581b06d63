"""AdamW with weight decay on matrices only, and a linear schedule with warmup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup to the peak (reached at the end of step `warmup`), then linear decay to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def build(params: dict[str, torch.nn.Parameter], *, lr: float, weight_decay: float, warmup: int,
          total_steps: int) -> tuple[torch.optim.Optimizer, list[str], Any]:
    """The optimiser, the parameter names in its order, and the scheduler. The order (the decay group
    first) defines the checkpoint's moment names, so it must not change between a run and its resume."""
    decay, no_decay = [], []
    for p in params.values():
        (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), eps=1e-8)
    order = {id(p): n for n, p in params.items()}
    names = [order[id(p)] for g in optimizer.param_groups for p in g["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
    return optimizer, names, scheduler
