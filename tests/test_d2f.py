"""D2F pipelined decoding: the block-causal mask, cache exactness, the add/activate/retire order and the
EOS stop (spec 6.4 and 8)."""

from __future__ import annotations

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest, parse_options
from evotok_plugins.d2f.decoder import D2FDecoder, PipelineBlock, block_causal_mask
from tests import reference

PROMPTS = [[5, 17, 33], [40, 41, 42, 43, 44]]


class NoStopTokens:
    """The tiny model with EOS/EOT logits at -inf, so a scripted pipeline is never cut short by a random
    EOS; everything else is the real model."""

    def __init__(self, model, force_first_eos: bool = False):
        self.model, self.force_first_eos, self.calls = model, force_first_eos, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids=None, **kw):
        logits = self.model(input_ids, **kw).clone()
        for t in self.model.stop_ids:
            logits[..., t] = float("-inf")
        self.calls += 1
        if self.force_first_eos and self.calls == 1:
            logits[..., 0, self.model.eos_id] = 1e4  # the first position of the first block says EOS
        return logits


def decode(model, prompts, trace=None, gen_length=12, **opts):
    dec = D2FDecoder(parse_options(D2FDecoder.Config, opts, decoder="d2f"))
    events: list = []
    out = dec.generate(model, GenerationRequest(prompts=prompts, gen_length=gen_length, trace=trace is not None,
                                                on_event=events.append))
    if trace is not None:
        trace.extend(events)
    return out


def test_block_causal_mask_layout():
    blocks = [PipelineBlock(0, 3), PipelineBlock(3, 5), PipelineBlock(5, 7)]
    mask = block_causal_mask(blocks, 0, 7, "cpu")[0, 0].int()
    expected = torch.tensor([[1, 1, 1, 0, 0, 0, 0]] * 3 + [[1, 1, 1, 1, 1, 0, 0]] * 2 + [[1] * 7] * 2)
    assert torch.equal(mask, expected)
    tail = block_causal_mask(blocks, 3, 7, "cpu")[0, 0].int()  # queries from block 1 on, keys from 0
    assert torch.equal(tail, expected[3:])


def test_cached_logits_equal_uncached(tiny_model):
    """Under block-causal attention, the K/V of finished blocks never change: caching them is exact."""
    blocks = [PipelineBlock(0, 4), PipelineBlock(4, 8), PipelineBlock(8, 12)]
    ids = torch.randint(5, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = tiny_model(ids, attention_mask=block_causal_mask(blocks, 0, 12, "cpu"))
        cache = tiny_model.new_cache(1, 12)
        tiny_model(ids[:, :8], attention_mask=block_causal_mask(blocks[:2], 0, 8, "cpu"), cache=cache)
        tail = tiny_model(ids[:, 8:], attention_mask=block_causal_mask(blocks, 8, 12, "cpu"), cache=cache, start=8)
    assert torch.allclose(full[:, 8:], tail, atol=1e-4, rtol=1e-5)


def test_cache_on_and_off_give_the_same_tokens(tiny_model):
    for soft in (False, True):
        a = decode(tiny_model, PROMPTS, gen_length=16, block_size=4, skip_threshold=0.3, soft=soft)
        b = decode(tiny_model, PROMPTS, gen_length=16, block_size=4, skip_threshold=0.3, soft=soft, cache=False)
        assert [r.token_ids for r in a.rows] == [r.token_ids for r in b.rows]
        assert [r.nfe for r in a.rows] == [r.nfe for r in b.rows]


def test_pipeline_order_on_a_scripted_case(tiny_model):
    """skip_threshold 1.0: fully activated blocks commit exactly one token per pass, semi-activated none,
    so the pipeline's evolution is fixed by the rules alone (worked out by hand in the comments)."""
    trace: list = []
    out = decode(NoStopTokens(tiny_model), [PROMPTS[0]], trace, gen_length=12, block_size=4,
                 block_add_threshold=0.5, decoded_token_threshold=0.75, skip_threshold=1.0)
    layout = [[(b["start"], b["state"], b["fully_activated"], b["progress"]) for b in e.blocks] for e in trace]
    assert layout == [
        [(0, "active", True, 0.25)],  # block 1 added, fully activated by the complete prompt
        [(0, "active", True, 0.5)],
        [(0, "active", True, 0.75), (4, "active", False, 0.0)],  # block 2 added at 0.5, semi: commits nothing
        [(0, "active", True, 1.0), (4, "active", True, 0.25)],  # block 1 at 0.75 fully activates block 2
        [(0, "in_cache", True, 1.0), (4, "active", True, 0.5)],  # block 1 retired and cached by this pass
        [(0, "in_cache", True, 1.0), (4, "active", True, 0.75), (8, "active", False, 0.0)],
        [(0, "in_cache", True, 1.0), (4, "active", True, 1.0), (8, "active", True, 0.25)],
        [(0, "in_cache", True, 1.0), (4, "in_cache", True, 1.0), (8, "active", True, 0.5)],
        [(0, "in_cache", True, 1.0), (4, "in_cache", True, 1.0), (8, "active", True, 0.75)],
        [(0, "in_cache", True, 1.0), (4, "in_cache", True, 1.0), (8, "active", True, 1.0)],
    ]
    assert out.rows[0].nfe == 10 and tiny_model.mask_id not in out.rows[0].token_ids
    assert all(len(e.committed) == sum(b["fully_activated"] and b["state"] == "active" for b in e.blocks)
               for e in trace)


def test_eos_stops_new_blocks(tiny_model):
    trace: list = []
    out = decode(NoStopTokens(tiny_model, force_first_eos=True), [PROMPTS[0]], trace, gen_length=16, block_size=4,
                 block_add_threshold=0.25, skip_threshold=1.0)
    assert max(len(e.blocks) for e in trace) == 1  # EOS committed in pass 1: no block is ever added
    tokens = out.rows[0].token_ids
    assert tokens[0] == tiny_model.eos_id and tokens[4:] == [tiny_model.eos_id] * 12
    assert tiny_model.mask_id not in tokens


def test_soft_mode_states_and_no_mask_left(tiny_model):
    trace: list = []
    out = decode(tiny_model, PROMPTS, trace, gen_length=16, block_size=8, skip_threshold=0.5, soft=True)
    seen = {s for e in trace for s in e.states}
    assert {"mask", "soft_mask"} <= seen
    assert all(tiny_model.mask_id not in r.token_ids for r in out.rows)


@pytest.mark.parametrize("block, add, activate, skip", [
    (4, 0.7, 0.95, 0.9), (4, 0.25, 0.5, 0.2), (8, 0.5, 0.75, 0.05), (4, 0.0, 0.0, 0.3)])
def test_tokens_and_nfe_equal_a_plain_reference(tiny_model, block, add, activate, skip):
    for prompt in PROMPTS + [[7, 9, 100]]:
        ours = decode(tiny_model, [prompt], gen_length=16, block_size=block, block_add_threshold=add,
                      decoded_token_threshold=activate, skip_threshold=skip)
        ref, nfe = reference.d2f_generate(tiny_model, prompt, max_new=16, block_size=block, add=add,
                                          activate=activate, skip=skip, mask_id=tiny_model.mask_id,
                                          eos_id=tiny_model.eos_id)
        assert ours.rows[0].token_ids == ref and ours.rows[0].nfe == nfe
