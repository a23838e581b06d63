"""Training objectives. Each takes the trainable module (cts and d2f also the runtime model: see the
names in `trainer`), a collated batch and the objective's random generator, and returns the loss (plus
per-pass losses for logging).

- `sft`: LLaDA's masked-diffusion SFT loss (spec 6.1's training note), the paper's FT-baseline and our
  pretraining objective for the bundled model.
- `cts`: continuous trajectory supervision (spec 2.3), in `evotok_cli.training.cts`.
- `d2f`: D2F's asymmetric distillation (spec 6.4), in `evotok_cli.training.d2f`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evotok_cli.training.data import Example


@dataclass
class Batch:
    ids: torch.Tensor  # (B, N) ground truth, EOS-padded on the right
    prompt_lengths: torch.Tensor  # (B,)

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, N) bool: everything after the prompt, EOS padding included (it is trained, as in LLaDA)."""
        cols = torch.arange(self.ids.shape[1], device=self.ids.device)
        return cols[None, :] >= self.prompt_lengths[:, None]

    def to(self, device: torch.device) -> Batch:
        return Batch(self.ids.to(device), self.prompt_lengths.to(device))


def collate(examples: list[Example], *, pad_id: int, response_length: int | None = None,
            extra_pad: tuple[float, int] | None = None, rng: random.Random | None = None) -> Batch:
    """Right-pad with EOS to the longest sample (or to prompt + `response_length` each).

    extra_pad=(p, k): with probability p append 1..k more pad tokens to the whole batch (the CTS recipe).
    """
    seqs = []
    for ex in examples:
        seq = ex.prompt_ids + ex.response_ids
        if response_length is not None:
            seq = seq + [pad_id] * max(0, len(ex.prompt_ids) + response_length - len(seq))
        seqs.append(seq)
    length = max(len(s) for s in seqs)
    if extra_pad is not None and rng is not None and rng.random() < extra_pad[0]:
        length += rng.randint(1, extra_pad[1])
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    return Batch(ids, torch.tensor([len(ex.prompt_ids) for ex in examples], dtype=torch.long))


def sft_loss(trainable: torch.nn.Module, batch: Batch, *, mask_id: int, generator: torch.Generator,
             eps: float = 1e-3, rows: slice = slice(None)) -> tuple[torch.Tensor, list[float]]:
    """t ~ U(0, 1) per sequence, p = (1 - eps) t + eps; each response token masked with probability p;
    cross-entropy on masked tokens weighted by 1/p, normalised per sequence by its answer length
    (EOS padding included), averaged over the batch. The prompt is never masked.

    Data parallel: the noise is drawn for the whole (global) batch and this process computes `rows`;
    its loss is its share of the global mean, so summing the processes' gradients is exact."""
    ids = batch.ids
    B, N = ids.shape
    device = ids.device
    t = torch.rand(B, generator=generator, device=device)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(B, N)[rows]  # (b, N)
    response = batch.response_mask[rows]
    masked = (torch.rand((B, N), generator=generator, device=device)[rows] < p_mask) & response
    local = ids[rows]
    logits = trainable(local.masked_fill(masked, mask_id))  # (b, N, V)
    token_loss = F.cross_entropy(logits[masked].float(), local[masked], reduction="none") / p_mask[masked]
    answer_length = response.sum(dim=1, keepdim=True).expand_as(masked)[masked].float()
    loss = (token_loss / answer_length).sum() / B
    return loss, [float(loss.detach())]
