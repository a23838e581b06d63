"""d2f rows of several requests as ONE program (the engine merges one-row requests admitted together:
evotok_cli/decoding/merging.py).

Why: a d2f row that is a program of its own costs the host its schedule, its forward's inputs and mask,
its update's slices and its read, every step: host torch operations per step grew 5.3x from 8 to 64 rows
(results README, session 12). Merged, every row still runs its own pipeline (its blocks, their progress,
its EOS, its NFE, its own random stream), as decoded alone; what the rows share is the tensor work of a
step, done once for all of them:

- the canvas is left-padded to the longest prompt, so every row's prompt ends at the same column and block
  j spans the same columns in every row: one block-causal mask serves all rows;
- one forward pass whose rows feed windows of their own (`ForwardPass.windows`: each row from its first
  block not yet cached to its last block; a row that has finished sits the pass out);
- one grouped update over the active blocks of every row (`blocks.d2f_blocks`, which treats blocks
  independently), read from and written back into the canvas through one flat index;
- one host read (masks left per active block, EOS per block, streamed tokens).

What stays per row on the host is integers: the pipeline's schedule (`D2FDecoder._schedule`). Per-row
tensor work remains only where a request asks for per-row output (log-probabilities, traces).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import GenerationRequest, GenerationResult, RowResult, row_seed
from evotok_cli.decoding.canvas import Canvas, build_canvas
from evotok_cli.decoding.engine import ForwardPass, HostRead, Program, Update
from evotok_cli.decoding.evolution import as_decoded
from evotok_cli.decoding.logprobs import recorder_for
from evotok_cli.decoding.passes import RowWindow
from evotok_cli.decoding.soft import one_hot_slots

from . import blocks as block_rule
from .blocks import BlockStep
from .pipeline import PipelineBlock, RowRun, aligned_block_mask


def merged_program(decoder: Any, model: Any, request: GenerationRequest) -> Program:
    """The request's rows (the merged requests' rows, each with its own seed) decoded together."""
    t0 = time.perf_counter()
    budget = decoder.check_settings(gen_length=request.gen_length)
    if any(len(p) == 0 for p in request.prompts):  # alone it fails; padded, it would decode from padding
        raise ConfigError("a prompt is empty", where="--prompt", fix="give every prompt at least one token")
    canvas = build_canvas(request.prompts, budget, mask_id=model.mask_id, pad_id=model.eos_id,
                          max_length=model.max_length, device=model.device)
    step = _Step(decoder, model, request, canvas)
    size, g0 = step.size, canvas.gen_start
    for r, prompt in enumerate(request.prompts):
        step.new_row(len(prompt), row_seed(request, r))
    if request.joins is not None:  # rows may join while the program runs, as long as their prompt fits
        request.joins.accept = step.accept
    while True:
        step.take_joined()
        runs = step.runs
        actives = [decoder._schedule(run, budget // size) for run in runs]
        if not any(actives):
            break
        # rows whose pipeline has ended are answered now, not when the slowest row ends: their tokens come
        # with this pass's one read (a read of their own would cost the group a step without a forward)
        ended = [r for r, active in enumerate(actives) if not active and not step.answered[r]] \
            if request.on_row else []
        logits = yield from step.forward(actives)
        outcome = yield from step.update(actives, logits)
        tokens, done = yield from step.read_back(actives, outcome, ended)
        for r, ids in zip(ended, done):
            step.answer(r, _row_result(runs[r], ids, g0))
        step.per_row(actives, logits, outcome)
        if request.on_pass is not None:
            request.on_pass(max(run.nfe for run in runs))
        if request.on_final is not None:
            for r, active in enumerate(actives):
                if active:
                    step.finals[r] = decoder._announce_final(request, runs[r], r, tokens[r], g0, step.finals[r])
    if request.joins is not None:
        request.joins.accept = None  # past the loop: a row would never be decoded
    canvas, runs = step.canvas, step.runs
    gen = yield HostRead(_generated(canvas, model))
    rows = [_row_result(run, gen[r], g0) for r, run in enumerate(runs)]
    if request.on_row is not None:  # each row's own time: a row that joined started after the group
        for r, row in enumerate(rows):
            if not step.answered[r]:
                step.answer(r, row)
    return GenerationResult(rows=rows, nfe=sum(run.nfe for run in runs), seconds=time.perf_counter() - t0)


def _generated(canvas: Canvas, model: Any, rows: list[int] | None = None) -> torch.Tensor:
    """Every row's (or `rows`') generated tokens, [MASK] (blocks never added, after an EOS) read as EOS."""
    gen = canvas.generated() if rows is None else canvas.generated()[rows]
    return gen.masked_fill(gen == model.mask_id, model.eos_id)


def _row_result(run: Any, token_ids: list[int], gen_start: int) -> RowResult:
    return RowResult(token_ids=token_ids, nfe=run.nfe,
                     logprobs=None if run.logprobs is None else run.logprobs.row(0, gen_start))


class _Step:
    """One iteration's tensor work for every row at once (the steps of `D2FDecoder._decode_row` past the
    schedule: forward, EvoToken rule, read), over the merged canvas and its per-column state."""

    def __init__(self, decoder: Any, model: Any, request: GenerationRequest, canvas: Canvas) -> None:
        self.decoder, self.cfg, self.model, self.request = decoder, decoder.config, model, request
        self.canvas, self.x = canvas, canvas.x
        self.conf = torch.zeros(self.x.shape, dtype=torch.float64, device=self.x.device)
        self.soft_ids, self.soft_w = one_hot_slots(self.x, self.cfg.k_soft, model.dtype)
        self.shift = int(model.shifted_logits)
        self.saved = None  # shifted logits: each row's output at its last cached position, (rows, V)
        self.tracing = request.trace and request.on_event is not None
        self.masks: dict[tuple[int, int], torch.Tensor] = {}
        self.size = decoder.block_size(canvas.gen_length)
        self.runs: list[RowRun] = []  # per row: its pipeline, random stream, final prefix, answered or not
        self.generators: list[Any] = []
        self.finals: list[int] = []
        self.answered: list[bool] = []
        self.started: list[float] = []
        self.joining: list[tuple[list[int], int | None]] = []  # (prompt, seed) of rows that joined since
        self.logprobs = False  # whether any row records log-probabilities

    def new_row(self, prompt_length: int, seed: int | None) -> None:
        """Row len(runs)'s pipeline state (its canvas row is already there)."""
        r, g0 = len(self.runs), self.canvas.gen_start
        self.runs.append(RowRun(x=self.x[r:r + 1], prompt=PipelineBlock(g0 - prompt_length, g0, state="to_cache",
                                                                        full=True),
                                size=self.size, logprobs=recorder_for(self.request, 1, self.canvas.length, self.model)))
        self.logprobs = self.logprobs or self.runs[-1].logprobs is not None
        self.generators.append(None if seed is None else torch.Generator(device=self.model.device).manual_seed(seed))
        self.finals.append(0)
        self.answered.append(False)
        self.started.append(time.perf_counter())

    def answer(self, r: int, row: RowResult) -> None:
        """Row r's result to `request.on_row` now, timed from when the row started (its joining)."""
        self.answered[r] = True
        self.request.on_row(r, GenerationResult(rows=[row], nfe=row.nfe, seconds=time.perf_counter() - self.started[r]))

    def accept(self, request: GenerationRequest) -> int | None:
        """A row joining the running program (`MergedRows.offer`): its index, or None when its prompt does not
        fit the canvas (longer than the prompts' column) or is empty. It starts at the next iteration."""
        prompt = request.prompts[0]
        if not 0 < len(prompt) <= self.canvas.gen_start:
            return None
        self.joining.append((list(prompt), row_seed(request, 0)))
        return len(self.runs) + len(self.joining) - 1

    def take_joined(self) -> None:
        """The rows that joined since the last iteration, appended to the canvas and its state: fresh
        [MASK] rows left-padded to the prompts' column, as when the program began with them."""
        if not self.joining:
            return
        joining, self.joining = self.joining, []
        model, c = self.model, self.canvas
        more = build_canvas([p for p, _ in joining], c.gen_length, mask_id=model.mask_id, pad_id=model.eos_id,
                            max_length=model.max_length, device=self.x.device)
        pad = c.gen_start - more.gen_start  # to the group's prompt column
        x = torch.cat([c.x, torch.nn.functional.pad(more.x, (pad, 0), value=model.eos_id)])
        real = torch.cat([c.real, torch.nn.functional.pad(more.real, (pad, 0), value=False)])
        positions = torch.cat([c.positions, torch.nn.functional.pad(more.positions, (pad, 0), value=0)])
        self.canvas = Canvas(x, real, positions, c.gen_start, [*c.prompt_lengths, *more.prompt_lengths])
        self.x = x
        self.conf = torch.cat([self.conf, self.conf.new_zeros((len(joining), x.shape[1]))])
        ids, weights = one_hot_slots(x[len(self.runs):], self.cfg.k_soft, model.dtype)
        self.soft_ids, self.soft_w = torch.cat([self.soft_ids, ids]), torch.cat([self.soft_w, weights])
        if self.saved is not None:
            self.saved = torch.cat([self.saved, self.saved.new_zeros((len(joining), self.saved.shape[1]))])
        for r, run in enumerate(self.runs):  # the rows' views of the new canvas
            run.x = x[r:r + 1]
        for prompt, seed in joining:
            self.new_row(len(prompt), seed)

    def forward(self, actives: list[list]) -> Any:
        """Step 4 for every row: one pass, each row fed from its first block not yet cached to its end."""
        runs, cfg, g0 = self.runs, self.cfg, self.canvas.gen_start
        spans, w0, w1 = {}, self.canvas.length, 0
        for r, (run, active) in enumerate(zip(runs, actives)):
            if active:
                lo, hi = run.uncached_start(cfg.cache), run.blocks[-1].end
                spans[r] = (lo, hi, max(lo, active[0].start - self.shift))
                w0, w1 = min(w0, lo), max(w1, hi)
        windows = [RowWindow(spans[r][0] - w0, spans[r][1] - w0, spans[r][2] - w0, spans[r][1] - w0) if r in spans
                   else RowWindow(0, 0, 0, 0) for r in range(len(runs))]
        self.states = ([self.decoder._trace_states(run, self.soft_ids[r:r + 1], self.soft_w[r:r + 1],
                                                   self.model.mask_id, g0) if actives[r] else None
                        for r, run in enumerate(runs)] if self.tracing else None)
        mask = self.masks.get((w0, w1))
        if mask is None:
            mask = self.masks[(w0, w1)] = aligned_block_mask(g0, runs[0].size, w0, w1, self.x.device)
        out = (yield ForwardPass(self._inputs(w0, w1), position_ids=self.canvas.positions[:, w0:w1],
                                 pad_offsets=self.canvas.pad_offsets, attention_mask=mask,
                                 kv_length=self.canvas.length if cfg.cache else None, start=w0,
                                 logits_slice=(0, 0), windows=windows))[0]  # (N, V): the rows' logits end to end
        for r in spans:
            runs[r].nfe += 1
            if cfg.cache:
                runs[r].mark_cached()
        return self._aligned(out, spans, actives)

    def _inputs(self, w0: int, w1: int) -> dict:
        x = self.x[:, w0:w1]
        if not self.cfg.soft:
            return {"input_ids": x}
        # fed one-hot ([Decode]) except the unfinished active blocks that have a prediction: those are soft.
        # Active blocks lie inside the window; their columns are set from one index, not a list per column.
        width, size = w1 - w0, self.runs[0].size
        starts = [r * width + b.start - w0 for r, run in enumerate(self.runs) for b in run.blocks
                  if self.decoder._is_soft(b)]
        where = torch.ones(x.shape, dtype=torch.bool, device=self.x.device)
        if starts:
            soft = torch.tensor(starts, dtype=torch.long).to(self.x.device, non_blocking=True)[:, None] \
                + torch.arange(size, device=self.x.device)
            where.view(-1)[soft.reshape(-1)] = False
        return {"soft_inputs": as_decoded(self.soft_ids[:, w0:w1], self.soft_w[:, w0:w1], x, where)}

    def _aligned(self, out: torch.Tensor, spans: dict, actives: list[list]) -> torch.Tensor:
        """The active blocks' logits of every row in row order, (blocks, size, V). Shifted models (Dream):
        position i reads the output at i - 1, from this pass or, when i - 1 was cached before, the row's
        saved output (`D2FDecoder._align`); each row then saves its output before its first uncached block."""
        size = self.runs[0].size
        if not self.shift:  # each row's logits are exactly its active blocks' positions
            return out.view(-1, size, out.shape[-1])
        if self.saved is None:
            self.saved = out.new_zeros((len(self.runs), out.shape[-1]))
        index, keep, base = [], [], 0
        for r, (_, hi, first) in spans.items():
            a = actives[r][0].start
            if first < a:
                index.extend(range(base, base + hi - a))
            else:  # the saved output first (after the pass's own outputs in the joined tensor)
                index.extend([out.shape[0] + r, *range(base, base + hi - a - 1)])
            nxt = self.runs[r].uncached_start(True, hi)
            if first <= nxt - 1 < hi:
                keep.append((r, base + nxt - 1 - first))
            base += hi - first
        joined = torch.cat([out, self.saved])
        logits = joined.index_select(0, torch.tensor(index, device=out.device)).view(-1, size, out.shape[-1])
        if keep:
            rows, at = zip(*keep)
            self.saved.index_copy_(0, torch.tensor(rows, device=out.device),
                                   out.index_select(0, torch.tensor(at, device=out.device)))
        return logits

    def update(self, actives: list[list], logits: torch.Tensor) -> Any:
        """Step 5 for every active block of every row: one grouped `Update`, written back in one go."""
        cfg, model, length, size = self.cfg, self.model, self.canvas.length, self.runs[0].size
        blocks = [(r, b) for r, active in enumerate(actives) for b in active]
        flat = torch.tensor([r * length + b.start for r, b in blocks], device=self.x.device)[:, None] \
            + torch.arange(size, device=self.x.device)  # (blocks, size) into the flattened canvas
        window = [self.x.view(-1)[flat], self.conf.view(-1)[flat]]
        if cfg.soft:
            k = self.soft_ids.shape[-1]
            window += [self.soft_ids.view(-1, k)[flat], self.soft_w.view(-1, k)[flat]]
        results = yield Update(
            block_rule.d2f_blocks, self.decoder.group_key(model, self.request.sampling), (logits, *window),
            rows={"full": [b.full for _, b in blocks], "generators": [self.generators[r] for r, _ in blocks]},
            shared={"mask_id": model.mask_id, "config": cfg, "temperature": self.request.sampling})
        tokens, conf, committed, revised, *soft = results
        where = flat.reshape(-1)
        self.x.view(-1).index_copy_(0, where, tokens.reshape(-1))
        self.conf.view(-1).index_copy_(0, where, conf.reshape(-1))
        if soft:
            self.soft_ids.view(-1, k).index_copy_(0, where, soft[0].reshape(-1, k))
            self.soft_w.view(-1, k).index_copy_(0, where, soft[1].reshape(-1, k))
        return blocks, tokens, committed, revised

    def per_row(self, actives: list[list], logits: torch.Tensor, outcome: tuple) -> None:
        """What a row asked for of its own: its log-probabilities, its trace event (after the read: the
        event's blocks say their progress after the pass)."""
        if not self.tracing and not self.logprobs:
            return
        blocks, tokens, committed, revised = outcome
        at, g0 = 0, self.canvas.gen_start
        for r, active in enumerate(actives):
            if not active:
                continue
            run, n = self.runs[r], len(active)
            part = BlockStep(tokens[at:at + n].reshape(1, -1), committed[at:at + n].reshape(1, -1),
                             revised[at:at + n].reshape(1, -1))
            if run.logprobs is not None:
                own = logits[at:at + n].reshape(1, -1, logits.shape[-1])
                run.logprobs.record(own, active[0].start, part.committed | part.revised, part.tokens,
                                    self.model.mask_id)
            if self.tracing:
                self.request.on_event(self.decoder._event(run, r, active, g0, self.states[r],
                                                          self.conf[r:r + 1], part))
            at += n

    def read_back(self, actives: list[list], outcome: tuple, ended: list[int]) -> Any:
        """The step's one read: masks left per active block, EOS committed per block, when streaming every
        row's generated tokens (returned per row), and the answers of the rows `ended` (their generated
        tokens, [MASK] read as EOS; nothing writes to an ended row's columns any more)."""
        blocks, tokens, committed, _ = outcome
        model = self.model
        masked = (tokens == model.mask_id).sum(-1)
        eos = ((tokens == model.eos_id) & committed).any(-1).long()
        streamed = [self.canvas.generated().reshape(-1)] if self.request.on_final is not None else []
        answers = [_generated(self.canvas, model, ended).reshape(-1)] if ended else []
        values = yield HostRead(torch.cat([masked, eos, *streamed, *answers]))
        n = len(blocks)
        for (r, b), left, stop in zip(blocks, values[:n], values[n:2 * n]):
            b.masks_left, b.predicted = left, True
            self.runs[r].eos = self.runs[r].eos or bool(stop)
        width, at = self.canvas.gen_length, 2 * n + (len(self.runs) * self.canvas.gen_length if streamed else 0)
        return ([values[2 * n + r * width:2 * n + (r + 1) * width] for r in range(len(self.runs))],
                [values[at + i * width:at + (i + 1) * width] for i in range(len(ended))])
