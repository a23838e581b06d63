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

from evotok_cli.decoding.api import option, remasking_option, threshold_option
from evotok_cli.decoding.blockwise import BlockwiseDecoder, check_reference_rng, per_row
from evotok_cli.decoding.canvas import Canvas, widen
from evotok_cli.decoding.engine import Update
from evotok_cli.decoding.evolution import Commit, as_decoded, evolve
from evotok_cli.decoding.schedule import llada_rows, llada_step
from evotok_cli.decoding.soft import input_states, one_hot_slots


@dataclass
class EvoTokenConfig:
    k_soft: int = option(3, "top-k candidates mixed into each soft input", min=1, max="vocab_size")
    alpha: float = option(0.7, "weight of the [MASK] embedding in Soft([MASK]+V) inputs", min=0.0, max=1.0,
                          max_open=True)
    remasking: Literal["low_confidence", "random"] = remasking_option()
    threshold: float | None = threshold_option()
    cache: Literal["none", "prefix", "dual"] = option(
        "none", "KV cache policy (Fast-dLLM semantics); 'none' is the faithful reference")
    soft_mask: bool = option(True, "ablation: feed undecided positions as Soft([MASK]+V); false: hard [MASK]")
    soft_decoded: bool = option(True, "ablation: feed committed positions as Soft(V) until their block ends; "
                                      "false: as [Decode] at once")
    revise: bool = option(True, "ablation: committed positions of the block may take a more confident "
                                "candidate; false: never")
    rng: Literal["fast", "reference"] = option(
        "fast", "random numbers: 'fast' draws what each pass needs from the row's own seed; 'reference' draws "
        "them as the release does (over the whole canvas and vocabulary, one stream for all prompts in turn)")

    def validate(self, where: str) -> None:
        check_reference_rng(self, where)

    @property
    def reduces_to_llada(self) -> bool:
        """All three states off: nothing of EvoToken is left, the step is LLaDA's low-confidence remasking."""
        return not (self.soft_mask or self.soft_decoded or self.revise)


class EvoTokenState:
    def __init__(self, canvas: Canvas, k: int, dtype: torch.dtype):
        self.confidence = torch.zeros(canvas.x.shape, dtype=torch.float64, device=canvas.x.device)  # c
        self.ids, self.weights = one_hot_slots(canvas.x, k, dtype)  # (B, L, k+1) soft inputs
        self.soft = False  # False until the first pass has run (Q1: the first pass feeds hard ids)


