"""EvoToken decoding step by step (spec 1.2-1.5, quirks Q1-Q3) and token-exact against a plain
re-statement of the release's `generate_soft_token`."""

from __future__ import annotations

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest, parse_options
from evotok_cli.decoding.soft import DECODED, MASK, SOFT, SOFT_MASK, soft_weights, top_k_probabilities
from evotok_plugins.evotoken.decoder import EvoTokenDecoder
from tests import reference

PROMPTS = [[5, 17, 33], [40, 41, 42, 43, 44], [7, 9]]


def decode(model, prompts, trace=None, **kw):
    names = ("k_soft", "alpha", "threshold", "cache", "remasking")
    opts = {k: v for k, v in kw.items() if k in names}
    req = {k: v for k, v in kw.items() if k not in names}
    dec = EvoTokenDecoder(parse_options(EvoTokenDecoder.Config, opts, decoder="evotoken"))
    events: list = []
    out = dec.generate(model, GenerationRequest(prompts=prompts, trace=trace is not None, on_event=events.append, **req))
    if trace is not None:
        trace.extend(events)
    return out


def test_soft_weights_numeric_example_of_the_spec():
    probs = torch.tensor([[[0.5, 0.2, 0.1], [0.5, 0.2, 0.1]]], dtype=torch.float64)
    ids = torch.tensor([[[10, 11, 12], [10, 11, 12]]])
    tokens = torch.tensor([[99, 10]])  # first position still [MASK] (id 99), second decoded
    slot_ids, w = soft_weights(probs, ids, tokens, mask_id=99, alpha=0.7)
    assert torch.allclose(w[0, 0], torch.tensor([0.1875, 0.075, 0.0375, 0.7], dtype=torch.float64))
    assert torch.allclose(w[0, 1], torch.tensor([0.625, 0.25, 0.125, 0.0], dtype=torch.float64))
    assert slot_ids[0, 0].tolist() == [10, 11, 12, 99] and slot_ids[0, 1].tolist() == [10, 11, 12, 10]
    _, w0 = soft_weights(probs, ids, tokens, mask_id=99, alpha=0.0)  # alpha = 0: a pure top-k mixture
    assert torch.allclose(w0[0, 0], torch.tensor([0.625, 0.25, 0.125, 0.0], dtype=torch.float64))


def test_top_k_with_logsumexp_equals_float64_softmax():
    logits = torch.randn(2, 7, 300, generator=torch.Generator().manual_seed(0)) * 4
    probs, ids = top_k_probabilities(logits, 3, exclude=5)
    masked = logits.clone()
    masked[..., 5] = float("-inf")
    full = torch.softmax(masked.double(), -1)
    q, t = full.topk(3, -1)
    assert torch.equal(ids, t) and torch.allclose(probs, q, rtol=1e-12, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.7, 0.99])
def test_soft_weights_need_no_normaliser(alpha):
    """Future-block positions are fed top-k mixtures only: the weights from exp(l_i - l_1) equal those from
    the float64 softmax (to float64 rounding, and exactly once cast to the model's float32)."""
    from evotok_cli.decoding.soft import top_k_relative

    logits = torch.randn(2, 9, 500, generator=torch.Generator().manual_seed(3)) * 5
    tokens = torch.tensor([[99] * 5 + [1, 2, 3, 4]] * 2)
    probs, ids = top_k_probabilities(logits, 3, exclude=None)
    relative, rel_ids = top_k_relative(logits, 3)
    assert torch.equal(ids, rel_ids)
    assert torch.allclose(relative, probs / probs[..., :1], rtol=1e-14, atol=0)
    _, w_full = soft_weights(probs, ids, tokens, mask_id=99, alpha=alpha)
    _, w_rel = soft_weights(relative, ids, tokens, mask_id=99, alpha=alpha)
    assert torch.allclose(w_rel, w_full, rtol=1e-13, atol=1e-300)
    assert torch.equal(w_rel.float(), w_full.float())


@pytest.mark.parametrize("gen, block, steps, k, alpha", [
    (8, 4, 8, 3, 0.7), (8, 4, 4, 3, 0.7), (8, 4, 16, 3, 0.5), (12, 4, 6, 1, 0.7), (8, 8, 8, 3, 0.0),
    (16, 8, 16, 5, 0.9),
])
def test_tokens_equal_reference_generate_soft_token(tiny_model, gen, block, steps, k, alpha):
    for prompt in PROMPTS:
        ours = decode(tiny_model, [prompt], gen_length=gen, block_length=block, steps=steps, k_soft=k, alpha=alpha)
        ref, nfe = reference.evotoken_generate(tiny_model, prompt, gen_length=gen, block_length=block, steps=steps,
                                               mask_id=tiny_model.mask_id, alpha=alpha, k=k)
        assert ours.rows[0].token_ids == ref
        assert ours.nfe == nfe == min(steps, gen)


def rounded_tolerance(n: int) -> float:
    """How far a sum of n trace weights may be from its exact value: the trace rounds every weight to 6
    decimals (`round(w, 6)` in plugins/evotok_plugins/evotoken), up to 5e-7 each, and the weight itself comes from float32
    arithmetic (a few ulps, 2**-24 each for values below 1). A flat 1e-6 was smaller than the rounding of
    three weights (1.5e-6), so the sum of k_soft=3 candidates failed wherever the weights fell that way."""
    return n * (5e-7 + 4 * 2**-24)


