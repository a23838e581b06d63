"""Plain, unoptimised re-statements of the reference decoders, written from the spec (sections 1.3-1.5,
6.1, 8) for batch size 1 with the whole canvas recomputed every step. Our decoders must produce the same
tokens. Deliberate difference from the LLaDA code, shared with our decoder: [MASK] is never a candidate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def schedule(mask_count: int, steps: int) -> list[int]:
    base, rem = mask_count // steps, mask_count % steps
    return [base + 1 if i < rem else base for i in range(steps)]


@torch.no_grad()
def llada_generate(model, prompt: list[int], *, gen_length: int, block_length: int, steps: int, mask_id: int,
                   cfg_scale: float = 0.0, threshold: float | None = None) -> tuple[list[int], int]:
    """LLaDA `generate` at temperature 0 (threshold: Fast-dLLM's rule without cache, float64 softmax)."""
    P = len(prompt)
    x = torch.tensor([prompt + [mask_id] * gen_length])
    blocks = gen_length // block_length
    per_block = steps // blocks
    nfe = 0
    for b in range(blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        counts = schedule(int((x[:, start:end] == mask_id).sum()), per_block)
        i = 0
        while (x[:, start:end] == mask_id).any():
            mask_index = x == mask_id
            if cfg_scale > 0:
                un = x.clone()
                un[:, :P] = mask_id
                both = model(torch.cat([x, un]))
                cond, uncond = both[:1], both[1:]
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x)
            nfe += 1
            scores = logits.clone()
            scores[..., mask_id] = float("-inf")
            x0 = scores.argmax(-1)
            p = F.softmax(logits.double() if threshold is not None else logits, dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            x0_p[:, end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=x0_p.dtype))
            n = int(mask_index[:, start:end].sum()) if threshold is not None else counts[i]
            values, index = torch.topk(confidence[0], k=n)
            keep = torch.ones(n, dtype=torch.bool)
            if threshold is not None:
                keep[1:] = values[1:] >= threshold
            x[0, index[keep]] = x0[0, index[keep]]
            i += 1
            if threshold is None and i == len(counts):
                break
    return x[0, P:].tolist(), nfe


def soft_state(p, x, *, k, alpha, start, mask_id):
    """Spec 1.3: top-k of p plus the own-token slot (mask weight alpha for [MASK] positions), renormalised;
    positions before the block start one-hot ([Decode])."""
    q, t = torch.topk(p, k, dim=-1)
    S = q.sum(-1, keepdim=True)
    extra = torch.where(x[..., None] == mask_id, S / (1 - alpha) * alpha, torch.zeros_like(S))
    soft_w = torch.cat([q, extra], -1)
    soft_w = soft_w / soft_w.sum(-1, keepdim=True)
    soft_ids = torch.cat([t, x[..., None]], -1)
    soft_w[:, :start] = 0
    soft_w[:, :start, -1] = 1
    return soft_ids, soft_w


@torch.no_grad()
def evotoken_generate(model, prompt: list[int], *, gen_length: int, block_length: int, steps: int,
                      mask_id: int, alpha: float, k: int, record: list | None = None) -> tuple[list[int], int]:
    """`generate_soft_token` at temperature 0: full float64 softmax, soft state for every position."""
    P = len(prompt)
    L = P + gen_length
    x = torch.tensor([prompt + [mask_id] * gen_length])
    conf = torch.zeros(1, L, dtype=torch.float64)
    soft_ids = soft_w = None
    blocks = gen_length // block_length
    per_block = steps // blocks
    nfe = 0
    for b in range(blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        counts = schedule(block_length, per_block)
        for i in range(per_block):
            if not (x[:, start:end] == mask_id).any():
                break
            if soft_ids is None:
                logits = model(x)
            else:
                if record is not None:
                    record.append((soft_ids.clone(), soft_w.clone()))
                w = soft_w.to(logits.dtype).clamp(min=0)
                w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
                emb = model.embed(soft_ids)  # (1, L, k+1, D)
                logits = model(inputs_embeds=(emb * w[..., None]).sum(-2))
            if record is not None and soft_ids is None:
                record.append((None, None))
            nfe += 1
            logits = logits.clone()
            logits[..., mask_id] = float("-inf")  # in place, before the softmax (T = 0)
            x0 = logits.argmax(-1)
            p = F.softmax(logits.double(), dim=-1)
            conf0 = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            masked = x == mask_id
            pos = torch.arange(L)[None]
            eligible = masked & (pos < end)
            score = torch.where(eligible, conf0, torch.tensor(float("-inf"), dtype=torch.float64))
            _, index = torch.topk(score[0], k=counts[i])
            x[0, index] = x0[0, index]
            conf[0, index] = conf0[0, index]
            decoded = (x != mask_id) & (pos >= start)
            revise = decoded & (conf0 > conf)
            x[revise] = x0[revise]
            conf[revise] = conf0[revise]
            soft_ids, soft_w = soft_state(p, x, k=k, alpha=alpha, start=start, mask_id=mask_id)
    return x[0, P:].tolist(), nfe


@torch.no_grad()
def d2f_generate(model, prompt: list[int], *, max_new: int, block_size: int, add: float, activate: float,
                 skip: float, mask_id: int, eos_id: int) -> tuple[list[int], int]:
    """D2F's pipeline (spec 6.4, 8) at temperature 0 without a cache: every pass recomputes the whole
    canvas under the block-causal mask (exact caching must give the same)."""
    P = len(prompt)
    x = torch.tensor([prompt + [mask_id] * max_new])
    starts: list[int] = []
    full: list[bool] = []
    eos, nfe = False, 0

    def progress(i: int) -> float:
        segment = x[0, starts[i]:starts[i] + block_size]
        return 1.0 - int((segment == mask_id).sum()) / block_size

    while True:
        if (progress(len(starts) - 1) if starts else 1.0) >= add and not eos and len(starts) < max_new // block_size:
            starts.append(P + len(starts) * block_size)
            full.append(False)
        for i in range(len(starts)):
            if (1.0 if i == 0 else progress(i - 1)) >= activate:
                full[i] = True
        unfinished = [i for i in range(len(starts)) if progress(i) < 1.0]
        if not unfinished:
            break
        hi = starts[-1] + block_size
        block_of = torch.tensor([0] * P + [1 + (c - P) // block_size for c in range(P, hi)])
        mask = (block_of[None, :] <= block_of[:, None])[None, None]
        logits = model(x[:, :hi], attention_mask=mask)[0]
        nfe += 1
        probs = torch.softmax(logits, -1)
        picked = probs.clone()
        picked[:, mask_id] = -1.0
        x0 = picked.argmax(-1)
        conf = probs.gather(-1, x0[:, None]).squeeze(-1).float()
        for i in unfinished:
            cols = [c for c in range(starts[i], starts[i] + block_size) if x[0, c] == mask_id]
            take = [c for c in cols if conf[c] > skip]
            if not take and full[i]:
                take = [max(cols, key=lambda c: float(conf[c]))]  # first of the most confident
            for c in take:
                x[0, c] = x0[c]
            if any(int(x0[c]) == eos_id for c in take):
                eos = True
    gen = x[0, P:]
    return gen.masked_fill(gen == mask_id, eos_id).tolist(), nfe


# -- the releases' random streams (rng=reference) -----------------------------------------------------
# LLaDA's `generate` and EvoToken's `generate_soft_token` sample with one generator seeded once, decoding
# the prompts one after another (batch size 1): each pass draws float64 uniforms over the whole canvas's
# logits (B, L, V) when the temperature is above 0, then, for random remasking, float32 uniforms (B, L).
# LLaDA runs every scheduled pass of a block (also on a full block); EvoToken stops when the block is full.


def _noisy_argmax(logits, temperature, generator, mask_id):
    if temperature > 0:
        u = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
        scores = logits.double().exp() / (-torch.log(u)) ** temperature
    else:
        scores = logits.clone()
    scores[..., mask_id] = float("-inf")  # shared deliberate difference: [MASK] is never a candidate
    return scores.argmax(-1)


@torch.no_grad()
def llada_release(model, prompts, *, gen_length, block_length, steps, mask_id, temperature, seed,
                  remasking="low_confidence"):
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for prompt in prompts:
        P = len(prompt)
        x = torch.tensor([prompt + [mask_id] * gen_length])
        per_block = steps // (gen_length // block_length)
        for b in range(gen_length // block_length):
            start, end = P + b * block_length, P + (b + 1) * block_length
            counts = schedule(int((x[:, start:end] == mask_id).sum()), per_block)
            for i in range(per_block):
                mask_index = x == mask_id
                logits = model(x)
                x0 = _noisy_argmax(logits, temperature, generator, mask_id)
                if remasking == "low_confidence":
                    x0_p = F.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
                else:
                    x0_p = torch.rand(x0.shape, generator=generator)
                x0_p[:, end:] = float("-inf")
                x0 = torch.where(mask_index, x0, x)
                confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf")))
                if counts[i]:
                    index = torch.topk(confidence[0], k=counts[i]).indices
                    x[0, index] = x0[0, index]
        outputs.append(x[0, P:].tolist())
    return outputs


@torch.no_grad()
def evotoken_release(model, prompts, *, gen_length, block_length, steps, mask_id, alpha, k, temperature, seed,
                     remasking="low_confidence"):
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for prompt in prompts:
        P = len(prompt)
        L = P + gen_length
        x = torch.tensor([prompt + [mask_id] * gen_length])
        conf = torch.zeros(1, L, dtype=torch.float64)
        soft_ids = soft_w = None
        per_block = steps // (gen_length // block_length)
        for b in range(gen_length // block_length):
            start, end = P + b * block_length, P + (b + 1) * block_length
            counts = schedule(block_length, per_block)
            for i in range(per_block):
                if not (x[:, start:end] == mask_id).any():
                    break
                if soft_ids is None:
                    logits = model(x)
                else:
                    w = soft_w.to(torch.float32)
                    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
                    logits = model(inputs_embeds=(model.embed(soft_ids) * w[..., None]).sum(-2))
                x0 = _noisy_argmax(logits, temperature, generator, mask_id)
                scores = logits.double()
                if temperature == 0:
                    scores[..., mask_id] = float("-inf")  # Q6: only the greedy pass hides [MASK] from p
                p = F.softmax(scores, dim=-1)
                if remasking == "low_confidence":
                    conf0 = p.gather(-1, x0[..., None]).squeeze(-1)
                else:
                    conf0 = torch.rand(x0.shape, generator=generator).double()
                pos = torch.arange(L)[None]
                eligible = (x == mask_id) & (pos < end)
                score = torch.where(eligible, conf0, torch.tensor(float("-inf"), dtype=torch.float64))
                index = torch.topk(score[0], k=counts[i]).indices
                x[0, index] = x0[0, index]
                conf[0, index] = conf0[0, index]
                revise = (x != mask_id) & (pos >= start) & (conf0 > conf)
                x[revise] = x0[revise]
                conf[revise] = conf0[revise]
                soft_ids, soft_w = soft_state(p, x, k=k, alpha=alpha, start=start, mask_id=mask_id)
        outputs.append(x[0, P:].tolist())
    return outputs
