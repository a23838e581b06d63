"""Shared pieces of LLaDA-style decoding: block layout, the linear transfer schedule, Gumbel-max
candidates, confidences and the selection of positions to commit.

Each function mirrors one step of the reference code (LLaDA `generate`, Fast-dLLM, EvoToken
`generate_soft_token`) and says where the references differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch

from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import Sampling


@dataclass(frozen=True)
class BlockLayout:
    gen_length: int
    block_length: int
    steps: int

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def block_layout(gen_length: int, block_length: int, steps: int) -> BlockLayout:
    if gen_length <= 0:
        raise ConfigError(f"gen length must be positive, got {gen_length}", where="--gen-length",
                          fix="e.g. --gen-length 128")
    if block_length <= 0:
        raise ConfigError(f"block length must be positive, got {block_length}", where="--block-length",
                          fix="e.g. --block-length 32")
    if steps <= 0:
        raise ConfigError(f"steps must be positive, got {steps}", where="--steps", fix="e.g. --steps 64")
    if gen_length % block_length:
        raise ConfigError(f"gen length {gen_length} is not divisible by block length {block_length}",
                          where="--block-length", fix="pick a block length that divides the gen length")
    blocks = gen_length // block_length
    if steps % blocks:
        raise ConfigError(f"steps {steps} is not divisible by the number of blocks {blocks}", where="--steps",
                          fix=f"pick steps as a multiple of {blocks} (gen length / block length)")
    return BlockLayout(gen_length, block_length, steps)


def transfer_schedule(mask_count: int, steps: int) -> list[int]:
    """LLaDA's linear schedule: tokens committed at each step of a block (sums to mask_count)."""
    base, extra = divmod(mask_count, steps)
    return [base + 1] * extra + [base] * (steps - extra)


@dataclass(frozen=True)
class ReleaseDraws:
    """`rng=reference`: one pass's random numbers, drawn as LLaDA's `generate` and EvoToken's
    `generate_soft_token` draw them: float64 uniforms over the whole canvas's logits (B, L, V) for the
    Gumbel noise when sampling, then float32 uniforms (B, L) for random remasking, in that order, from
    one generator continued across passes, blocks and prompts. A decoder reads the columns it uses; the
    price is the draw over every column and the whole vocabulary, paid only in this mode."""

    gumbel: torch.Tensor | None  # (B, L, V) float64
    remask: torch.Tensor | None  # (B, L) float32

    def cols(self, a: int, b: int) -> ReleaseDraws:
        return ReleaseDraws(None if self.gumbel is None else self.gumbel[:, a:b],
                            None if self.remask is None else self.remask[:, a:b])


def release_draws(generator: torch.Generator | None, rows: int, length: int, vocab: int, *, temperature: float,
                  random_remasking: bool, device: torch.device) -> ReleaseDraws:
    """The draws of one pass of the releases (see ReleaseDraws)."""
    gumbel = None
    if temperature > 0:  # add_gumbel_noise returns the logits untouched at temperature 0: no draw
        gumbel = torch.rand((rows, length, vocab), dtype=torch.float64, device=device, generator=generator)
    remask = torch.rand((rows, length), device=device, generator=generator) if random_remasking else None
    return ReleaseDraws(gumbel, remask)


# a program's generator (rng=fast), a pass's drawn numbers (rng=reference), or one generator per row: a grouped
# update over the rows of several programs (`engine.Update`), each row drawing from its own program's stream
Randomness = torch.Generator | ReleaseDraws | list[torch.Generator | None] | None


def _runs(generators: list[torch.Generator | None]) -> list[tuple[int, int]]:
    """[start, end) of each run of rows that draw from one generator (a program's rows, in order)."""
    runs, start = [], 0
    for i in range(1, len(generators) + 1):
        if i == len(generators) or generators[i] is not generators[start]:
            runs.append((start, i))
            start = i
    return runs


