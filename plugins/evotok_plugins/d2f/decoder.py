"""d2f: Discrete Diffusion Forcing's pipelined blockwise decoding (spec 6.4), with an exact KV cache.

Attention is block-causal (the prompt is block 0; a generated block sees the prompt, the blocks before
it and itself), so the keys and values of a finished block never change and caching them is exact.
Blocks are added while the last one is decoded far enough, activated fully when their predecessor is
almost done, and decoded in parallel from one forward pass:

  per iteration
    1. finished blocks become `to_cache`, in order (only when no earlier block is still active);
    2. add a semi-activated block when the last block's progress >= block_add_threshold, no EOS has been
       committed and fewer than max_new_tokens // block_size blocks exist (at most one per iteration);
    3. a block whose progress >= decoded_token_threshold fully activates the next one;
    4. one forward from the first block not yet cached to the end; `to_cache` blocks are written into
       the cache by this pass (lazily, from their final tokens) and become `in_cache`;
    5. every active block commits its [MASK] positions whose confidence > skip_threshold (strict, in
       float32); a fully activated block with none commits its single most confident one.

`soft: true` adds EvoToken states inside active blocks (our own combination; no public implementation
exists): [MASK] positions that have a prediction are fed as Soft([MASK]+V) (mask weight alpha), committed
positions as Soft(V) (top-k mixture) and may be revised (strictly higher confidence) until their block
completes; from then on the block is fed and cached as hard tokens ([Decode]). A block added in this
iteration has no prediction yet and is fed as [MASK].

Shifted-logit models (Dream) read position i from the output at i - 1; when i - 1 is already cached, the
output saved from the pass that cached it is used (exact: block-causal outputs never change).

[MASK] is never a candidate (a trained model never predicts it; allowing it could stall a block).

Each row is a program of its own (each row's pipeline differs): in the step engine the rows share one
forward per step, and step 5 runs once per step for the active blocks of every row with the same options
and block size (a grouped `Update`, blocks.py); each row's tokens and NFE are those of decoding it alone.
Rows of requests the engine admits together decode as ONE program that keeps a pipeline per row
(merged.py), so that the host's work per step does not grow with the rows; `generate` decodes a request's
rows that way too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import (
    FinalPrefix,
    GenerationRequest,
    GenerationResult,
    RowResult,
    StepEvent,
    option,
    row_seed,
)
from evotok_cli.decoding.canvas import build_canvas
from evotok_cli.decoding.engine import ForwardPass, HostRead, Program, Update, drive
from evotok_cli.decoding.evolution import as_decoded
from evotok_cli.decoding.logprobs import recorder_for
from evotok_cli.decoding.soft import input_states, one_hot_slots

from .blocks import BlockStep, decode_blocks
from .merged import merged_program
from .pipeline import PipelineBlock, RowRun, block_causal_mask

__all__ = ["D2FConfig", "D2FDecoder", "PipelineBlock", "RowRun", "block_causal_mask", "default_block_size"]

PREFERRED_BLOCK_SIZE = 64  # published D2F-LLaDA GSM8K


def default_block_size(budget: int, preferred: int = PREFERRED_BLOCK_SIZE) -> int:
    """The block size when none is given: the largest that divides the token budget and is at most the
    preferred 64 (64 itself where it divides it, the budget itself when that is smaller), so that any
    canvas decodes with no option: the bundled model's 48 tokens in one block of 48, 128 in two of 64."""
    return next(size for size in range(min(preferred, budget), 0, -1) if budget % size == 0)


@dataclass
class D2FConfig:
    block_size: int | None = option(None, "tokens per pipeline block; unset: it fits the token budget, the largest "
                                          f"size up to {PREFERRED_BLOCK_SIZE} that divides it ({PREFERRED_BLOCK_SIZE} "
                                          "as published for D2F-LLaDA GSM8K where it divides; 48 tokens: one block "
                                          "of 48)", min=1)
    block_add_threshold: float = option(0.7, "add a block when the last one is this decoded", min=0.0, max=1.0)
    decoded_token_threshold: float = option(0.95, "fully activate the next block at this progress", min=0.0,
                                            max=1.0)
    skip_threshold: float = option(0.9, "commit [MASK] positions whose confidence exceeds this", min=0.0, max=1.0)
    max_new_tokens: int | None = option(None, "generation budget (default: --gen-length)", min=1)
    cache: bool = option(True, "cache finished blocks (exact under block-causal attention)")
    soft: bool = option(False, "EvoToken soft states inside active blocks (see `evotok decoders --details d2f`)")
    k_soft: int = option(3, "soft mode: top-k candidates per soft input", min=1, max="vocab_size")
    alpha: float = option(0.7, "soft mode: [MASK] weight in Soft([MASK]+V) inputs", min=0.0, max=1.0,
                          max_open=True)


