"""hard-mask against a plain re-statement of LLaDA's `generate`, and its invariants, step by step."""

from __future__ import annotations

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest, parse_options
from evotok_cli.decoding.schedule import block_layout, gumbel_candidates, transfer_schedule
from evotok_plugins.hard_mask.decoder import HardMaskDecoder
from tests import reference

PROMPTS = [[5, 17, 33, 8, 21], [40, 41], [7, 7, 9, 100, 120, 3, 11]]


def decode(model, prompts, trace=None, **kw):
    opts = {k: v for k, v in kw.items() if k in ("threshold", "cache", "cfg_scale", "remasking")}
    req = {k: v for k, v in kw.items() if k not in opts}
    dec = HardMaskDecoder(parse_options(HardMaskDecoder.Config, opts, decoder="hard-mask"))
    events = []
    request = GenerationRequest(prompts=prompts, trace=trace is not None, on_event=events.append, **req)
    out = dec.generate(model, request)
    if trace is not None:
        trace.extend(events)
    return out


def test_schedule_matches_llada():
    assert transfer_schedule(16, 3) == [6, 5, 5]
    assert transfer_schedule(8, 16) == [1] * 8 + [0] * 8
    assert transfer_schedule(32, 16) == [2] * 16
    assert sum(transfer_schedule(37, 5)) == 37


@pytest.mark.parametrize("gen, block, steps", [(16, 8, 8), (16, 8, 16), (16, 4, 32), (12, 12, 5), (16, 16, 4)])
def test_tokens_equal_reference_llada_generate(tiny_model, gen, block, steps):
    for prompt in PROMPTS:
        ours = decode(tiny_model, [prompt], gen_length=gen, block_length=block, steps=steps)
        ref, _ = reference.llada_generate(tiny_model, prompt, gen_length=gen, block_length=block, steps=steps,
                                          mask_id=tiny_model.mask_id)
        assert ours.rows[0].token_ids == ref
        assert ours.nfe == min(steps, gen)  # NFE = min(steps, gen length); no-op passes skipped


def test_cfg_and_threshold_equal_reference(tiny_model):
    for prompt in PROMPTS[:2]:
        ours = decode(tiny_model, [prompt], gen_length=8, block_length=4, steps=8, cfg_scale=1.5)
        ref, _ = reference.llada_generate(tiny_model, prompt, gen_length=8, block_length=4, steps=8,
                                          mask_id=tiny_model.mask_id, cfg_scale=1.5)
        assert ours.rows[0].token_ids == ref
        ours = decode(tiny_model, [prompt], gen_length=16, block_length=8, steps=16, threshold=0.3)
        ref, nfe = reference.llada_generate(tiny_model, prompt, gen_length=16, block_length=8, steps=16,
                                            mask_id=tiny_model.mask_id, threshold=0.3)
        assert ours.rows[0].token_ids == ref and ours.nfe == nfe


def test_step_by_step_commits_follow_schedule_and_blocks(tiny_model):
    trace = []
    out = decode(tiny_model, [PROMPTS[0]], trace=trace, gen_length=16, block_length=8, steps=6)
    layout = block_layout(16, 8, 6)
    counts = transfer_schedule(8, layout.steps_per_block)  # [3, 3, 2]
    assert [len(e.committed) for e in trace] == counts * 2
    for e in trace:
        lo, hi = e.block
        assert all(lo <= i < hi for i in e.committed)  # commits only inside the current block
        assert e.revised == []  # hard-mask never revises
    assert [e.block for e in trace] == [(0, 8)] * 3 + [(8, 16)] * 3
    final = out.rows[0].token_ids
    assert tiny_model.mask_id not in final
    committed_order = [i for e in trace for i in e.committed]
    assert sorted(committed_order) == list(range(16))  # every position committed exactly once


def test_batch_equals_single_and_prompt_untouched(tiny_model):
    batch = decode(tiny_model, PROMPTS, gen_length=16, block_length=8, steps=8)
    for prompt, row in zip(PROMPTS, batch.rows):
        alone = decode(tiny_model, [prompt], gen_length=16, block_length=8, steps=8)
        assert row.token_ids == alone.rows[0].token_ids and row.nfe == alone.rows[0].nfe
    for threshold in (0.2, 0.6):  # rows finish blocks at different passes
        batch = decode(tiny_model, PROMPTS, gen_length=16, block_length=8, steps=16, threshold=threshold)
        for prompt, row in zip(PROMPTS, batch.rows):
            alone = decode(tiny_model, [prompt], gen_length=16, block_length=8, steps=16, threshold=threshold)
            assert row.token_ids == alone.rows[0].token_ids and row.nfe == alone.rows[0].nfe


def test_temperature_zero_is_deterministic_and_sampling_is_seeded(tiny_model):
    a = decode(tiny_model, PROMPTS, gen_length=8, block_length=4, steps=8)
    b = decode(tiny_model, PROMPTS, gen_length=8, block_length=4, steps=8)
    assert [r.token_ids for r in a.rows] == [r.token_ids for r in b.rows]
    s1 = decode(tiny_model, PROMPTS, gen_length=8, block_length=4, steps=8, temperature=1.0, seed=3)
    s2 = decode(tiny_model, PROMPTS, gen_length=8, block_length=4, steps=8, temperature=1.0, seed=3)
    s3 = decode(tiny_model, PROMPTS, gen_length=8, block_length=4, steps=8, temperature=1.0, seed=4)
    assert [r.token_ids for r in s1.rows] == [r.token_ids for r in s2.rows]
    assert [r.token_ids for r in s1.rows] != [r.token_ids for r in s3.rows]


def test_gumbel_max_samples_softmax_over_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40000, 4)
    gen = torch.Generator().manual_seed(0)
    for tau in (0.5, 1.0):
        draws = gumbel_candidates(logits, tau, gen)
        freq = torch.bincount(draws, minlength=4).double() / draws.numel()
        expected = torch.softmax(logits[0].double() / tau, -1)
        assert (freq - expected).abs().max() < 0.01
    assert torch.equal(gumbel_candidates(logits[:2], 0, None), torch.tensor([0, 0]))
    excluded = gumbel_candidates(logits[:1], 1.0, gen, exclude=0)
    assert excluded.item() != 0


def test_random_remasking_fills_every_block(tiny_model):
    out = decode(tiny_model, PROMPTS, gen_length=8, block_length=4, steps=4, remasking="random", seed=1)
    assert all(tiny_model.mask_id not in r.token_ids for r in out.rows)