def test_state_table_pass_by_pass(tiny_model):
    """Spec 1.10's trace shape: prompt 3, gen 8, block 4, steps 8, alpha 0.7, k 3."""
    trace = []
    decode(tiny_model, [PROMPTS[0]], trace=trace, gen_length=8, block_length=4, steps=8, alpha=0.7, k_soft=3)
    assert len(trace) == 8
    # pass 1: every generated position is a hard [MASK] (Q1)
    assert trace[0].states == [MASK] * 8 and trace[0].candidates is None
    # pass 2: one decoded position in block 1 is Soft(V) with zero self weight; every other position,
    # block 2 included (Q3), is Soft([MASK]+V) with mask weight alpha
    second = trace[1]
    decoded = trace[0].committed
    assert len(decoded) == 1 and decoded[0] < 4
    for i, (state, cands) in enumerate(zip(second.states, second.candidates)):
        if i in decoded:
            assert state == SOFT and len(cands) == 3 and abs(sum(w for _, w in cands) - 1) <= rounded_tolerance(3)
        else:
            assert state == SOFT_MASK
            assert abs(cands[-1][1] - 0.7) <= rounded_tolerance(1) and cands[-1][0] == tiny_model.mask_id
    # pass 5 (first of block 2): block 1 is still Soft(V) (Q2); pass 6: block 1 is [Decode]
    assert trace[4].block == (4, 8)
    assert trace[4].states[:4] == [SOFT] * 4
    assert trace[5].states[:4] == [DECODED] * 4
    assert all(s in (SOFT, SOFT_MASK) for s in trace[5].states[4:])


def test_revision_rule(tiny_model):
    trace = []
    decode(tiny_model, PROMPTS, trace=trace, gen_length=16, block_length=8, steps=16)
    revised_total = 0
    by_row: dict[int, list] = {}
    for e in trace:
        by_row.setdefault(e.row, []).append(e)
    for events in by_row.values():
        for before, after in zip(events, events[1:]):
            lo, hi = after.block
            for i, (t0, t1) in enumerate(zip(before.tokens, after.tokens)):
                if t0 != tiny_model.mask_id:
                    assert t1 != tiny_model.mask_id  # never re-masked
                if t0 != t1 and t0 != tiny_model.mask_id:
                    assert lo <= i < hi  # revisions only in the current block
                    assert i in after.revised
                c0, c1 = before.confidence[i], after.confidence[i]
                if c0 is not None:
                    assert c1 >= c0  # stored confidence never decreases
            revised_total += len(after.revised)
    assert revised_total > 0, "the tiny model should revise at least once on these prompts"


def test_batch_equals_single(tiny_model):
    for kw in ({"steps": 16}, {"steps": 8, "k_soft": 1}, {"steps": 16, "threshold": 0.4}):
        batch = decode(tiny_model, PROMPTS, gen_length=16, block_length=8, **kw)
        for prompt, row in zip(PROMPTS, batch.rows):
            alone = decode(tiny_model, [prompt], gen_length=16, block_length=8, **kw)
            assert row.token_ids == alone.rows[0].token_ids and row.nfe == alone.rows[0].nfe


def test_temperature_zero_deterministic_no_mask_left(tiny_model):
    a = decode(tiny_model, PROMPTS, gen_length=16, block_length=8, steps=8)
    b = decode(tiny_model, PROMPTS, gen_length=16, block_length=8, steps=8)
    assert [r.token_ids for r in a.rows] == [r.token_ids for r in b.rows]
    assert all(tiny_model.mask_id not in r.token_ids for r in a.rows)
    hot = decode(tiny_model, PROMPTS, gen_length=16, block_length=8, steps=8, temperature=0.5, seed=1)
    assert all(tiny_model.mask_id not in r.token_ids for r in hot.rows)


def test_sampled_probabilities_keep_the_mask_column():
    """Q6: at temperature > 0 the soft state's p is the untempered softmax with [MASK] included."""
    from evotok_cli.decoding.schedule import token_confidence

    logits = torch.randn(1, 5, 50, generator=torch.Generator().manual_seed(1)) * 3
    logits[..., 7] = 10.0  # make [MASK] (id 7 here) the most likely token
    probs, ids = top_k_probabilities(logits, 3, exclude=None)
    full = torch.softmax(logits.double(), -1)
    assert (ids[..., 0] == 7).all() and torch.allclose(probs, full.topk(3, -1).values, rtol=1e-12, atol=0)
    tokens = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(2))
    conf = token_confidence(logits, tokens, dtype=torch.float64)
    assert torch.allclose(conf, full.gather(-1, tokens[..., None]).squeeze(-1), rtol=1e-12, atol=0)
    fp32 = token_confidence(logits, tokens, dtype=torch.float32)  # LLaDA's softmax in the logits' dtype
    assert torch.equal(fp32, torch.softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1))


def test_cached_runs_feed_the_finished_block_as_decode(tiny_model):
    """The documented cache deviation from Q2: with a cache, the first pass of a block already feeds the
    previous block one-hot ([Decode]), since its K/V are cached for the whole block."""
    for cache, expected in (("none", "soft"), ("prefix", "decoded"), ("dual", "decoded")):
        trace = []
        decode(tiny_model, [PROMPTS[0]], trace=trace, gen_length=8, block_length=4, steps=8, cache=cache)
        first_of_block_2 = next(e for e in trace if e.block == (4, 8))
        assert first_of_block_2.states[:4] == [expected] * 4, cache
