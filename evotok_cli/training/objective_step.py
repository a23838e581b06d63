"""The configured objective as one step function, for the trainer: `objectives` (sft), `cts` and `d2f`
each compute a loss; this picks one and binds its settings and random generator."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from evotok_cli.training.objectives import Batch, sft_loss

if TYPE_CHECKING:
    from evotok_cli.runtime.model import DiffusionModel


def step_function(cfg: Any, trainable: torch.nn.Module, model: DiffusionModel, *, rows: slice, scale: float,
                  noise: torch.Generator, rng: random.Random) -> Callable[[Batch], tuple[torch.Tensor, list[float]]]:
    """`cfg.objective` as one function batch -> (loss, per-pass losses), each pass already backpropagated
    with its loss times `scale`. Every process draws the noise of the global batch; each computes `rows`."""
    if cfg.objective == "sft":
        def run(batch: Batch) -> tuple[torch.Tensor, list[float]]:
            loss, parts = sft_loss(trainable, batch, mask_id=model.mask_id, generator=noise, rows=rows)
            (loss * scale).backward()
            return loss.detach(), parts
        return run
    if cfg.objective == "cts":
        from evotok_cli.training.cts import CTSSettings, cts_step
        cts = CTSSettings(trajectory_steps=cfg.trajectory_steps, decode_counts=list(cfg.decode_counts),
                          block_sizes=list(cfg.block_sizes), alpha_range=tuple(cfg.alpha_range), k_soft=cfg.k_soft)
        return lambda batch: cts_step(trainable, model, batch, cts, rng=rng, scale=scale, rows=rows)
    from evotok_cli.training.d2f import D2FSettings, d2f_step
    d2f = D2FSettings(block_size=cfg.d2f_block_size, mask_range=tuple(cfg.d2f_mask_range))
    return lambda batch: d2f_step(trainable, model, batch, d2f, generator=noise, scale=scale, rows=rows)
