"""The semi-autoregressive block loop shared by hard-mask and evotoken, with Fast-dLLM's cache policies.

For each block: build LLaDA's linear schedule, then run forward passes until no [MASK] is left in the
block. A decoder plugs in how the inputs are built (`inputs`) and what a pass changes (`update`); the loop
owns the canvas, the cache, the per-row bookkeeping of a batch, NFE and the trace.

Cache policies (spec 6.3): `none` feeds the whole canvas every pass (the faithful reference); `prefix`
runs one full pass at each block start, then feeds the current block and everything after it; `dual`
runs one full pass at each block start, then feeds only the current block. Passes that can commit
nothing are skipped (the references run them; they change no token, so outputs are identical).

Models with shifted logits (Dream) predict position i from the output at i - 1; the window fed to the
model then starts one position earlier so that output exists (spec 7.2).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from evotok_cli.decoding.api import GenerationRequest, GenerationResult, RowResult, StepEvent
from evotok_cli.decoding.canvas import Canvas, build_canvas
from evotok_cli.decoding.schedule import block_layout, transfer_schedule
from evotok_cli.runtime.cache import KVCache


class Block:
    """Canvas columns [start, end) of the block being decoded, and its index."""

    def __init__(self, index: int, start: int, end: int):
        self.index, self.start, self.end = index, start, end


class BlockwiseDecoder:
    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any):
        self.config = config

    # -- hooks -----------------------------------------------------------------------------------
    def start(self, model: Any, canvas: Canvas, request: GenerationRequest) -> Any:
        """Per-generation state beyond the canvas (confidences, soft inputs...)."""
        return None

    def inputs(self, model: Any, state: Any, canvas: Canvas, lo: int, hi: int, block: Block, first: bool) -> dict:
        """Model inputs for canvas columns [lo, hi): `input_ids=`, or `soft_inputs=(ids, weights)` that the
        model mixes into input embeddings."""
        return {"input_ids": canvas.x[:, lo:hi]}

    def logits_range(self, canvas: Canvas, lo: int, hi: int, block: Block) -> tuple[int, int]:
        """Columns whose logits the update needs (the LM head runs only there)."""
        return block.start, block.end

    def update(self, model: Any, state: Any, canvas: Canvas, logits: torch.Tensor, cols: tuple[int, int],
               block: Block, counts: list[int], active: torch.Tensor, generator: torch.Generator | None,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply one pass; return (committed, revised) bool masks over the canvas."""
        raise NotImplementedError

    def end_block(self, model: Any, state: Any, canvas: Canvas, block: Block) -> None:
        """Called when every row has filled the block."""

    def describe_inputs(self, model: Any, state: Any, canvas: Canvas, row: int, first: bool
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
                cache: KVCache | None, first: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        cols = self.logits_range(canvas, lo, hi, block)
        shift = int(model.shifted_logits)
        # Dream predicts position i from the output at i - 1: that position must be fed too. Under a cache
        # it is re-fed (its K/V refreshed like the rest of the window), the same approximation as the window.
        lo = min(lo, cols[0] - shift)
        logits = model(**self.inputs(model, state, canvas, lo, hi, block, first),
                       pad_offsets=canvas.pad_offsets, position_ids=canvas.positions[:, lo:hi], cache=cache,
                       start=lo, logits_slice=(cols[0] - shift - lo, cols[1] - shift - lo))
        return logits, cols

    @torch.no_grad()
    def generate(self, model: Any, request: GenerationRequest) -> GenerationResult:
        t0 = time.perf_counter()
        layout = block_layout(request.gen_length, request.block_length, request.steps)
        canvas = build_canvas(request.prompts, request.gen_length, mask_id=model.mask_id, pad_id=model.eos_id,
                              max_length=model.max_length, device=model.device)
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(request.seed)
        state = self.start(model, canvas, request)
        cache = model.new_cache(canvas.batch, canvas.length) if self.cache_mode != "none" else None
        nfe, row_nfe, first = 0, [0] * canvas.batch, True
        for index in range(layout.num_blocks):
            start = canvas.gen_start + index * layout.block_length
            block = Block(index, start, start + layout.block_length)
            schedule = transfer_schedule(layout.block_length, layout.steps_per_block)
            step = 0
            while True:
                active = (canvas.x[:, block.start:block.end] == model.mask_id).any(dim=1)
                live = active.tolist()  # the one read-back per pass: is anything left to decode?
                if not any(live) or (self.threshold is None and step >= len(schedule)):
                    break
                tracing = request.trace and request.on_event is not None
                traced = self._describe(model, state, canvas, first) if tracing else None
                lo, hi = self.feed_range(canvas, block, step == 0)
                logits, cols = self.forward(model, state, canvas, block, lo, hi, cache, first)
                counts = [schedule[step] if a else 0 for a in live] if self.threshold is None else []
                committed, revised = self.update(model, state, canvas, logits, cols, block, counts, active,
                                                 generator, request.temperature)
                nfe += 1
                row_nfe = [n + a for n, a in zip(row_nfe, live)]
                if traced is not None:
                    self._emit(request, state, canvas, block, traced, row_nfe, active, committed, revised)
                if request.on_pass is not None:
                    request.on_pass(nfe)
                step += 1
                first = False
            self.end_block(model, state, canvas, block)
        gen = canvas.generated().tolist()
        rows = [RowResult(token_ids=gen[b], nfe=row_nfe[b]) for b in range(canvas.batch)]
        return GenerationResult(rows=rows, nfe=nfe, seconds=time.perf_counter() - t0)

    # -- trace -----------------------------------------------------------------------------------
    def _describe(self, model, state, canvas, first):
        return [self.describe_inputs(model, state, canvas, b, first) for b in range(canvas.batch)]

    def _emit(self, request, state, canvas, block, traced, row_nfe, active, committed, revised):
        g0 = canvas.gen_start
        for b in active.nonzero().flatten().tolist():
            states, candidates = traced[b]
            request.on_event(StepEvent(
                step=row_nfe[b], row=b, block=(block.start - g0, block.end - g0), states=states,
                tokens=canvas.x[b, g0:].tolist(), confidence=self.confidences(state, canvas, b),
                committed=[int(i) - g0 for i in committed[b].nonzero().flatten().tolist()],
                revised=[int(i) - g0 for i in revised[b].nonzero().flatten().tolist()],
                candidates=candidates))
