"""evotoken: progressive token evolution (EvoToken-DLM), faithful to the release's `generate_soft_token`.

Every generated position moves [MASK] -> Soft([MASK]+V) -> Soft(V) -> [Decode]. After each pass:
1. candidates x0 (argmax, or Gumbel-max at temperature > 0; never [MASK]) and their float64 untempered
   probabilities conf0;
2. commit the n most confident [MASK] positions of the current block (LLaDA's schedule): they enter
   Soft(V) and store conf0 as their confidence c;
3. revise: a decoded position of the current block takes x0 when conf0 > c (strictly), never re-masked;
4. rebuild the soft inputs of every position from the top-k of the prediction (spec 1.3); positions
   before the current block are one-hot ([Decode]).
Quirks kept on purpose (spec 1.9): the first pass feeds hard [MASK]s (Q1); a finished block is still fed
as Soft(V) in the first pass of the next block (Q2); future blocks get Soft([MASK]+V) inputs (Q3).
With a KV cache the finished block is fed as [Decode] at the next block's start instead: its K/V are
then cached for the whole block, and they must describe its final tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from evotok_cli.decoding.api import option
from evotok_cli.decoding.blockwise import BlockwiseDecoder
from evotok_cli.decoding.canvas import Canvas
from evotok_cli.decoding.schedule import gumbel_candidates, select_transfer, token_confidence
from evotok_cli.decoding.soft import input_states, one_hot_slots, soft_weights, top_k_relative


@dataclass
class EvoTokenConfig:
    k_soft: int = option(3, "top-k candidates mixed into each soft input", min=1)
    alpha: float = option(0.7, "weight of the [MASK] embedding in Soft([MASK]+V) inputs", min=0.0, max=1.0,
                          max_open=True)
    remasking: Literal["low_confidence", "random"] = option(
        "low_confidence", "rank masked positions by the candidate's probability, or randomly")
    threshold: float | None = option(
        None, "commit every candidate with confidence >= this (always at least one per pass)",
        min=0.0, max=1.0, min_open=True)
    cache: Literal["none", "prefix", "dual"] = option(
        "none", "KV cache policy (Fast-dLLM semantics); 'none' is the faithful reference")


class EvoTokenState:
    def __init__(self, canvas: Canvas, k: int, dtype: torch.dtype):
        self.confidence = torch.zeros(canvas.x.shape, dtype=torch.float64, device=canvas.x.device)  # c
        self.ids, self.weights = one_hot_slots(canvas.x, k, dtype)  # (B, L, k+1) soft inputs
        self.soft = False  # False until the first pass has run (Q1: the first pass feeds hard ids)


class EvoTokenDecoder(BlockwiseDecoder):
    name = "evotoken"
    Config = EvoTokenConfig

    def start(self, model, canvas, request):
        return EvoTokenState(canvas, self.config.k_soft, model.dtype)

    def logits_range(self, canvas, lo, hi, block):
        # soft states are rebuilt for every fed generated position (future blocks included, Q3)
        return max(lo, canvas.gen_start), hi

    def inputs(self, model, state, canvas, lo, hi, block, first):
        if not state.soft:
            return {"input_ids": canvas.x[:, lo:hi]}
        return {"soft_inputs": (state.ids[:, lo:hi], state.weights[:, lo:hi])}

    def update(self, model, state, canvas, logits, cols, block, counts, active, generator, temperature):
        cfg = self.config
        a, b = cols
        s, e = max(a, block.start), min(b, block.end)  # only block columns can be committed or revised
        scores = logits  # this pass's own tensor: nothing reads it after this update, so it is edited in place
        if temperature == 0:  # [MASK] set to -inf in the same tensor the softmax reads (Q6)
            scores[..., model.mask_id] = float("-inf")
        # sampled: p keeps the mask's (tiny) mass, as the release does
        relative, top_ids = top_k_relative(scores, cfg.k_soft)  # soft states of every column
        in_block = scores[:, s - a:e - a]
        x0 = gumbel_candidates(in_block, temperature, generator, exclude=model.mask_id)
        if cfg.remasking == "random":
            conf0 = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        elif temperature == 0:  # x0 is the top-1 candidate; only block columns need the normaliser
            conf0 = token_confidence(in_block, top_ids[:, s - a:e - a, 0], dtype=torch.float64)
        else:
            conf0 = token_confidence(in_block, x0, dtype=torch.float64)
        x = canvas.x[:, s:e]  # a view: writes go to the canvas
        c = state.confidence[:, s:e]
        live = active[:, None]
        eligible = (x == model.mask_id) & live
        chosen = select_transfer(conf0, eligible, counts, cfg.threshold)
        x[chosen] = x0[chosen]
        c[chosen] = conf0[chosen]
        revise = (x != model.mask_id) & live & (conf0 > c)  # strictly higher, never re-masks
        changed = revise & (x0 != x)
        x[revise] = x0[revise]
        c[revise] = conf0[revise]
        ids, weights = soft_weights(relative, top_ids, canvas.x[:, a:b], model.mask_id, cfg.alpha)
        ids = torch.where(live[..., None], ids, state.ids[:, a:b])
        weights = torch.where(live[..., None], weights.to(state.weights.dtype), state.weights[:, a:b])
        state.ids[:, a:b], state.weights[:, a:b] = ids, weights
        self._freeze_before(state, canvas, block.start, rows=active)
        state.soft = True
        return _full(canvas, chosen, s, e), _full(canvas, changed, s, e)

    def end_block(self, model, state, canvas, block):
        if self.cache_mode != "none":  # the next block's cached prefix must hold the final tokens
            self._freeze_before(state, canvas, block.end, rows=None)

    @staticmethod
    def _freeze_before(state, canvas, end, rows):
        ids, weights = one_hot_slots(canvas.x[:, :end], state.ids.shape[-1] - 1, state.weights.dtype)
        if rows is None:
            state.ids[:, :end], state.weights[:, :end] = ids, weights
        else:
            state.ids[rows, :end], state.weights[rows, :end] = ids[rows], weights[rows]

    def describe_inputs(self, model, state, canvas, row, first):
        g0 = canvas.gen_start
        tokens = canvas.x[row, g0:]
        if not state.soft:
            return input_states(None, None, tokens, model.mask_id), None
        ids, weights = state.ids[row, g0:], state.weights[row, g0:].double()
        states = input_states(ids, weights, tokens, model.mask_id)
        candidates = [[(int(i), round(float(w), 6)) for i, w in zip(pi.tolist(), pw.tolist()) if w > 0]
                      for pi, pw in zip(ids, weights)]
        return states, candidates

    def confidences(self, state, canvas, row):
        return [float(v) if v > 0 else None for v in state.confidence[row, canvas.gen_start:].tolist()]


def _full(canvas: Canvas, part: torch.Tensor, a: int, b: int) -> torch.Tensor:
    out = torch.zeros_like(canvas.x, dtype=torch.bool)
    out[:, a:b] = part
    return out