class D2FDecoder:
    name = "d2f"
    final_events = True  # `request.on_final` hears when blocks leave `active` (a stream needs no trace)
    Config = D2FConfig
    settings_used = ("gen_length", "temperature")  # blocks come from block_size, passes from the pipeline

    def __init__(self, config: D2FConfig):
        self.config = config

    def check_settings(self, *, gen_length: int, **_: int) -> int:
        """The token budget, which whole pipeline blocks must fill."""
        cfg = self.config
        budget = cfg.max_new_tokens or gen_length
        if cfg.block_size is not None and budget % cfg.block_size:
            raise ConfigError(f"max new tokens {budget} is not a multiple of block_size {cfg.block_size}",
                              where="--opt block_size",
                              fix="pick a block size that divides --gen-length (or --opt max_new_tokens), or "
                                  "leave block_size out to fit it")
        return budget

    def block_size(self, budget: int) -> int:
        """The pipeline's block size for a token budget: the option, else `default_block_size`."""
        return self.config.block_size or default_block_size(budget)

    @property
    def block_constraint(self) -> int | None:
        """The block every canvas must be a whole number of, when the options fix one (`canvas_plan`)."""
        return self.config.block_size

    def generate(self, model, request: GenerationRequest) -> GenerationResult:
        """Decode the request's rows together as one merged program (merged.py: each row decodes what it
        decodes alone, in one forward per pass for all rows), or one after another for a subclass that does
        not say it merges (the CLI runs `program` in the step engine)."""
        together = len(request.prompts) > 1 and type(self).__dict__.get("merges_rows", False)
        return drive(model, self.program(model, request, row_streams=together))

    def split(self, request: GenerationRequest) -> bool:
        """Each row is a pipeline of its own: one program per row."""
        return True

    merges_rows = True  # one-row requests admitted together decode as one program (merged.py)

    def merge_key(self, model, request: GenerationRequest) -> Hashable | None:
        """What a one-row request must share with others for the engine to decode their rows as one program
        (`program(row_streams=True)`, merged.py: each row keeps its own pipeline and random stream, so each
        decodes what it decodes alone): the model, the options, the budget, the sampling and what the
        request asks for per pass. None for a subclass that does not set `merges_rows` itself (it may
        override what the merged program does not call)."""
        if not type(self).__dict__.get("merges_rows", False):
            return None
        r = request
        return (id(model), repr(self.config), r.gen_length, repr(r.sampling), r.trace and r.on_event is not None,
                r.logprobs, row_seed(r, 0) is None)

    @torch.no_grad()
    def program(self, model, request: GenerationRequest, *, row_streams: bool = False) -> Program:
        """Each row's pipeline in turn (one row at a time: how the engine runs a row alone and how `generate`
        decodes), or with `row_streams` every row at once as one merged program (merged.py)."""
        if row_streams:
            return (yield from merged_program(self, model, request))
        t0 = time.perf_counter()
        budget = self.check_settings(gen_length=request.gen_length)
        rows, nfe = [], 0
        for index, prompt in enumerate(request.prompts):
            seed = row_seed(request, index)
            generator = None if seed is None else torch.Generator(device=model.device).manual_seed(seed)
            canvas = build_canvas([prompt], budget, mask_id=model.mask_id, pad_id=model.eos_id,
                                  max_length=model.max_length, device=model.device)
            run = yield from self._decode_row(model, canvas.x, len(prompt), budget, request, generator, index)
            gen = run.x[0, len(prompt):]
            gen = gen.masked_fill(gen == model.mask_id, model.eos_id)  # blocks never added (after EOS)
            rows.append(RowResult(token_ids=(yield HostRead(gen)), nfe=run.nfe,
                                  logprobs=None if run.logprobs is None else run.logprobs.row(0, len(prompt))))
            nfe += run.nfe
        return GenerationResult(rows=rows, nfe=nfe, seconds=time.perf_counter() - t0)

    # -- one row ---------------------------------------------------------------------------------
    def _decode_row(self, model, x, prompt_len, budget, request, generator,
                    row) -> Generator[ForwardPass | HostRead | Update, Any, RowRun]:
        """One row's pipeline. Per iteration: the blocks' states (steps 1-3), one forward (step 4), the
        EvoToken rule over the active blocks (step 5: one grouped `Update` with other rows' blocks), the pass's
        one host read, then what listeners hear."""
        cfg = self.config
        run = RowRun(x=x, prompt=PipelineBlock(0, prompt_len, state="to_cache", full=True),
                     size=self.block_size(budget), logprobs=recorder_for(request, 1, x.shape[1], model))
        conf = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        soft_ids, soft_w = one_hot_slots(x, cfg.k_soft, model.dtype)
        max_blocks = budget // run.size
        tracing = request.trace and request.on_event is not None
        final = 0  # generated positions before this are final: the blocks before the first active one
        while True:
            active = self._schedule(run, max_blocks)
            if not active:
                break
            states = self._trace_states(run, soft_ids, soft_w, model.mask_id, prompt_len) if tracing else None
            logits = yield from self._forward(model, run, active, soft_ids, soft_w, row)
            step = yield from self._decode_blocks(model, run, active, logits, conf, soft_ids, soft_w,
                                                  request.sampling, generator)
            tokens = yield from self._read_back(model, run, active, step, prompt_len,
                                                streaming=request.on_final is not None)
            if request.on_pass is not None:
                request.on_pass(run.nfe)
            if states is not None:
                request.on_event(self._event(run, row, active, prompt_len, states, conf, step))
            if request.on_final is not None:
                final = self._announce_final(request, run, row, tokens, prompt_len, final)
        return run

    def _schedule(self, run: RowRun, max_blocks: int) -> list[PipelineBlock]:
        """Steps 1-3: retire finished blocks, maybe add one, activate; the blocks this pass decodes. One
        loop per step and no call per block: merged programs run it for every row every step (issue 25's
        host work that should not grow with the rows). A block's progress is 1 - masks_left / size."""
        blocks, cfg = run.blocks, self.config
        earlier_active = False  # 1: an active block with no [MASK] left retires unless an earlier one is active
        for b in blocks:
            if b.state == "active":
                if b.masks_left == 0 and not earlier_active:
                    b.state = "to_cache"
                else:
                    earlier_active = True
        last_progress = 1.0 - blocks[-1].masks_left / (blocks[-1].end - blocks[-1].start) if blocks else 1.0
        if last_progress >= cfg.block_add_threshold and not run.eos and len(blocks) < max_blocks:  # 2: add one,
            start = blocks[-1].end if blocks else run.prompt.end  # still [MASK]: the canvas is built so and
            blocks.append(PipelineBlock(start, start + run.size, masks_left=run.size))  # nothing writes past it
        previous_progress, active = 1.0, []  # 3: fully activated once the block before is decoded enough
        for b in blocks:
            if previous_progress >= cfg.decoded_token_threshold:
                b.full = True
            previous_progress = 1.0 - b.masks_left / (b.end - b.start)
            if b.state == "active":
                active.append(b)
        return active

    def _forward(self, model, run, active, soft_ids, soft_w, row) -> Generator[ForwardPass, torch.Tensor, torch.Tensor]:
        """Step 4: one block-causal forward from the first block not yet cached to the end, which writes the
        `to_cache` blocks into the row's KV slot; the logits of the active blocks' positions [a, hi)."""
        cfg = self.config
        chain = [run.prompt, *run.blocks]
        lo, hi = run.uncached_start(cfg.cache), run.blocks[-1].end
        inputs = self._inputs(model, run, soft_ids, soft_w, lo, hi)
        a = active[0].start
        shift = int(model.shifted_logits)
        first_out = max(lo, a - shift)
        mask = block_causal_mask(chain, lo, hi, run.x.device)
        cache = run.x.shape[1] if cfg.cache else None  # the engine's KV slot for this row, this long
        out = (yield ForwardPass(inputs, position_ids=None, attention_mask=mask, kv_length=cache, kv_memory=row,
                                 start=lo, logits_slice=(first_out - lo, hi - lo)))[0]  # (hi - first_out, V)
        run.nfe += 1
        logits = self._align(out, a, first_out, hi, shift, run)
        if cfg.cache:
            run.mark_cached()
        if shift:  # keep the output before the first uncached position: the next pass needs it
            next_lo = run.uncached_start(True, hi)
            if first_out <= next_lo - 1 < hi:
                run.last_output = out[next_lo - 1 - first_out]
        return logits

    @staticmethod
    def _read_back(model, run, active, step, prompt_len, *, streaming: bool) -> Generator[HostRead, list, list]:
        """The pass's one read (the engine makes it with the other rows' reads of the next step): masks left
        per active block, whether an EOS was committed (it stops new blocks) and, when streaming, the row's
        generated tokens, which it returns."""
        x, a = run.x, active[0].start
        masked = (x[0, a:active[-1].end] == model.mask_id).view(len(active), run.size).sum(-1)
        eos = ((step.tokens == model.eos_id) & step.committed).any()
        streamed = [x[0, prompt_len:]] if streaming else []
        values = yield HostRead(torch.cat([masked, eos.long()[None], *streamed]))
        left, stop, tokens = values[:len(active)], values[len(active)], values[len(active) + 1:]
        for b, n in zip(active, left):
            b.masks_left, b.predicted = n, True
        run.eos = run.eos or bool(stop)
        return tokens

    @staticmethod
    def _event(run, row, active, prompt_len, states, conf, step) -> StepEvent:
        """The trace of the pass, in generated positions."""
        a = active[0].start
        return StepEvent(
            step=run.nfe, row=row, block=(a - prompt_len, active[-1].end - prompt_len),
            states=states[0], tokens=run.x[0, prompt_len:].tolist(),
            confidence=[float(v) if v > 0 else None for v in conf[0, prompt_len:].tolist()],
            committed=[a + i - prompt_len for i in step.committed[0].nonzero().flatten().tolist()],
            revised=[a + i - prompt_len for i in step.revised[0].nonzero().flatten().tolist()],
            candidates=states[1], blocks=[b.describe(prompt_len) for b in run.blocks])

    @staticmethod
    def _announce_final(request, run, row, tokens, prompt_len, final) -> int:
        """Tell `request.on_final` when blocks have left `active` (in order) since the last pass: what a
        trace's `blocks` would say final, without building the trace. Returns the new final end."""
        end = final
        for b in run.blocks:
            if b.state == "active":
                break
            end = b.end - prompt_len
        if end > final:
            request.on_final(FinalPrefix(row=row, tokens=tokens, end=end))
        return max(end, final)

    @staticmethod
    def _align(out, a, first_out, hi, shift, run) -> torch.Tensor:
        """Logits for positions [a, hi). Unshifted models: the outputs themselves. Shifted (Dream): the
        output at i - 1, which for the first uncached position is the saved output of the cached prefix."""
        if not shift:
            return out
        if first_out < a:  # a - 1 was fed in this pass
            return out[: hi - a]
        return torch.cat([run.last_output[None], out[: hi - a - 1]])

    def _inputs(self, model, run, soft_ids, soft_w, lo, hi) -> dict:
        if not self.config.soft:
            return {"input_ids": run.x[:, lo:hi]}
        # only unfinished active blocks that already have a prediction are soft; the rest is fed one-hot
        hard = _hard_columns(run.blocks, lo, hi, self._is_soft, run.x.device)
        return {"soft_inputs": as_decoded(soft_ids[:, lo:hi], soft_w[:, lo:hi], run.x[:, lo:hi], hard)}

    @staticmethod
    def _is_soft(b: PipelineBlock) -> bool:
        return b.state == "active" and b.predicted and b.masks_left > 0

    def _decode_blocks(self, model, run, active, logits, conf, soft_ids, soft_w, temperature,
                       generator) -> Generator[Update, Any, BlockStep]:
        """Step 5: the EvoToken rule over the active blocks with D2F's arguments, as one grouped `Update` (the
        engine runs it once per step for the blocks of every row with these options: blocks.py); the
        logprobs of what it decided, when asked."""
        step = yield from decode_blocks(model, self.config, self.group_key(model, temperature), run, active, logits,
                                        conf, soft_ids, soft_w, temperature, generator)
        if run.logprobs is not None:
            a, hi = active[0].start, active[-1].end
            run.logprobs.record(logits[None, : hi - a], a, step.committed | step.revised, step.tokens, model.mask_id)
        return step  # EOS (not end-of-turn) among its commits stops new blocks: the caller reads it

    def group_key(self, model, temperature) -> tuple:
        """What rows updated in one call must share besides their shapes (the block size): the model, the
        options step 5 reads (`blocks.d2f_blocks`; the pipeline's thresholds, budget and cache do not change
        it, so rows that differ only there share the call) and the sampling, its filters included."""
        cfg = self.config
        return (id(model), cfg.skip_threshold, cfg.soft, cfg.k_soft, cfg.alpha, repr(temperature))

    def _trace_states(self, run, soft_ids, soft_w, mask_id, prompt_len):
        gen = run.x[0, prompt_len:]
        if not self.config.soft:
            return input_states(None, None, gen, mask_id), None
        hard = _hard_columns(run.blocks, prompt_len, run.x.shape[1], self._is_soft, run.x.device)
        ids, w = as_decoded(soft_ids[0, prompt_len:], soft_w[0, prompt_len:].double(), gen, hard)
        states = input_states(ids, w, gen, mask_id)
        cands = [[(int(i), round(float(v), 6)) for i, v in zip(pi.tolist(), pw.tolist()) if v > 0]
                 for pi, pw in zip(ids, w)]
        return states, cands


def _hard_columns(blocks: list[PipelineBlock], lo: int, hi: int, is_soft: Callable[[PipelineBlock], bool],
                  device: torch.device) -> torch.Tensor:
    """(hi - lo,) bool: the columns of the blocks that are not soft, fed one-hot on their tokens ([Decode])."""
    hard = torch.zeros(hi - lo, dtype=torch.bool, device=device)
    for b in blocks:
        if not is_soft(b):
            hard[max(b.start, lo) - lo:max(min(b.end, hi) - lo, 0)] = True
    return hard
