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

from evotok_cli.decoding.api import option
from evotok_cli.decoding.blockwise import BlockwiseDecoder
from evotok_cli.decoding.canvas import Canvas
from evotok_cli.decoding.schedule import gumbel_candidates, select_transfer, token_confidence
from evotok_cli.errors import ConfigError


@dataclass
class HardMaskConfig:
    remasking: Literal["low_confidence", "random"] = option(
        "low_confidence", "rank masked positions by the candidate's probability, or randomly")
    threshold: float | None = option(
        None, "Fast-dLLM parallel decoding: also commit every candidate with confidence >= this",
        min=0.0, max=1.0, min_open=True)
    cache: Literal["none", "prefix", "dual"] = option(
        "none", "KV cache policy (Fast-dLLM); 'none' is the exact reference")
    cfg_scale: float = option(0.0, "classifier-free guidance scale (0 = off)", min=0.0)
    logits_eos_inf: bool = option(False, "forbid EOS as a candidate")
    confidence_eos_eot_inf: bool = option(False, "rank EOS/EOT candidates last")

    def validate(self, where: str) -> None:
        if self.cfg_scale > 0 and self.cache != "none":
            raise ConfigError("cfg_scale needs cache=none (the unconditional copy has no cache)", where=where,
                              fix="drop cfg_scale or use cache=none")


class HardMaskState:
    def __init__(self, canvas: Canvas):
        self.confidence = torch.zeros(canvas.x.shape, dtype=torch.float64, device=canvas.x.device)


class HardMaskDecoder(BlockwiseDecoder):
    name = "hard-mask"
    Config = HardMaskConfig

    def start(self, model, canvas, request):
        return HardMaskState(canvas)

    def forward(self, model, state, canvas, block, lo, hi, cache, first):
        if self.config.cfg_scale <= 0:
            return super().forward(model, state, canvas, block, lo, hi, cache, first)
        # classifier-free guidance: a copy with the prompt masked, in the same batch (as LLaDA does)
        prompt = canvas.real.clone()
        prompt[:, canvas.gen_start:] = False
        unconditional = canvas.x.masked_fill(prompt, model.mask_id)
        offsets = canvas.pad_offsets
        shift = int(model.shifted_logits)  # lo is 0 here: guidance runs without a cache
        logits = model(input_ids=torch.cat([canvas.x, unconditional])[:, lo:hi],
                       pad_offsets=None if offsets is None else offsets * 2,
                       position_ids=torch.cat([canvas.positions] * 2)[:, lo:hi], start=lo,
                       logits_slice=(block.start - shift - lo, block.end - shift - lo))
        cond, uncond = logits.chunk(2)
        return uncond + (self.config.cfg_scale + 1) * (cond - uncond), (block.start, block.end)

    def update(self, model, state, canvas, logits, cols, block, counts, active, generator, temperature):
        cfg = self.config
        a, b = cols
        if cfg.logits_eos_inf:
            logits = logits.clone()
            logits[..., model.eos_id] = float("-inf")
        x0 = gumbel_candidates(logits, temperature, generator, exclude=model.mask_id)  # (B, b - a)
        if cfg.remasking == "random":
            conf = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        else:
            exact = cfg.cache == "none" and cfg.threshold is None
            conf = token_confidence(logits, x0, dtype=logits.dtype if exact else torch.float64)
        if cfg.confidence_eos_eot_inf:
            conf = conf.masked_fill(torch.isin(x0, torch.tensor(model.stop_ids, device=x0.device)), float("-inf"))
        window = canvas.x[:, a:b]
        eligible = (window == model.mask_id) & active[:, None]
        chosen = select_transfer(conf, eligible, counts, cfg.threshold)
        window[chosen] = x0[chosen]
        state.confidence[:, a:b][chosen] = conf[chosen].to(torch.float64)
        committed = torch.zeros_like(canvas.x, dtype=torch.bool)
        committed[:, a:b] = chosen
        return committed, torch.zeros_like(committed)

    def confidences(self, state, canvas, row):
        return [float(v) if v > 0 else None for v in state.confidence[row, canvas.gen_start:].tolist()]
