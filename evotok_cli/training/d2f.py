"""D2F's asymmetric distillation (spec 6.4), so the d2f decoder has a model made for it.

The response is cut into blocks; block b is masked with a ratio that rises across blocks within
`mask_range`. The teacher is the same weights without the adapter and with full bidirectional attention;
the student is the adapter with the block-causal mask the d2f decoder uses. The loss is the soft
cross-entropy of the student against the teacher's distribution on masked positions (reported as the KL
divergence, which has the same gradient), divided by the block's mask ratio and normalised by the response
length, averaged over the batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from evotok_cli.training.objectives import Batch

if TYPE_CHECKING:
    from evotok_cli.runtime.model import DiffusionModel


@dataclass
class D2FSettings:
    block_size: int = 16
    mask_range: tuple[float, float] = (0.2, 0.7)


def block_causal(prompt_lengths: list[int], length: int, block: int, device) -> torch.Tensor:
    """(B, 1, N, N) bool: the prompt is block 0; response block j sees the prompt and blocks <= j."""
    masks = []
    cols = torch.arange(length, device=device)
    for p in prompt_lengths:
        block_of = torch.where(cols < p, torch.zeros_like(cols), (cols - p) // block + 1)
        masks.append(block_of[None, :] <= block_of[:, None])
    return torch.stack(masks)[:, None]


def mask_by_block(batch: Batch, settings: D2FSettings, mask_id: int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy ids, the masked positions and each position's mask ratio (rising across blocks)."""
    ids = batch.ids
    B, N = ids.shape
    lo, hi = settings.mask_range
    ratio = torch.zeros(B, N, device=ids.device)
    for b, p in enumerate(batch.prompt_lengths.tolist()):
        blocks = max(1, -(-(N - p) // settings.block_size))
        draws = torch.rand(blocks, generator=generator, device=ids.device).sort().values
        per_block = lo + (hi - lo) * draws  # sorted: later blocks are noisier
        ratio[b, p:] = per_block.repeat_interleave(settings.block_size)[: N - p]
    masked = (torch.rand((B, N), generator=generator, device=ids.device) < ratio) & batch.response_mask
    return ids.masked_fill(masked, mask_id), masked, ratio


def d2f_step(trainable: torch.nn.Module, model: DiffusionModel, batch: Batch, settings: D2FSettings, *,
             generator: torch.Generator, scale: float = 1.0, rows: slice = slice(None)
             ) -> tuple[torch.Tensor, list[float]]:
    """One distillation step on `rows` of the (global) batch; the loss is this process's share. Both
    forwards call the transformer directly; the teacher's runs with the adapter switched off through
    `trainable` (peft's wrapper, which holds the switch)."""
    transformer = model.net
    noisy, masked, ratio = mask_by_block(batch, settings, model.mask_id, generator)
    global_batch = noisy.shape[0]
    noisy, masked, ratio = noisy[rows], masked[rows], ratio[rows]
    response = batch.response_mask[rows]
    disable = getattr(trainable, "disable_adapter", None)
    teacher_ctx = disable() if disable is not None else nullcontext()
    with torch.no_grad(), teacher_ctx:
        teacher = torch.log_softmax(transformer(noisy)[masked].float(), dim=-1)
    attention = block_causal(batch.prompt_lengths[rows].tolist(), noisy.shape[1], settings.block_size, noisy.device)
    student = torch.log_softmax(transformer(noisy, attention_mask=attention)[masked].float(), dim=-1)
    # KL(teacher || student): the soft cross-entropy minus the teacher's entropy (same gradient, but 0
    # means "distilled", which makes the logged loss readable)
    per_token = (teacher.exp() * (teacher - student)).sum(-1) / ratio[masked]
    answer_length = response.sum(1, keepdim=True).expand_as(masked)[masked].float()
    loss = (per_token / answer_length).sum() / global_batch
    (loss * scale).backward()
    return loss.detach(), [float(loss.detach())]
