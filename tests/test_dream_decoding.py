"""Every decoder on a shifted-logit model (Dream: position i is predicted from the output at i - 1),
against the plain references run on logits shifted by hand."""

from __future__ import annotations

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest, parse_options
from evotok_cli.runtime.model import load_model
from evotok_plugins.d2f.decoder import D2FDecoder
from evotok_plugins.evotoken.decoder import EvoTokenDecoder
from evotok_plugins.hard_mask.decoder import HardMaskDecoder
from tests import reference

PROMPTS = [[5, 17, 33, 8], [40, 41], [7, 9, 100]]


@pytest.fixture(scope="module")
def dream(tiny_dream):
    lm = load_model(tiny_dream)
    assert lm.shifted_logits
    return lm


class ShiftedByHand:
    """The Dream model with its logits shifted here (output i-1 -> position i; position 0 keeps its own):
    what the references expect from a model that predicts each position in place."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids=None, **kw):
        out = self.model(input_ids, **kw)
        return torch.cat([out[:, :1], out[:, :-1]], dim=1)


def _run(cls, model, prompts, options=None, **req):
    dec = cls(parse_options(cls.Config, options or {}, decoder=cls.name))
    return dec.generate(model, GenerationRequest(prompts=prompts, **req))


def test_hard_mask_on_dream_equals_reference_with_shifted_logits(dream):
    for prompt in PROMPTS:
        ours = _run(HardMaskDecoder, dream, [prompt], gen_length=16, block_length=8, steps=16)
        ref, _ = reference.llada_generate(ShiftedByHand(dream), prompt, gen_length=16, block_length=8, steps=16,
                                          mask_id=dream.mask_id)
        assert ours.rows[0].token_ids == ref


def test_evotoken_on_dream_equals_reference_with_shifted_logits(dream):
    for prompt in PROMPTS:
        ours = _run(EvoTokenDecoder, dream, [prompt], gen_length=16, block_length=8, steps=16)
        ref, _ = reference.evotoken_generate(ShiftedByHand(dream), prompt, gen_length=16, block_length=8, steps=16,
                                             mask_id=dream.mask_id, alpha=0.7, k=3)
        assert ours.rows[0].token_ids == ref


@pytest.mark.parametrize("cls, options", [
    (HardMaskDecoder, {}), (HardMaskDecoder, {"cache": "prefix"}), (HardMaskDecoder, {"cache": "dual"}),
    (EvoTokenDecoder, {}), (EvoTokenDecoder, {"cache": "prefix"}), (EvoTokenDecoder, {"cache": "dual"}),
])
def test_batches_equal_single_runs_and_are_deterministic(dream, cls, options):
    batch = _run(cls, dream, PROMPTS, options, gen_length=16, block_length=8, steps=16)
    again = _run(cls, dream, PROMPTS, options, gen_length=16, block_length=8, steps=16)
    assert [r.token_ids for r in batch.rows] == [r.token_ids for r in again.rows]
    for prompt, row in zip(PROMPTS, batch.rows):
        alone = _run(cls, dream, [prompt], options, gen_length=16, block_length=8, steps=16)
        assert row.token_ids == alone.rows[0].token_ids and dream.mask_id not in row.token_ids


def test_d2f_cache_stays_exact_with_shifted_logits(dream):
    """With the cache, the first uncached position reads the saved output of the cached prefix; without
    it, the output is recomputed. Block-causal attention makes both the same."""
    for soft in (False, True):
        opts = {"block_size": 4, "skip_threshold": 0.3, "soft": soft}
        cached = _run(D2FDecoder, dream, PROMPTS, opts, gen_length=16)
        plain = _run(D2FDecoder, dream, PROMPTS, {**opts, "cache": False}, gen_length=16)
        assert [r.token_ids for r in cached.rows] == [r.token_ids for r in plain.rows]
        assert [r.nfe for r in cached.rows] == [r.nfe for r in plain.rows]


def test_d2f_on_dream_equals_reference_with_shifted_logits(dream):
    for prompt in PROMPTS:
        ours = _run(D2FDecoder, dream, [prompt], {"block_size": 4, "skip_threshold": 0.2}, gen_length=16)
        ref, nfe = reference.d2f_generate(ShiftedByHand(dream), prompt, max_new=16, block_size=4, add=0.7,
                                          activate=0.95, skip=0.2, mask_id=dream.mask_id, eos_id=dream.eos_id)
        assert ours.rows[0].token_ids == ref and ours.rows[0].nfe == nfe
