"""hard-mask's Fast-dLLM caches, token for token against a restatement of Fast-dLLM's cached loops run
on an independent model (transformers' Llama with the same weights, its own KV cache, RoPE'd keys)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from evotok_cli.decoding.api import GenerationRequest, parse_options
from evotok_plugins.evotoken.decoder import EvoTokenDecoder
from evotok_plugins.hard_mask.decoder import HardMaskDecoder
from tests.reference import schedule
from tests.test_runtime import _to_llama


def _cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k.clone(), v.clone(), i)
    return cache


def _commit(logits, x, lo, start, end, mask_id, n):
    """Fast-dLLM's get_transfer_index on the fed window [lo, ...): float64 softmax, top-n of the block."""
    scores = logits.clone()
    scores[..., mask_id] = float("-inf")
    x0 = scores.argmax(-1)
    p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None]).squeeze(-1)
    window = x[:, lo:lo + logits.shape[1]]
    cols = torch.arange(lo, lo + logits.shape[1])[None]
    eligible = (window == mask_id) & (cols >= start) & (cols < end)
    conf = torch.where(eligible, p, torch.tensor(float("-inf"), dtype=torch.float64))
    _, idx = conf[0].topk(n)
    window[0, idx] = x0[0, idx]


@torch.no_grad()
def fast_dllm(llama, prompt, *, gen, block, steps, mask_id, mode):
    P = len(prompt)
    L = P + gen
    x = torch.tensor([prompt + [mask_id] * gen])
    per_block = steps // (gen // block)

    def run(ids, cache, positions):
        q, kv = ids.shape[1], cache.get_seq_length() + ids.shape[1]
        return llama(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=positions[None],
                     attention_mask=torch.zeros(1, 1, q, kv)).logits

    for b in range(gen // block):
        s, e = P + b * block, P + (b + 1) * block
        counts = schedule(block, per_block)
        full = DynamicCache()
        logits = run(x, full, torch.arange(L))
        _commit(logits, x, 0, s, e, mask_id, counts[0])
        layers = [(full.layers[i].keys, full.layers[i].values) for i in range(len(full.layers))]
        i = 1
        while (x[:, s:e] == mask_id).any():
            if mode == "prefix":
                cache = _cache_from([(k[:, :, :s], v[:, :, :s]) for k, v in layers])
                logits = run(x[:, s:], cache, torch.arange(s, L))
            else:  # dual: keys are RoPE'd, so prefix + suffix in any order attend exactly like in place
                cache = _cache_from([(torch.cat([k[:, :, :s], k[:, :, e:]], 2), torch.cat([v[:, :, :s], v[:, :, e:]], 2))
                                     for k, v in layers])
                logits = run(x[:, s:e], cache, torch.arange(s, e))
            _commit(logits, x, s, s, e, mask_id, counts[i])
            i += 1
    return x[0, P:].tolist()


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("gen, block, steps", [(16, 8, 16), (16, 8, 8), (12, 4, 6)])
def test_hard_mask_cache_equals_fast_dllm(tiny_model, mode, gen, block, steps):
    llama = _to_llama(tiny_model.net, tiny_model.config)
    llama.config._attn_implementation = "sdpa"
    dec = HardMaskDecoder(parse_options(HardMaskDecoder.Config, {"cache": mode}, decoder="hard-mask"))
    for prompt in ([5, 17, 33, 8, 21], [40, 41], [7, 9, 100]):
        ours = dec.generate(tiny_model, GenerationRequest(prompts=[prompt], gen_length=gen, block_length=block,
                                                          steps=steps))
        ref = fast_dllm(llama, prompt, gen=gen, block=block, steps=steps, mask_id=tiny_model.mask_id, mode=mode)
        assert ours.rows[0].token_ids == ref


@pytest.mark.parametrize("decoder", [HardMaskDecoder, EvoTokenDecoder])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_batches_equal_single_runs(tiny_model, decoder, mode):
    dec = decoder(parse_options(decoder.Config, {"cache": mode}, decoder=decoder.name))
    prompts = [[5, 17, 33, 8, 21], [40, 41], [7, 9, 100]]
    batch = dec.generate(tiny_model, GenerationRequest(prompts=prompts, gen_length=16, block_length=8, steps=16))
    for prompt, row in zip(prompts, batch.rows):
        alone = dec.generate(tiny_model, GenerationRequest(prompts=[prompt], gen_length=16, block_length=8, steps=16))
        assert row.token_ids == alone.rows[0].token_ids and tiny_model.mask_id not in row.token_ids
