"""bf16 parity: our decoders in bf16 on the CPU, token for token against the restated references run on
the same bf16 model (the releases run bf16: the soft weights are cast to bf16 before the mix, Q7; LLaDA's
softmax runs in the logits' dtype). In bf16 exact confidence ties are common, so selection must break
them as the releases do: a top-k over the whole canvas, not over the block's slice."""

from __future__ import annotations

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.jobs.generation import make_decoder
from tests import reference

PROMPTS = [[5, 17, 33, 8, 21], [40, 41], [7, 9, 100], [12, 13, 14, 15, 16, 17, 18, 19]]
LAYOUTS = [(8, 4, 8), (16, 8, 16), (16, 8, 8), (12, 4, 6)]


@pytest.fixture(scope="module")
def bf16_model(tiny_llada):
    from evotok_cli.runtime.model import load_model

    model = load_model(tiny_llada, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    return model


def _ours(model, name, options, prompt, gen):
    request = GenerationRequest(prompts=[prompt], gen_length=gen[0], block_length=gen[1], steps=gen[2])
    return make_decoder(name, options).generate(model, request).rows[0].token_ids


@pytest.mark.parametrize("gen", LAYOUTS)
def test_hard_mask_bf16_equals_llada_generate(bf16_model, gen):
    for prompt in PROMPTS:
        ref, _ = reference.llada_generate(bf16_model, prompt, gen_length=gen[0], block_length=gen[1], steps=gen[2],
                                          mask_id=bf16_model.mask_id)
        assert _ours(bf16_model, "hard-mask", {}, prompt, gen) == ref


@pytest.mark.parametrize("gen", LAYOUTS)
@pytest.mark.parametrize("alpha, k", [(0.7, 3), (0.5, 1), (0.9, 5)])
def test_evotoken_bf16_equals_generate_soft_token(bf16_model, gen, alpha, k):
    for prompt in PROMPTS:
        ref, _ = reference.evotoken_generate(bf16_model, prompt, gen_length=gen[0], block_length=gen[1],
                                             steps=gen[2], mask_id=bf16_model.mask_id, alpha=alpha, k=k)
        assert _ours(bf16_model, "evotoken", {"alpha": str(alpha), "k_soft": str(k)}, prompt, gen) == ref


@torch.no_grad()
def fast_dllm_on(model, prompt, *, gen, block, steps, mask_id, mode):
    """Fast-dLLM's cached loop restated on our own bf16 network (its KV cache, its forward): a full pass
    at each block start, then the suffix (prefix cache) or the block (dual cache); float64 softmax and a
    top-n over the fed positions, as `get_transfer_index` ranks them. (transformers' Llama upcasts its
    norms to float32, so in bf16 it is another network; in fp32 tests/test_caches.py compares with it.)"""
    from tests.test_caches import _commit

    P, L = len(prompt), len(prompt) + gen
    x = torch.tensor([prompt + [mask_id] * gen])
    per_block = steps // (gen // block)
    for b in range(gen // block):
        s, e = P + b * block, P + (b + 1) * block
        counts = reference.schedule(block, per_block)
        cache = model.new_cache(1, L)
        _commit(model(x, cache=cache, start=0), x, 0, s, e, mask_id, counts[0])
        i = 1
        while (x[:, s:e] == mask_id).any():
            hi = L if mode == "prefix" else e
            _commit(model(x[:, s:hi], cache=cache, start=s), x, s, s, e, mask_id, counts[i])
            i += 1
    return x[0, P:].tolist()


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("gen", [(16, 8, 16), (16, 8, 8), (12, 4, 6)])
def test_hard_mask_bf16_caches_equal_fast_dllm(bf16_model, mode, gen):
    for prompt in PROMPTS:
        ref = fast_dllm_on(bf16_model, prompt, gen=gen[0], block=gen[1], steps=gen[2], mask_id=bf16_model.mask_id,
                           mode=mode)
        assert _ours(bf16_model, "hard-mask", {"cache": mode}, prompt, gen) == ref


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_evotoken_bf16_cached_batch_equals_single(bf16_model, mode):
    dec = make_decoder("evotoken", {"cache": mode})
    request = GenerationRequest(prompts=PROMPTS, gen_length=16, block_length=8, steps=16)
    batch = dec.generate(bf16_model, request)
    for prompt, row in zip(PROMPTS, batch.rows):
        assert row.token_ids == _ours(bf16_model, "evotoken", {"cache": mode}, prompt, (16, 8, 16))


@pytest.mark.parametrize("skip", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("block, gen", [(4, 16), (8, 16), (4, 12)])
def test_d2f_bf16_equals_the_restated_pipeline(bf16_model, skip, block, gen):
    """d2f in bf16, cached, against D2F's pipeline restated without a cache on the same bf16 model: the
    candidates' probabilities in the model's dtype, the skip threshold compared in float32 (as D2F does)."""
    dec = make_decoder("d2f", {"block_size": str(block), "skip_threshold": str(skip)})
    for prompt in PROMPTS:
        ours = dec.generate(bf16_model, GenerationRequest(prompts=[prompt], gen_length=gen)).rows[0]
        ref, nfe = reference.d2f_generate(bf16_model, prompt, max_new=gen, block_size=block, add=0.7, activate=0.95,
                                          skip=skip, mask_id=bf16_model.mask_id, eos_id=bf16_model.eos_id)
        assert (ours.token_ids, ours.nfe) == (ref, nfe)


def test_topk_over_the_canvas_breaks_ties_as_the_release():
    """Tied confidences: a top-k over the block slice and over the whole canvas (-inf elsewhere) may pick
    different positions; select_transfer must pick what the canvas-wide one picks."""
    from evotok_cli.decoding.schedule import select_transfer

    torch.manual_seed(0)
    length, start, block = 300, 137, 64
    for _ in range(50):
        values = torch.randint(0, 3, (1, block)).to(torch.bfloat16).to(torch.float64) / 4  # many exact ties
        eligible = torch.rand(1, block) < 0.8
        n = int(eligible.sum()) // 2
        canvas = torch.full((1, length), float("-inf"), dtype=torch.float64)
        canvas[:, start:start + block] = values.masked_fill(~eligible, float("-inf"))
        release = torch.zeros(1, length, dtype=torch.bool)
        release[0, canvas[0].topk(n).indices] = True
        ours = select_transfer(values, eligible, [n], None, columns=(start, length))
        assert torch.equal(ours, release[:, start:start + block])