def remask_uniform(shape: torch.Size, source: Randomness, device: torch.device) -> torch.Tensor:
    """Random remasking's confidences (float64): drawn now, or the release's float32 draw of the pass."""
    if isinstance(source, ReleaseDraws):
        return source.remask.to(torch.float64)
    if isinstance(source, list):  # each program's rows drawn as that program draws them alone
        return torch.cat([torch.rand((b - a, *shape[1:]), dtype=torch.float64, device=device, generator=source[a])
                          for a, b in _runs(source)])
    return torch.rand(shape, dtype=torch.float64, device=device, generator=source)


SAMPLE_CHUNK_ELEMS = 1 << 22  # float64 elements of one row chunk of sampling (32 MB)


def filtered_log_weights(logits: torch.Tensor, sampling: Sampling, exclude: int | None = None) -> torch.Tensor:
    """log of the filtered, unnormalised candidate distribution (see Sampling), float64, -inf for every
    token a filter removed (and for `exclude`): softmax of it is what `gumbel_candidates` samples."""
    scores = logits.to(torch.float64, copy=True).div_(float(sampling))
    if exclude is not None:
        scores[..., exclude] = float("-inf")
    vocab = scores.shape[-1]
    if sampling.top_k is not None and sampling.top_k < vocab:
        kth = scores.topk(sampling.top_k, dim=-1).values[..., -1:]
        scores.masked_fill_(scores < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        probs, order = scores.softmax(dim=-1).sort(dim=-1, descending=True, stable=True)
        before = probs.cumsum(dim=-1) - probs  # the mass of the more probable tokens, in sorted order
        before[..., 0] = 0.0
        drop = torch.empty_like(before, dtype=torch.bool).scatter_(-1, order, before >= sampling.top_p)
        scores.masked_fill_(drop, float("-inf"))
    if sampling.min_p is not None and sampling.min_p > 0:
        probs = scores.softmax(dim=-1)
        scores.masked_fill_(probs < sampling.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return scores


def gumbel_candidates(logits: torch.Tensor, temperature: float, generator: Randomness,
                      exclude: int | None = None, chunk_elems: int | None = None) -> torch.Tensor:
    """Candidate token per position: argmax at temperature 0, else an exact sample of
    softmax(logits / T) drawn as in the references: argmax of exp(logits) / (-log u)^T in float64.
    A `Sampling` temperature with filters samples the filtered distribution instead
    (`filtered_log_weights`): the removed tokens' scores are set to -inf after the noise is drawn, so the
    random stream is that of the unfiltered draw, and without filters nothing changes.

    `exclude` (the mask id) is never a candidate: its column is set to -inf after the noise is applied, so
    the uniforms are still drawn over the whole vocabulary (the releases' random stream is unchanged) and
    the confidences (`token_confidence`) are untouched. This is a deliberate difference from the releases
    (LLaDA's `generate`, Fast-dLLM, EvoToken's `generate_soft_token`), whose argmax may pick [MASK]: a
    trained model never predicts it, and a committed [MASK] would leave its block unfinished. It is shared
    with tests/reference.py, so the faithfulness tests compare like with like.

    At T > 0 the rows (dim 0) go a few at a time, at most `chunk_elems` (default `SAMPLE_CHUNK_ELEMS`)
    float64 elements per chunk but at least one row, so the float64 temporaries are two chunks, not
    several B x L x vocabulary copies (GBs at B=32 and a 126k vocabulary). Each row's uniforms are drawn
    by a call of their own, in row order, so the stream does not depend on the chunk size. On CPU that is
    the stream of one draw over all rows (CPU draws are serial); a CUDA draw depends on its size, so
    there a program of several rows on one generator (a KV-cache cohort) draws other numbers than one
    draw over the batch would (equally valid; rows decoded alone are unaffected).
    """
    if temperature == 0:
        scores = logits
        if exclude is not None:
            scores = logits.clone()
            scores[..., exclude] = float("-inf")
        return scores.argmax(dim=-1)
    rows = max(1, (chunk_elems or SAMPLE_CHUNK_ELEMS) // max(1, logits[:1].numel()))
    return torch.cat([_gumbel_argmax(logits[i:i + rows], i, temperature, generator, exclude)
                      for i in range(0, logits.shape[0], rows)])


def _gumbel_argmax(logits: torch.Tensor, first: int, temperature: float, generator: Randomness,
                   exclude: int | None) -> torch.Tensor:
    """argmax of exp(logits) / (-log u)^T over rows [first, first + len(logits)): two float64 temporaries
    of the chunk's size, in place, the same operations (hence the same numbers) as on the whole batch."""
    if isinstance(generator, ReleaseDraws):
        noise = generator.gumbel[first:first + logits.shape[0]].log()  # a copy: the drawn numbers stay
    else:
        noise = torch.empty(logits.shape, dtype=torch.float64, device=logits.device)
        for i, row in enumerate(noise):  # what torch.rand draws, row by row (a grouped update: each its own)
            row.uniform_(generator=generator[first + i] if isinstance(generator, list) else generator)
        noise.log_()
    noise.neg_().pow_(temperature)  # (-log u)^T
    scores = torch.div(logits.to(torch.float64, copy=True).exp_(), noise, out=noise)
    if exclude is not None:
        scores[..., exclude] = float("-inf")
    if isinstance(temperature, Sampling) and temperature.filtered:
        scores.masked_fill_(filtered_log_weights(logits, temperature, exclude) == float("-inf"), float("-inf"))
    return scores.argmax(dim=-1)


def logsumexp64(scores: torch.Tensor, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """float64 logsumexp over the last dim, a few rows at a time so that the only float64 temporary is one
    chunk (32 MB): the normaliser of a 126k vocabulary must not cost several copies of the logits. The
    max is taken in the logits' own dtype (exact) and the differences in float64 (exact for float32)."""
    flat = scores.reshape(-1, scores.shape[-1])
    rows = max(1, chunk_elems // scores.shape[-1])
    parts = []
    for i in range(0, flat.shape[0], rows):
        chunk = flat[i:i + rows]
        top = chunk.amax(dim=-1, keepdim=True).to(torch.float64)
        top = torch.where(top.isfinite(), top, 0.0)  # a row of -inf gives -inf, as torch.logsumexp does
        total = chunk.to(torch.float64).sub_(top).exp_().sum(dim=-1)
        parts.append(top.squeeze(-1) + total.log())
    return torch.cat(parts).reshape(scores.shape[:-1])


def token_confidence(logits: torch.Tensor, tokens: torch.Tensor, *, dtype: torch.dtype,
                     exclude: int | None = None) -> torch.Tensor:
    """softmax(logits)[token] in the precision of the reference.

    LLaDA computes the softmax in the logits' dtype; Fast-dLLM and EvoToken in float64, which we get as
    exp(l_t - logsumexp(l)) without a float64 softmax over the vocabulary. With `exclude`, that column
    is left out of the normaliser (EvoToken at temperature 0 sets it to -inf before its softmax).
    """
    scores = logits
    if exclude is not None:
        scores = logits.clone()
        scores[..., exclude] = float("-inf")
    if dtype == logits.dtype:
        return torch.softmax(scores, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    picked = scores.gather(-1, tokens[..., None]).squeeze(-1).to(torch.float64)
    return (picked - logsumexp64(scores)).exp().to(dtype)


def select_transfer(confidence: torch.Tensor, eligible: torch.Tensor, counts: list[int] | None,
                    threshold: float | None, *, strict: bool = False,
                    at_least_one: bool | torch.Tensor = True,
                    columns: tuple[int, int] | list[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """Which positions to commit, per row: the `counts[b]` most confident eligible positions, or
    (threshold mode, Fast-dLLM's rule) the most confident eligible position plus every other eligible one
    whose confidence is >= threshold. D2F's variant: `strict` (>), and the most confident one only in the
    rows where `at_least_one` (a bool, or one per row: D2F's rows are blocks, fully activated or not).

    confidence, eligible: (B, L). Ties are broken by torch.topk's order, as in the references: torch.topk
    breaks exact ties (common in bf16) differently over a short slice than over a long row, so with
    `columns` = (offset, width) the top-k runs over a row of `width` columns, -inf but for these L at
    `offset`, as the references rank over every fed position. `counts` never exceeds a row's eligible
    positions (LLaDA's schedule guarantees it), so no count is read back from the device. `columns` may be
    one per row (a grouped update over rows of several programs, each ranked over its own width): rows
    with the same count and columns share one top-k call (each row of a top-k is ranked on its own, as
    alone). Rows of different widths cannot share one: a top-k breaks ties by the width it ranks over,
    and finding the rows without a tie would read back from the device.
    """
    # an eligible position with confidence -inf (e.g. an EOS candidate under confidence_eos_eot_inf) still
    # outranks every ineligible one, so a block can always be completed
    scores = confidence.clamp(min=torch.finfo(confidence.dtype).min).masked_fill(~eligible, float("-inf"))
    if threshold is not None:
        best = torch.zeros_like(eligible).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
        if at_least_one is not True:
            best &= torch.as_tensor(at_least_one, device=best.device).reshape(-1, 1)
        passed = confidence > threshold if strict else confidence >= threshold
        return eligible & (best | passed)
    per_row = columns if isinstance(columns, list) else [columns] * scores.shape[0]
    by_count: dict[int, list[int]] = {}
    for b, n in enumerate(counts):  # a top-k per count: a larger k may break ties differently
        if n > 0:
            by_count.setdefault(n, []).append(b)
    chosen = torch.zeros_like(eligible)
    for n, rows in by_count.items():
        part = scores if len(rows) == scores.shape[0] else scores[rows]
        ranked = [per_row[b] for b in rows]
        # one top-k per ranked width (a program's rows share one); no read-back to find ties
        picked = _top_ranked(part, n, ranked[0]) if len(set(ranked)) == 1 else _top_ranked_widths(part, n, ranked)
        if len(rows) == scores.shape[0]:
            chosen = picked
        else:
            chosen[rows] = picked
    return chosen


def _top_ranked(scores: torch.Tensor, n: int, columns: tuple[int, int] | None) -> torch.Tensor:
    """The n best of each row as the references rank them: over a row of `columns`' width (see
    `select_transfer`), one top-k call for the rows."""
    offset, narrow = 0, scores.shape[1]
    if columns is not None and columns != (0, narrow):
        offset, width = columns
        wide = scores.new_full((scores.shape[0], width), float("-inf"))
        wide[:, offset:offset + narrow] = scores
        scores = wide
    picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, torch.topk(scores, k=n, dim=1).indices, True)
    return picked[:, offset:offset + narrow]


def _top_ranked_widths(scores: torch.Tensor, n: int, ranked: list[tuple[int, int] | None]) -> torch.Tensor:
    """`_top_ranked` for rows with columns of their own (a grouped update over programs of several canvas
    lengths): one top-k call per distinct width, as alone, but the rows are widened, marked and cut back
    in a few calls for all of them (not six small tensors per width: host work that grew with the rows).
    Each top-k sees exactly the row `_top_ranked` builds (its width, -inf but for the row's columns at its
    offset), so its ties break the same way."""
    rows, narrow = scores.shape
    spans = [(0, narrow) if c is None else c for c in ranked]
    order = sorted(range(rows), key=lambda i: spans[i][1])  # rows of one width side by side: one slice each
    widest = max(width for _, width in spans)
    device = scores.device
    offsets = torch.tensor([spans[i][0] for i in order], dtype=torch.long).to(device, non_blocking=True)
    at = offsets[:, None] + torch.arange(narrow, device=device)  # (rows, narrow) columns of each row
    perm = torch.tensor(order, dtype=torch.long).to(device, non_blocking=True)
    wide = scores.new_full((rows, widest), float("-inf")).scatter_(1, at, scores.index_select(0, perm))
    top, first = [], 0
    for width, members in groupby(spans[i][1] for i in order):
        count = len(list(members))
        top.append(torch.topk(wide[first:first + count, :width], k=n, dim=1).indices)
        first += count
    marked = torch.zeros((rows, widest), dtype=torch.bool, device=device).scatter_(1, torch.cat(top), True)
    return torch.empty_like(scores, dtype=torch.bool).index_copy_(0, perm, marked.gather(1, at))


def llada_step(model: Any, logits: torch.Tensor, window: torch.Tensor, confidence: torch.Tensor, *,
               counts: list[int], open_rows: torch.Tensor, generator: Randomness, temperature: float,
               remasking: str = "low_confidence", threshold: float | None = None, exact: bool = True,
               logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
               columns: tuple[int, int] | list[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """LLaDA's low-confidence remasking step over one block: candidates, their confidence, and the
    committed [MASK] positions, written into `window` (B, n) and `confidence` (B, n) in place (they are
    views of the caller's canvas). `exact`: the softmax in the logits' dtype, as LLaDA's `generate`
    computes it; otherwise in float64 (Fast-dLLM). `open_rows` (B,): the rows whose block still holds a
    [MASK] (only they commit). Returns the bool mask of committed positions."""
    if logits_eos_inf:
        logits = logits.clone()
        logits[..., model.eos_id] = float("-inf")
    x0 = gumbel_candidates(logits, temperature, generator, exclude=model.mask_id)  # (B, n)
    if remasking == "random":
        conf = remask_uniform(x0.shape, generator, x0.device)
    else:
        conf = token_confidence(logits, x0, dtype=logits.dtype if exact else torch.float64)
    if confidence_eos_eot_inf:  # compared one id at a time: no host-to-device copy of the ids (a CUDA sync)
        stop = torch.zeros_like(x0, dtype=torch.bool)
        for token in model.stop_ids:
            stop |= x0 == token
        conf = conf.masked_fill(stop, float("-inf"))
    eligible = (window == model.mask_id) & open_rows[:, None]
    chosen = select_transfer(conf, eligible, counts, threshold, columns=columns)
    # torch.where, not boolean indexing: the same values, without the read-back of a nonzero() per read and
    # per write (four per pass); `window` and `confidence` are views of the caller's canvas, written in place
    window.copy_(torch.where(chosen, x0, window))
    confidence.copy_(torch.where(chosen, conf.to(torch.float64), confidence))
    return chosen


def llada_rows(logits: torch.Tensor, window: torch.Tensor, confidence: torch.Tensor, *, model: Any,
               counts: list[int], generators: list[Randomness], columns: list[tuple[int, int] | None],
               temperature: float, remasking: str = "low_confidence", threshold: float | None = None,
               exact: bool = True, logits_eos_inf: bool = False,
               confidence_eos_eot_inf: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`llada_step` over rows of many programs at once (an `engine.Update`: hard-mask's grouped update, and
    evotoken's when it `reduces_to_llada`), pure: returns (window, confidence, committed) after the step.
    `window` is the block (B, n), so a row is open while its window holds a [MASK]; `generators` and
    `columns` are per row."""
    window, confidence = window.clone(), confidence.clone()
    open_rows = (window == model.mask_id).any(dim=1)
    chosen = llada_step(model, logits, window, confidence, counts=counts, open_rows=open_rows, generator=generators,
                        temperature=temperature, remasking=remasking, threshold=threshold, exact=exact,
                        logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf, columns=columns)
    return window, confidence, chosen
