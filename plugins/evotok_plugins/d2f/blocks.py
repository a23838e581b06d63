"""d2f's step 5 (the EvoToken rule over the active blocks) as one grouped engine `Update`.

A row's active blocks are consecutive and equally long, so they stack as rows of their own: logits
(n_blocks, block_size, V), tokens and confidences (n_blocks, block_size). Every block commits, revises and
rebuilds its soft inputs from its own columns only (D2F's commit rule is per block), so the engine can
stack the blocks of every d2f row with the same options and block size and run the rule ONE time per
step for all of them: host work per step then grows with the groups, not with the rows. A row decoded
alone makes the same call on its own blocks (`Update.run`), which is why its tokens are those of the
grouped call."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch

from evotok_cli.decoding.engine import Update
from evotok_cli.decoding.evolution import Commit, evolve


@dataclass(frozen=True)
class BlockStep:
    """What the pass did to a row's active blocks, over their columns [a, hi) as one (1, hi - a) row."""

    tokens: torch.Tensor
    committed: torch.Tensor
    revised: torch.Tensor


def d2f_blocks(logits: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor, *soft: torch.Tensor,
               mask_id: int, config: Any, temperature: float, full: list[bool],
               generators: list[Any]) -> tuple[torch.Tensor, ...]:
    """One pass of the rule over blocks of any number of rows (pure): each block's tokens, confidences,
    committed and revised masks after the pass, and with `soft` (ids, weights) its next soft inputs.

    Candidates from model-dtype probabilities; [MASK] positions over skip_threshold commit (strict, float32),
    the single best one where the block is fully activated (`full`, one per block); in soft mode decoded
    positions are revised. A complete block is [Decode]: it neither commits nor revises. `generators` (one
    per block, a row's blocks sharing its own) draw each block's Gumbel noise in order, which on the CPU is
    the stream one draw over the row's blocks together would take. Of `config` only skip_threshold, soft,
    k_soft and alpha are read: `D2FDecoder.group_key` names them."""
    live = (tokens == mask_id).any(dim=1, keepdim=True)  # (n, 1): blocks holding a [MASK] before the pass
    step = evolve(logits, tokens, confidence, mask_id=mask_id, candidates="d2f", temperature=temperature,
                  generator=generators,
                  commit=Commit(threshold=config.skip_threshold, strict=True, at_least_one=full,
                                group=tokens.shape[1]),
                  live=live, revise=config.soft, k=config.k_soft if config.soft else None, alpha=config.alpha)
    results = (step.tokens, step.confidence, step.committed, step.revised)
    if soft:
        results += (step.soft_ids, step.soft_weights.to(soft[1].dtype))
    return results


def decode_blocks(model: Any, config: Any, key: Any, run: Any, active: list, logits: torch.Tensor,
                  conf: torch.Tensor, soft_ids: torch.Tensor, soft_w: torch.Tensor, temperature: float,
                  generator: Any) -> Generator[Update, tuple[torch.Tensor, ...], BlockStep]:
    """Step 5 for one row as a grouped `Update` (`yield from`): the engine writes the blocks' tokens,
    confidences and (soft mode) soft inputs back into the row's canvas and state; returns the pass's
    tokens, committed and revised masks over the active columns. `key`: what the group must share besides
    shapes (the model, the options, the sampling: `D2FDecoder.group_key`)."""
    a, hi, n, size = active[0].start, active[-1].end, len(active), run.size
    window = [run.x[0, a:hi].view(n, size), conf[0, a:hi].view(n, size)]
    into = {0: 1, 1: 2}
    if config.soft:
        window += [soft_ids[0, a:hi].view(n, size, -1), soft_w[0, a:hi].view(n, size, -1)]
        into.update({4: 3, 5: 4})
    tokens, _, committed, revised, *_ = yield Update(
        d2f_blocks, key, (logits[: hi - a].reshape(n, size, -1), *window),
        rows={"full": [b.full for b in active], "generators": [generator] * n},
        shared={"mask_id": model.mask_id, "config": config, "temperature": temperature}, into=into)
    return BlockStep(tokens.reshape(1, -1), committed.reshape(1, -1), revised.reshape(1, -1))
