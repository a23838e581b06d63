"""The semi-autoregressive block loop shared by hard-mask and evotoken, with Fast-dLLM's cache policies.

For each block: build LLaDA's linear schedule, then run forward passes until no [MASK] is left in the
block. A decoder plugs in how the inputs are built (`inputs`) and what a pass changes (`update`); the loop
owns the canvas, the cache, the per-row bookkeeping of a batch, NFE and the trace.

Cache policies (spec 6.3): `none` feeds the whole canvas every pass (the faithful reference); `prefix`
runs one full pass at each block start, then feeds the current block and everything after it; `dual`
runs one full pass at each block start, then feeds only the current block.

A block ends when it holds no [MASK], which is where EvoToken's loop stops too. LLaDA's `generate` runs
the rest of the block's scheduled passes; a full block has no [MASK] for hard-mask's step to fill, so we
skip them, and with rng=reference make and discard their random draws (`release_runs_every_step`). An
EvoToken pass on a full block would not be idle (it revises decoded tokens): its release never runs one.

Models with shifted logits (Dream) predict position i from the output at i - 1; the window fed to the
model then starts one position earlier so that output exists (spec 7.2).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import replace
from typing import Any, ClassVar

import torch

from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import FinalPrefix, GenerationRequest, GenerationResult, RowResult, StepEvent, row_seed
from evotok_cli.decoding.canvas import Canvas, build_canvas
from evotok_cli.decoding.engine import ForwardPass, HostRead, Program, Update, drive, shifted_listener
from evotok_cli.decoding.logprobs import recorder_for
from evotok_cli.decoding.schedule import block_layout, release_draws, transfer_schedule


def check_reference_rng(config: Any, where: str) -> None:
    """rng=reference reproduces the releases' loops, which have no KV cache and no threshold."""
    if getattr(config, "rng", "fast") != "reference":
        return
    if getattr(config, "cache", "none") != "none" or getattr(config, "threshold", None) is not None:
        raise ConfigError("rng=reference reproduces the release, which runs without a cache or a threshold",
                          where=where, fix="use cache=none and no threshold with rng=reference")


class Block:
    """Canvas columns [start, end) of the block being decoded, its index, and the columns [lo, hi) fed in
    the current pass (the references rank candidates over the fed positions: `ranked_columns`)."""

    def __init__(self, index: int, start: int, end: int):
        self.index, self.start, self.end = index, start, end
        self.fed = (start, end)

    def ranked_columns(self, start: int | None = None) -> tuple[int, int]:
        """(offset, width) of the columns from `start` (default: the block's) within the fed window."""
        lo, hi = self.fed
        return (self.start if start is None else start) - lo, hi - lo


