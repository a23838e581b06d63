"""The EvoToken rule: what one forward pass does to the token state of every position it predicted.

`evolve` is the one implementation, shared by the evotoken decoder (spec 1.4), CTS training (spec 2.3
step 4) and d2f's soft mode (spec 6.4, our own combination), so that the three cannot drift apart.
It is pure: tensors in, tensors out (no decoder, canvas or model object); the caller writes the results
back into its own state.

The four steps, each mirroring one step of the references:

1. Candidates x0 and their confidences conf0 (spec 1.4 steps 1-2, 1.7, 8), by `candidates`:
   - "evotoken" (`generate_soft_token`): argmax at temperature 0, Gumbel-max above (Q8); never [MASK];
     conf0 = the untempered float64 probability of x0, with [MASK] left out of the softmax at temperature
     0 only (Q6). `remasking="random"` replaces conf0 with uniform noise.
   - "d2f": probabilities in the model's dtype, argmax of them (first index on ties) or Gumbel-max; never
     [MASK]; conf0 in float32 (spec 8).
   - "cts": the plain argmax over the whole vocabulary, [MASK] included (T2), and its float64 probability.
2. Commit (spec 1.4 step 4, 1.5, 6.2, 6.4 step 4), by `commit`: [MASK] positions of the window take x0
   and store conf0 (they enter Soft(V)), per group (a row, or a d2f block): the n most confident
   (LLaDA's schedule), or those over a threshold (Fast-dLLM: >=, always the best one; D2F: > in float32,
   the best one only in a fully activated block). None commits nothing: CTS decodes before it calls,
   with the argmax at pre-planned random positions and no stored confidence (spec 2.3 step 3, T1).
3. Revise (spec 1.4 step 5, Q8, Q9): a decoded position takes x0 when conf0 > its stored confidence,
   strictly (equal keeps the token); a [MASK] is never touched, so nothing is re-masked, except in CTS
   where x0 may itself be [MASK] (T2). `revise=False` (d2f without soft states) skips this step.
4. Soft inputs (spec 1.3): the top-k candidates plus the own-token slot, mask weight exactly `alpha` for
   [MASK] positions (Soft([MASK]+V)), 0 for decoded ones (Soft(V), top-k renormalised); `frozen`
   positions are one-hot on their token ([Decode]). The top-k drops [MASK] at temperature 0 except in
   CTS (Q6, T2). `k=None` builds no soft inputs.

Where the users differ, as arguments:

| argument     | evotoken                         | d2f (soft)                            | CTS                        |
|--------------|----------------------------------|---------------------------------------|----------------------------|
| candidates   | "evotoken"                       | "d2f"                                 | "cts"                      |
| window       | the current block                | every active block                    | the whole sequence         |
| commit       | schedule counts or threshold     | skip_threshold per block (group)      | None (done before)         |
| live         | rows whose block has a [MASK]    | blocks with a [MASK] before the pass  | positions from the start   |
| alpha        | one float                        | one float                             | one per row, U(0.5, 1)     |
| frozen       | before the current block         | none (the caller hardens at feed time)| before the training block  |
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from evotok_cli.decoding.canvas import widen
from evotok_cli.decoding.schedule import (
    Randomness,
    ReleaseDraws,
    gumbel_candidates,
    remask_uniform,
    select_transfer,
    token_confidence,
)
from evotok_cli.decoding.soft import one_hot_slots, soft_weights, top_k_probabilities, top_k_relative

Candidates = Literal["evotoken", "d2f", "cts"]
Top = tuple[torch.Tensor, torch.Tensor]  # (B, L, k) weights (any per-position scale) and token ids


@dataclass(frozen=True)
class Commit:
    """Which [MASK] positions of the window enter Soft(V), chosen per group by conf0 (`select_transfer`).

    counts: per group, the n most confident (LLaDA's schedule); threshold: every one over it instead,
    `strict` for > (D2F) rather than >= (Fast-dLLM), plus the most confident one where `at_least_one`
    (a bool, or one per group); group: groups of this many consecutive columns (d2f's blocks) instead
    of whole rows."""

    counts: list[int] | None = None
    threshold: float | None = None
    strict: bool = False
    at_least_one: bool | torch.Tensor = True
    group: int | None = None
    columns: tuple[int, int] | None = None  # (offset, width) of the window in the ranked row: select_transfer


@dataclass(frozen=True)
class Evolution:
    """The state after the pass, over the columns given to `evolve`."""

    tokens: torch.Tensor  # (B, L) discrete slots after commit and revision
    confidence: torch.Tensor  # (B, L) stored confidences
    committed: torch.Tensor  # (B, L) bool: [MASK] positions that took a token
    revised: torch.Tensor  # (B, L) bool: decoded positions whose token changed
    soft_ids: torch.Tensor | None  # (B, L, k+1) inputs of the next pass
    soft_weights: torch.Tensor | None  # (B, L, k+1) float64


def evolve(logits: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor, *, mask_id: int,
           candidates: Candidates = "evotoken", temperature: float = 0.0,
           generator: Randomness = None, remasking: str = "low_confidence",
           window: tuple[int, int] | None = None, commit: Commit | None = None,
           live: torch.Tensor | bool = True, revise: bool = True, k: int | None = None,
           alpha: float | Sequence[float] = 0.0, frozen: torch.Tensor | None = None) -> Evolution:
    """One pass of the EvoToken rule (see the module docstring for the steps and the users).

    logits (B, L, V), tokens (B, L) and confidence (B, L) cover the same columns. Candidates are drawn,
    and commits and revisions happen, only in `window` (start, end) of them and where `live` (broadcast
    to the window) is true; soft inputs are rebuilt for all L columns. `alpha` is one float or one per
    row. Nothing passed in is modified (logits' [MASK] column is set to -inf during the call and then
    restored, which spares a vocabulary-sized copy)."""
    lo, hi = window or (0, tokens.shape[1])
    x0, conf0, top = _candidates(logits, lo, hi, kind=candidates, mask_id=mask_id, temperature=temperature,
                                 generator=generator, remasking=remasking, k=k)
    x, c = tokens.clone(), confidence.clone()
    xw, cw = x[:, lo:hi], c[:, lo:hi]  # views: writes land in x and c
    chosen = torch.zeros_like(xw, dtype=torch.bool)
    if commit is not None:
        chosen = _commit(conf0, (xw == mask_id) & live, commit)
    stored = conf0.to(c.dtype)  # d2f: float32 confidences are stored and compared in float64
    # torch.where, not boolean indexing: the same values, without the read-back of a nonzero() per write
    xw.copy_(torch.where(chosen, x0, xw))
    cw.copy_(torch.where(chosen, stored, cw))
    changed = torch.zeros_like(chosen)
    if revise:  # strictly higher: a just-committed position (equal confidence) keeps its token
        better = (xw != mask_id) & live & (stored > cw)
        changed = better & (x0 != xw)
        xw.copy_(torch.where(better, x0, xw))
        cw.copy_(torch.where(better, stored, cw))
    committed, revised = widen(chosen, x, lo, hi), widen(changed, x, lo, hi)
    if top is None:
        return Evolution(x, c, committed, revised, None, None)
    ids, weights = _soft_inputs(top, x, mask_id, alpha)
    if frozen is not None:
        ids, weights = as_decoded(ids, weights, x, frozen)
    return Evolution(x, c, committed, revised, ids, weights)


def as_decoded(ids: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor,
               where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft inputs with the positions `where` (broadcast to tokens) one-hot on their token ([Decode])."""
    hard_ids, hard_weights = one_hot_slots(tokens, ids.shape[-1] - 1, weights.dtype)
    where = where.expand(tokens.shape)[..., None]
    return torch.where(where, hard_ids, ids), torch.where(where, hard_weights, weights)


def _candidates(logits: torch.Tensor, lo: int, hi: int, *, kind: Candidates, mask_id: int, temperature: float,
                generator: Randomness, remasking: str,
                k: int | None) -> tuple[torch.Tensor, torch.Tensor, Top | None]:
    """x0 and conf0 over the window, and the top-k of every column for the soft inputs (step 1)."""
    if kind == "cts":  # one top-k gives the argmax, its probability and the soft inputs
        probs, ids = top_k_probabilities(logits, k or 1, exclude=None)
        return ids[:, lo:hi, 0], probs[:, lo:hi, 0], (probs, ids) if k else None
    hidden = mask_id if temperature == 0 else None  # Q6: only at temperature 0 is [MASK] out of the softmax
    if isinstance(generator, ReleaseDraws):  # the pass's drawn numbers, aligned with the logits' columns
        generator = generator.cols(lo, hi)
    if kind == "d2f":
        x0, conf0 = _d2f_candidates(logits[:, lo:hi], mask_id, temperature, generator)
        with _column_at_minus_inf(logits, hidden) as scores:
            return x0, conf0, top_k_relative(scores, k) if k else None
    with _column_at_minus_inf(logits, hidden) as scores:
        top = top_k_relative(scores, k) if k else None
        window = scores[:, lo:hi]
        x0 = gumbel_candidates(window, temperature, generator, exclude=mask_id)
        if remasking == "random":
            conf0 = remask_uniform(x0.shape, generator, x0.device)
        else:
            conf0 = token_confidence(window, x0, dtype=torch.float64)
    return x0, conf0, top


def _d2f_candidates(logits: torch.Tensor, mask_id: int, temperature: float,
                    generator: Randomness) -> tuple[torch.Tensor, torch.Tensor]:
    """D2F's candidates: from probabilities in the model's dtype, so bf16 near-ties round equal and the
    first index wins; conf0 is read in float32."""
    probs = torch.softmax(logits, dim=-1)
    if temperature == 0:
        x0 = probs.index_fill(-1, torch.tensor([mask_id], device=probs.device), -1.0).argmax(-1)
    else:
        x0 = gumbel_candidates(logits, temperature, generator, exclude=mask_id)
    return x0, probs.gather(-1, x0[..., None]).squeeze(-1).float()


@contextmanager
def _column_at_minus_inf(logits: torch.Tensor, column: int | None) -> Iterator[torch.Tensor]:
    """The logits with one column at -inf for the duration, restored afterwards (no vocabulary copy)."""
    if column is None:
        yield logits
        return
    saved = logits[..., column].clone()
    logits[..., column] = float("-inf")
    try:
        yield logits
    finally:
        logits[..., column] = saved


def _commit(conf0: torch.Tensor, eligible: torch.Tensor, commit: Commit) -> torch.Tensor:
    """Step 2 per group: rows, or `commit.group` consecutive columns of each row."""
    shape = conf0.shape
    if commit.group is not None:
        conf0, eligible = conf0.reshape(-1, commit.group), eligible.reshape(-1, commit.group)
    chosen = select_transfer(conf0, eligible, commit.counts, commit.threshold, strict=commit.strict,
                             at_least_one=commit.at_least_one, columns=commit.columns)
    return chosen.reshape(shape)


def _soft_inputs(top: Top, tokens: torch.Tensor, mask_id: int,
                 alpha: float | Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 (spec 1.3). One alpha per row (CTS) is applied row by row, each as a Python float, so the
    arithmetic is exactly that of a single alpha."""
    probs, ids = top
    if isinstance(alpha, (int, float)):
        return soft_weights(probs, ids, tokens, mask_id, alpha)
    rows = [soft_weights(probs[r:r + 1], ids[r:r + 1], tokens[r:r + 1], mask_id, float(a))
            for r, a in enumerate(alpha)]
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