class EvoTokenDecoder(BlockwiseDecoder):
    name = "evotoken"
    Config = EvoTokenConfig
    merges_rows = True  # its grouped update takes a random stream per row (`per_row`)
    exact_schedule = True  # evolve's commit (and llada_step) take exactly counts[b]: no read-back per pass

    def start(self, model, canvas, request):
        return EvoTokenState(canvas, self.config.k_soft, model.dtype)

    def logits_range(self, canvas, lo, hi, block):
        if self.config.reduces_to_llada:  # no soft states to rebuild: only the block's candidates are needed
            return block.start, block.end
        # soft states are rebuilt for every fed generated position (future blocks included, Q3)
        return max(lo, canvas.gen_start), hi

    def inputs(self, model, state, canvas, lo, hi, block):
        if not state.soft or self.config.reduces_to_llada:
            return {"input_ids": canvas.x[:, lo:hi]}
        return {"soft_inputs": (state.ids[:, lo:hi], state.weights[:, lo:hi])}

    def update(self, model, state, canvas, logits, cols, block, counts, open_rows, generator, temperature):
        cfg = self.config
        a, b = cols
        if cfg.reduces_to_llada:  # LLaDA's step exactly (its confidences: LLaDA's softmax, or Fast-dLLM's with a cache)
            chosen = llada_step(model, logits, canvas.x[:, a:b], state.confidence[:, a:b], counts=counts,
                                open_rows=open_rows, generator=generator, temperature=temperature,
                                remasking=cfg.remasking, threshold=cfg.threshold,
                                exact=cfg.cache == "none" and cfg.threshold is None, columns=block.ranked_columns(a))
            return widen(chosen, canvas.x, a, b), torch.zeros_like(canvas.x, dtype=torch.bool)
        s, e = max(a, block.start), min(b, block.end)  # only block columns can be committed or revised
        live = open_rows[:, None]  # a row whose block is full is [Decode]: it neither commits nor revises
        step = evolve(logits, canvas.x[:, a:b], state.confidence[:, a:b], mask_id=model.mask_id,
                      candidates="evotoken", temperature=temperature, generator=generator, remasking=cfg.remasking,
                      window=(s - a, e - a), commit=Commit(counts=counts, threshold=cfg.threshold,
                                                           columns=block.ranked_columns(s)), live=live,
                      revise=cfg.revise, k=cfg.k_soft, alpha=cfg.alpha,
                      frozen=torch.arange(a, b, device=live.device) < block.start)
        canvas.x[:, a:b], state.confidence[:, a:b] = step.tokens, step.confidence
        ids, weights = step.soft_ids, step.soft_weights
        if not (cfg.soft_mask and cfg.soft_decoded):  # ablations: some states fed hard instead
            undecided = step.tokens == model.mask_id
            hard = (undecided & (not cfg.soft_mask)) | (~undecided & (not cfg.soft_decoded))
            ids, weights = as_decoded(ids, weights, step.tokens, hard)
        keep = live[..., None]  # finished rows keep their soft inputs
        state.ids[:, a:b] = torch.where(keep, ids, state.ids[:, a:b])
        state.weights[:, a:b] = torch.where(keep, weights.to(state.weights.dtype), state.weights[:, a:b])
        self._freeze_before(state, canvas, a, rows=open_rows)  # [Decode] also left of the columns fed this pass
        state.soft = True
        return widen(step.committed, canvas.x, a, b), widen(step.revised, canvas.x, a, b)

    def update_program(self, model, state, canvas, logits, cols, block, counts, open_rows, generator, temperature,
                       masks=True):
        """`update` as one grouped call for the rows of every evotoken program with these options whose
        window has the same shape and block offset this step (`engine.Update`); rng=reference: alone."""
        if self.reference_rng:
            return (yield from super().update_program(model, state, canvas, logits, cols, block, counts, open_rows,
                                                      generator, temperature, masks))
        cfg = self.config
        a, b = cols
        rows = canvas.batch
        generators = per_row(generator, rows)
        if cfg.reduces_to_llada:
            chosen = yield from self.llada_update(llada_rows, model, state, canvas, logits, cols, block, counts,
                                                  generator, temperature)
            if not masks:
                return None, None
            return widen(chosen, canvas.x, a, b), torch.zeros_like(canvas.x, dtype=torch.bool)
        s, e = max(a, block.start), min(b, block.end)
        window, frozen = (s - a, e - a), block.start - a
        *_, committed, revised = yield Update(
            _evolve_rows, (*self.group_key(model, temperature), window, frozen),
            (logits, canvas.x[:, a:b], state.confidence[:, a:b], state.ids[:, a:b], state.weights[:, a:b]),
            rows={"counts": counts, "generators": generators, "columns": [block.ranked_columns(s)] * rows},
            shared={"mask_id": model.mask_id, "config": cfg, "temperature": temperature, "window": window,
                    "frozen": frozen},
            into={0: 1, 1: 2, 2: 3, 3: 4})  # tokens, confidences and soft inputs written back by the engine
        # no `_freeze_before(a)` as `update` does: columns left of the window are [Decode] already (the prompt,
        # and in cache modes the blocks `end_block` froze), so it would write what is there
        state.soft = True
        return (widen(committed, canvas.x, a, b), widen(revised, canvas.x, a, b)) if masks else (None, None)

    def end_block(self, model, state, canvas, block):
        if self.cache_mode != "none":  # the next block's cached prefix must hold the final tokens
            self._freeze_before(state, canvas, block.end, rows=None)

    @staticmethod
    def _freeze_before(state, canvas, end, rows):
        ids, weights = one_hot_slots(canvas.x[:, :end], state.ids.shape[-1] - 1, state.weights.dtype)
        if rows is None:
            state.ids[:, :end], state.weights[:, :end] = ids, weights
        else:  # torch.where over the rows, not state.ids[rows]: no read-back of the bool mask
            keep = rows[:, None, None]  # (B, 1, 1)
            state.ids[:, :end] = torch.where(keep, ids, state.ids[:, :end])
            state.weights[:, :end] = torch.where(keep, weights, state.weights[:, :end])

    def describe_inputs(self, model, state, canvas, row):
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


def _evolve_rows(logits, tokens, confidence, ids, weights, *, mask_id, config, temperature, window, frozen, counts,
                 generators, columns):
    """`update`'s step over the window [a, b) for rows of many evotoken programs at once (an `engine.Update`),
    pure: the window's tokens, confidences, soft inputs, and committed and revised masks after the pass.
    `window`: the block's columns in it (a row is live while they hold a [MASK]); `frozen`: columns before
    it that are [Decode]."""
    cfg = config
    s, e = window
    live = (tokens[:, s:e] == mask_id).any(dim=1)[:, None]  # a row whose block is full neither commits nor revises
    step = evolve(logits, tokens, confidence, mask_id=mask_id, candidates="evotoken", temperature=temperature,
                  generator=generators, remasking=cfg.remasking, window=window,
                  commit=Commit(counts=counts, threshold=cfg.threshold, columns=columns), live=live,
                  revise=cfg.revise, k=cfg.k_soft, alpha=cfg.alpha,
                  frozen=torch.arange(tokens.shape[1], device=live.device) < frozen)
    new_ids, new_weights = step.soft_ids, step.soft_weights
    if not (cfg.soft_mask and cfg.soft_decoded):  # ablations: some states fed hard instead
        undecided = step.tokens == mask_id
        hard = (undecided & (not cfg.soft_mask)) | (~undecided & (not cfg.soft_decoded))
        new_ids, new_weights = as_decoded(new_ids, new_weights, step.tokens, hard)
    keep = live[..., None]  # finished rows keep their soft inputs
    return (step.tokens, step.confidence, torch.where(keep, new_ids, ids),
            torch.where(keep, new_weights.to(weights.dtype), weights), step.committed, step.revised)