class BlockwiseDecoder:
    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any):
        self.config = config

    # -- hooks -----------------------------------------------------------------------------------
    def start(self, model: Any, canvas: Canvas, request: GenerationRequest) -> Any:
        """Per-generation state beyond the canvas (confidences, soft inputs...)."""
        return None

    def inputs(self, model: Any, state: Any, canvas: Canvas, lo: int, hi: int, block: Block) -> dict:
        """Model inputs for canvas columns [lo, hi): `input_ids=`, or `soft_inputs=(ids, weights)` that the
        model mixes into input embeddings."""
        return {"input_ids": canvas.x[:, lo:hi]}

    def logits_range(self, canvas: Canvas, lo: int, hi: int, block: Block) -> tuple[int, int]:
        """Columns whose logits the update needs (the LM head runs only there)."""
        return block.start, block.end

    def update(self, model: Any, state: Any, canvas: Canvas, logits: torch.Tensor, cols: tuple[int, int],
               block: Block, counts: list[int], open_rows: torch.Tensor, generator: torch.Generator | None,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply one pass; return (committed, revised) bool masks over the canvas. `open_rows`: (B,) bool,
        the rows whose block still holds a [MASK]. `temperature` is the request's `Sampling` (a float that
        carries top_k / top_p / min_p): handed on to `gumbel_candidates`, it samples the filtered
        distribution."""
        raise NotImplementedError

    def update_program(self, model: Any, state: Any, canvas: Canvas, logits: torch.Tensor, cols: tuple[int, int],
                       block: Block, counts: list[int], open_rows: torch.Tensor | None, generator: Any,
                       temperature: float, masks: bool = True) -> Any:
        """The update as a step of the program (`yield from`): a decoder may yield an `engine.Update` here,
        so that the rows of every program with its options update in ONE call per engine step (hard-mask
        and evotoken do: host work per step then does not grow with the rows). The default runs `update`
        on this program's rows, as before. `open_rows` None: not computed yet (computed here when needed).
        `masks` False: the caller needs no (committed, revised) masks, (None, None) will do."""
        if open_rows is None:
            open_rows = self.open_rows(model, canvas, block)
        return self.update(model, state, canvas, logits, cols, block, counts, open_rows, generator, temperature)
        yield  # a generator: the default yields nothing

    def group_key(self, model: Any, temperature: float) -> tuple:
        """What a grouped update's rows must share besides their shapes: the model, the options and the
        sampling (its filters included). The options' repr is kept: every pass of every row asks."""
        key = self.__dict__.get("_group_key")
        if key is None:
            key = self.__dict__["_group_key"] = (type(self), repr(self.config))
        return (id(model), *key, repr(temperature))

    def llada_update(self, fn: Any, model: Any, state: Any, canvas: Canvas, logits: torch.Tensor,
                     cols: tuple[int, int], block: Block, counts: list[int], generator: Any, temperature: float,
                     **flags: Any) -> Any:
        """LLaDA's commit step (`fn`: `schedule.llada_rows`, as the plugin module names it) as one grouped
        `Update` over the rows that share this decoder, options and window shape; `state.confidence` and the
        window's tokens are written back by the engine. Returns the (rows, window) bool mask of what was
        committed. `flags`: llada_step's optional switches."""
        cfg = self.config
        a, b = cols
        rows = canvas.batch
        _, _, chosen = yield Update(
            fn, self.group_key(model, temperature), (logits, canvas.x[:, a:b], state.confidence[:, a:b]),
            rows={"counts": counts, "generators": per_row(generator, rows),
                  "columns": [block.ranked_columns(a)] * rows},
            shared={"model": model, "temperature": temperature, "remasking": cfg.remasking,
                    "threshold": cfg.threshold, "exact": cfg.cache == "none" and cfg.threshold is None, **flags},
            into={0: 1, 1: 2})
        return chosen

    @staticmethod
    def open_rows(model: Any, canvas: Canvas, block: Block) -> torch.Tensor:
        """(B,) bool, on the device: rows whose block still holds a [MASK]."""
        return (canvas.x[:, block.start:block.end] == model.mask_id).any(dim=1)

    def end_block(self, model: Any, state: Any, canvas: Canvas, block: Block) -> None:
        """Called when every row has filled the block."""

    def describe_inputs(self, model: Any, state: Any, canvas: Canvas, row: int
                        ) -> tuple[list[str], list[list[tuple[int, float]]] | None]:
        """Trace: the input state of each generated position in the coming pass, and soft candidates."""
        gen = canvas.generated()[row].tolist()
        return ["mask" if t == model.mask_id else "decoded" for t in gen], None

    def confidences(self, state: Any, canvas: Canvas, row: int) -> list[float | None]:
        return [None] * (canvas.length - canvas.gen_start)

    # -- the loop --------------------------------------------------------------------------------
    @property
    def cache_mode(self) -> str:
        return getattr(self.config, "cache", "none")

    @property
    def threshold(self) -> float | None:
        return getattr(self.config, "threshold", None)

    def feed_range(self, canvas: Canvas, block: Block, first_pass_of_block: bool) -> tuple[int, int]:
        mode = self.cache_mode
        if mode == "none" or first_pass_of_block:
            return 0, canvas.length
        if mode == "prefix":
            return block.start, canvas.length
        return block.start, block.end  # dual

    def forward(self, model: Any, state: Any, canvas: Canvas, block: Block, lo: int, hi: int,
                cache: int | None) -> tuple[ForwardPass, tuple[int, int]]:
        """The pass to run (the engine runs it in the step's one forward, with every other row) and the
        canvas columns its logits cover. `cache`: the canvas length when the rows keep a KV cache (the
        engine's slots: the fed window [lo, hi) is written there, the rest reused), else None."""
        cols = self.logits_range(canvas, lo, hi, block)
        shift = int(model.shifted_logits)
        # Dream predicts position i from the output at i - 1: that position must be fed too. Under a cache
        # it is re-fed (its K/V refreshed like the rest of the window), the same approximation as the window.
        lo = min(lo, cols[0] - shift)
        return ForwardPass(self.inputs(model, state, canvas, lo, hi, block),
                           position_ids=canvas.positions[:, lo:hi], pad_offsets=canvas.pad_offsets, kv_length=cache,
                           start=lo if cache is not None else 0,
                           logits_slice=(cols[0] - shift - lo, cols[1] - shift - lo)), cols

    def generate(self, model: Any, request: GenerationRequest) -> GenerationResult:
        """Decode the request's rows together as one program, alone (a library call; the CLI, bench and
        serve run each row as a program of its own in the step engine, with its own random stream)."""
        return drive(model, self.program(model, request))

    # The release runs every scheduled pass of a block, also after the block is full (LLaDA's `generate`
    # does; EvoToken's loop stops): with rng=reference those passes' draws are made and discarded.
    release_runs_every_step: ClassVar[bool] = False
    # Without a threshold, `update` commits exactly counts[b] [MASK]s of every open row (hard-mask and
    # evotoken do: LLaDA's schedule never asks for more than a row holds): the loop then tracks what is
    # left on the host (`_takes_pass`). False (the safe default for other decoders) reads it back every pass.
    exact_schedule: ClassVar[bool] = False
    # `request.on_final` gets a `FinalPrefix` at each block boundary (before a block, every position is
    # final): a streamed answer needs no per-pass trace. A decoder without it is traced instead.
    final_events: ClassVar[bool] = True

    @property
    def reference_rng(self) -> bool:
        return getattr(self.config, "rng", "fast") == "reference"

    def split(self, request: GenerationRequest) -> bool:
        """Whether each row runs as a program of its own (sharing the step's forward with every other row,
        each with its own random stream): always, cached or not (the engine keeps each row's KV slot),
        except rng=reference, which decodes the rows one after another from one stream."""
        return not self.reference_rng

    def sequential(self, request: GenerationRequest) -> bool:
        """rng=reference: the release decodes one prompt at a time from one random stream (batch-1
        semantics), so the rows are one program that holds one live row at a time."""
        return self.reference_rng

    # hard-mask and evotoken: rows of several requests may decode as ONE program with a random stream per row
    # (`merge_key`); the update then receives a list of generators (`per_row`), one per row.
    merges_rows: ClassVar[bool] = False

    def merge_key(self, model: Any, request: GenerationRequest) -> Hashable | None:
        """What a one-row request must share with others for the engine to decode their rows as one program
        (`program(row_streams=True)`: the rows step in lockstep, each row drawing from its own seed, so each
        decodes what it decodes alone), or None when it must run alone: a decoder class that does not say it
        can (`merges_rows` set in the class itself: a subclass that overrides hooks must say so again),
        rng=reference, a threshold (rows would finish blocks at passes of their own), and a decoder without
        `exact_schedule`."""
        if not type(self).__dict__.get("merges_rows", False) or self.reference_rng or self.threshold is not None \
                or not self.exact_schedule:
            return None
        r = request
        return (*self.group_key(model, r.sampling), r.gen_length, r.block_length, r.steps,
                r.trace and r.on_event is not None, r.logprobs, row_seed(r, 0) is None)

    def program(self, model: Any, request: GenerationRequest, *, row_streams: bool = False) -> Program:
        """The block loop as a program: yields each forward pass, receives its logits. One random stream per
        program: a row decoded alone (how the engine and `generate` run every row) draws from its own seed;
        a cohort program of several rows (a library caller's) shares its first row's; rng=reference runs
        the rows in turn on the first row's stream. Not wrapped in `torch.no_grad()`: that wrapper enters and
        leaves the mode at every resumption (four times per row per engine step); its drivers (`Engine.step`,
        `drive`) run it under no_grad instead."""
        if row_streams:  # a merged program (`merge_key`): every row its own stream, as when decoded alone
            generators = [_generator(model, row_seed(request, i)) for i in range(len(request.prompts))]
            return (yield from self._block_loop(model, request, generators))
        generator = _generator(model, row_seed(request, 0))
        if not self.reference_rng or len(request.prompts) == 1:
            return (yield from self._block_loop(model, request, generator))
        t0, rows, nfe = time.perf_counter(), [], 0
        for index, prompt in enumerate(request.prompts):
            part = replace(request, prompts=[prompt], seeds=None, on_event=shifted_listener(request.on_event, index),
                           on_final=shifted_listener(request.on_final, index))
            result = yield from self._block_loop(model, part, generator)
            rows += result.rows
            nfe += result.nfe
        return GenerationResult(rows=rows, nfe=nfe, seconds=time.perf_counter() - t0)

    def _draws(self, model: Any, generator: Any, canvas: Canvas, request: GenerationRequest) -> Any:
        """What a pass's update draws from: the row's generator, or the release's draws of the pass."""
        if not self.reference_rng:
            return generator
        return release_draws(generator, canvas.batch, canvas.length, model.vocab_size,
                             temperature=request.temperature,
                             random_remasking=getattr(self.config, "remasking", "") == "random",
                             device=canvas.x.device)

    def _block_loop(self, model: Any, request: GenerationRequest, generator: Any) -> Program:
        t0 = time.perf_counter()
        layout = block_layout(request.gen_length, request.block_length, request.steps)
        canvas = build_canvas(request.prompts, request.gen_length, mask_id=model.mask_id, pad_id=model.eos_id,
                              max_length=model.max_length, device=model.device)
        state = self.start(model, canvas, request)
        cache = canvas.length if self.cache_mode != "none" else None  # the engine's KV slots, this long
        recorder = recorder_for(request, canvas.batch, canvas.length, model)
        sampling = request.sampling  # the temperature, with the request's filters
        nfe, row_nfe = 0, [0] * canvas.batch
        for index in range(layout.num_blocks):
            start = canvas.gen_start + index * layout.block_length
            block = Block(index, start, start + layout.block_length)
            schedule = transfer_schedule(layout.block_length, layout.steps_per_block)
            step = 0
            while True:
                open_rows = None  # computed only where needed: a grouped update finds it in its own rows
                takes_pass = self._takes_pass(canvas.batch, schedule, step, first=index == 0 and step == 0)
                if takes_pass is None:  # rows finish at passes of their own: the engine reads it with the others
                    open_rows = self.open_rows(model, canvas, block)
                    takes_pass = yield HostRead(open_rows)
                if not any(takes_pass) or (self.threshold is None and step >= len(schedule)):
                    if self.reference_rng and self.release_runs_every_step:
                        for _ in range(step, len(schedule)):  # passes the release runs on a full block
                            self._draws(model, generator, canvas, request)
                    break
                tracing = request.trace and request.on_event is not None
                traced = self._describe(model, state, canvas) if tracing else None
                if traced is not None and open_rows is None:
                    open_rows = self.open_rows(model, canvas, block)
                lo, hi = self.feed_range(canvas, block, step == 0)
                block.fed = (lo, hi)
                forward_pass, cols = self.forward(model, state, canvas, block, lo, hi, cache)
                logits = yield forward_pass
                counts = [schedule[step] if t else 0 for t in takes_pass] if self.threshold is None else []
                draws = self._draws(model, generator, canvas, request)
                randomness = draws.cols(*cols) if self.reference_rng else draws
                committed, revised = yield from self.update_program(
                    model, state, canvas, logits, cols, block, counts, open_rows, randomness, sampling,
                    masks=recorder is not None or traced is not None)
                if recorder is not None:
                    a, b = cols
                    recorder.record(logits, a, (committed | revised)[:, a:b], canvas.x[:, a:b], model.mask_id)
                nfe += 1
                row_nfe = [n + t for n, t in zip(row_nfe, takes_pass)]
                if traced is not None:
                    self._emit(request, state, canvas, block, traced, row_nfe, open_rows, committed, revised)
                if request.on_pass is not None:
                    request.on_pass(nfe)
                step += 1
            self.end_block(model, state, canvas, block)
            if request.on_final is not None and index + 1 < layout.num_blocks:  # the last block: the result says
                final = yield HostRead(canvas.generated())  # read with the other rows' reads of the step
                for b in range(canvas.batch):
                    request.on_final(FinalPrefix(row=b, tokens=final[b], end=block.end - canvas.gen_start))
        gen = yield HostRead(canvas.generated())  # read with the other rows' reads of the step
        rows = [RowResult(token_ids=gen[b], nfe=row_nfe[b],
                          logprobs=None if recorder is None else recorder.row(b, canvas.gen_start))
                for b in range(canvas.batch)]
        return GenerationResult(rows=rows, nfe=nfe, seconds=time.perf_counter() - t0)

    def _takes_pass(self, rows: int, schedule: list[int], step: int, first: bool = False) -> list[bool] | None:
        """On the host, which rows take the next pass (they still hold a [MASK] in the block: they get the
        schedule's count and it counts in their NFE), or None when the device must say (`open_rows` is
        read back: the one read of a pass, which the engine makes for all rows of a step together). With a
        threshold rows finish at passes of their own. Without one, a decoder whose update commits exactly
        `counts[b]` [MASK]s of each open row (`exact_schedule`) leaves sum(schedule[step:]) of them in every
        row, so the host knows without asking the device, and never waits for it between passes. Before
        the first pass every generated position is [MASK]: every row takes it."""
        if self.threshold is None and self.exact_schedule:
            return [sum(schedule[step:]) > 0] * rows
        if first:
            return [True] * rows
        return None

    # -- trace -----------------------------------------------------------------------------------
    def _describe(self, model, state, canvas):
        return [self.describe_inputs(model, state, canvas, b) for b in range(canvas.batch)]

    def _emit(self, request, state, canvas, block, traced, row_nfe, open_rows, committed, revised):
        g0 = canvas.gen_start
        for b in open_rows.nonzero().flatten().tolist():
            states, candidates = traced[b]
            request.on_event(StepEvent(
                step=row_nfe[b], row=b, block=(block.start - g0, block.end - g0), states=states,
                tokens=canvas.x[b, g0:].tolist(), confidence=self.confidences(state, canvas, b),
                committed=[int(i) - g0 for i in committed[b].nonzero().flatten().tolist()],
                revised=[int(i) - g0 for i in revised[b].nonzero().flatten().tolist()],
                candidates=candidates))


def _generator(model: Any, seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=model.device).manual_seed(seed)


def per_row(generator: Any, rows: int) -> list[Any]:
    """One random stream per row for a grouped update: a merged program's own list, or its one generator."""
    return generator if isinstance(generator, list) else [generator] * rows
