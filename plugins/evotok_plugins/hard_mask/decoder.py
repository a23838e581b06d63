"""hard-mask: LLaDA's low-confidence remasking decoder (the MDLM baseline of every table).

Per block, LLaDA's linear schedule; per pass, a candidate token for every masked position (argmax, or a
Gumbel-max sample at temperature > 0) and the n most confident candidates are committed for good.
Options add Fast-dLLM's confidence threshold and KV caches, and LLaDA's classifier-free guidance.

Where the references differ we follow the one the mode comes from: without cache and threshold,
confidences are a softmax in the logits' dtype (LLaDA); with either, in float64 (Fast-dLLM). [MASK] is
never a candidate (the references allow it; a trained model never predicts it, and allowing it could
leave a block unfinished).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import option, remasking_option, threshold_option
from evotok_cli.decoding.blockwise import BlockwiseDecoder, check_reference_rng
from evotok_cli.decoding.canvas import Canvas, widen
from evotok_cli.decoding.engine import ForwardPass
from evotok_cli.decoding.schedule import llada_rows, llada_step


@dataclass
class HardMaskConfig:
    remasking: Literal["low_confidence", "random"] = remasking_option()
    threshold: float | None = threshold_option()
    cache: Literal["none", "prefix", "dual"] = option(
        "none", "KV cache policy (Fast-dLLM); 'none' is the exact reference")
    cfg_scale: float = option(0.0, "classifier-free guidance scale (0 = off)", min=0.0)
    logits_eos_inf: bool = option(False, "forbid EOS as a candidate")
    confidence_eos_eot_inf: bool = option(False, "rank EOS/EOT candidates last")
    rng: Literal["fast", "reference"] = option(
        "fast", "random numbers: 'fast' draws what each pass needs from the row's own seed; 'reference' draws "
        "them as the release does (over the whole canvas and vocabulary, one stream for all prompts in turn)")

    def validate(self, where: str) -> None:
        if self.cfg_scale > 0 and self.cache != "none":
            raise ConfigError("cfg_scale needs cache=none (the unconditional copy has no cache)", where=where,
                              fix="drop cfg_scale or use cache=none")
        check_reference_rng(self, where)


class HardMaskState:
    def __init__(self, canvas: Canvas):
        self.confidence = torch.zeros(canvas.x.shape, dtype=torch.float64, device=canvas.x.device)


class HardMaskDecoder(BlockwiseDecoder):
    name = "hard-mask"
    Config = HardMaskConfig
    release_runs_every_step = True  # LLaDA's `generate` runs every scheduled step of a block
    merges_rows = True  # its grouped update takes a random stream per row (`per_row`)
    exact_schedule = True  # llada_step commits exactly counts[b] per live row: no read-back per pass

    def start(self, model, canvas, request):
        return HardMaskState(canvas)

    def forward(self, model, state, canvas, block, lo, hi, cache):
        if self.config.cfg_scale <= 0:
            return super().forward(model, state, canvas, block, lo, hi, cache)
        # classifier-free guidance: a copy with the prompt masked, in the same batch (as LLaDA does)
        prompt = canvas.real.clone()
        prompt[:, canvas.gen_start:] = False
        unconditional = canvas.x.masked_fill(prompt, model.mask_id)
        offsets = canvas.pad_offsets
        shift = int(model.shifted_logits)  # lo is 0 here: guidance runs without a cache
        scale = self.config.cfg_scale

        def guide(logits: torch.Tensor) -> torch.Tensor:
            cond, uncond = logits.chunk(2)
            return uncond + (scale + 1) * (cond - uncond)

        return ForwardPass({"input_ids": torch.cat([canvas.x, unconditional])[:, lo:hi]},
                           position_ids=torch.cat([canvas.positions] * 2)[:, lo:hi],
                           pad_offsets=None if offsets is None else offsets * 2,
                           logits_slice=(block.start - shift - lo, block.end - shift - lo),
                           combine=guide), (block.start, block.end)

    def update(self, model, state, canvas, logits, cols, block, counts, open_rows, generator, temperature):
        cfg = self.config
        a, b = cols
        chosen = llada_step(model, logits, canvas.x[:, a:b], state.confidence[:, a:b], counts=counts,
                            open_rows=open_rows, generator=generator, temperature=temperature, remasking=cfg.remasking,
                            threshold=cfg.threshold, exact=cfg.cache == "none" and cfg.threshold is None,
                            logits_eos_inf=cfg.logits_eos_inf, confidence_eos_eot_inf=cfg.confidence_eos_eot_inf,
                            columns=block.ranked_columns(a))
        committed = widen(chosen, canvas.x, a, b)
        return committed, torch.zeros_like(committed)

    def update_program(self, model, state, canvas, logits, cols, block, counts, open_rows, generator, temperature,
                       masks=True):
        """`update` as one grouped call for the rows of every hard-mask program with these options that
        updates the same block shape this step (`engine.Update`); rng=reference draws per pass: alone."""
        if self.reference_rng:
            return (yield from super().update_program(model, state, canvas, logits, cols, block, counts, open_rows,
                                                      generator, temperature, masks))
        cfg = self.config
        a, b = cols
        chosen = yield from self.llada_update(llada_rows, model, state, canvas, logits, cols, block, counts, generator,
                                              temperature, logits_eos_inf=cfg.logits_eos_inf,
                                              confidence_eos_eot_inf=cfg.confidence_eos_eot_inf)
        if not masks:
            return None, None
        committed = widen(chosen, canvas.x, a, b)
        return committed, torch.zeros_like(committed)

    def confidences(self, state, canvas, row):
        return [float(v) if v > 0 else None for v in state.confidence[row, canvas.gen_start:].tolist()]
