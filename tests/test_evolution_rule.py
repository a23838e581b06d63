"""The one EvoToken rule (`evolve`) step by step on a hand-made block, and proof that its three users
(evotoken, CTS training, d2f's soft mode) all go through it."""

from __future__ import annotations

import math
import random

import pytest
import torch

from evotok_cli.decoding import evolution
from evotok_cli.decoding.api import GenerationRequest, parse_options
from evotok_cli.decoding.evolution import Commit, evolve

M = 5  # [MASK]; vocabulary 0..5
K = 2
ALPHA = 0.5
# one block of 4 positions; probabilities over tokens 0..4, [MASK] at 0
P = [[0.10, 0.60, 0.20, 0.05, 0.05],  # x0 = 1, conf 0.6, top-2 (1, 2)
     [0.50, 0.10, 0.10, 0.20, 0.10],  # x0 = 0, conf 0.5, top-2 (0, 3)
     [0.05, 0.10, 0.20, 0.10, 0.55],  # x0 = 4, conf 0.55, top-2 (4, 2)
     [0.30, 0.05, 0.25, 0.20, 0.20]]  # x0 = 0, conf 0.3, top-2 (0, 2)


def block_logits() -> torch.Tensor:
    logits = torch.full((1, 4, 6), float("-inf"), dtype=torch.float64)
    logits[0, :, :5] = torch.tensor(P, dtype=torch.float64).log()
    return logits


def step(tokens, conf, **kw):
    kw.setdefault("k", K)
    kw.setdefault("alpha", ALPHA)
    return evolve(block_logits(), torch.tensor([tokens]), torch.tensor([conf], dtype=torch.float64), mask_id=M, **kw)


def close(t: torch.Tensor, expected) -> bool:
    return torch.allclose(t, torch.tensor(expected, dtype=t.dtype), rtol=0, atol=1e-12)


def test_commit_by_count_revision_and_soft_inputs():
    # position 2 holds token 3 with stored confidence 0.5; the others are [MASK]
    out = step([M, M, 3, M], [0, 0, 0.5, 0], commit=Commit(counts=[2]))
    # the two most confident [MASK]s (0.6, 0.5) take their candidates; 0.3 waits
    assert out.committed.tolist() == [[True, True, False, False]]
    # position 2: the candidate's 0.55 beats the stored 0.5, so token 3 becomes 4
    assert out.revised.tolist() == [[False, False, True, False]]
    assert out.tokens.tolist() == [[1, 0, 4, M]]
    assert close(out.confidence, [[0.6, 0.5, 0.55, 0]])
    # Soft(V): the top-k renormalised, own slot at weight 0
    assert out.soft_ids[0, :3].tolist() == [[1, 2, 1], [0, 3, 0], [4, 2, 4]]
    assert close(out.soft_weights[0, :3], [[0.75, 0.25, 0], [0.5 / 0.7, 0.2 / 0.7, 0], [0.55 / 0.75, 0.2 / 0.75, 0]])
    # Soft([MASK]+V): (1 - alpha) times the renormalised top-k, [MASK] slot at exactly alpha
    assert out.soft_ids[0, 3].tolist() == [0, 2, M]
    assert close(out.soft_weights[0, 3], [0.5 * 0.3 / 0.55, 0.5 * 0.25 / 0.55, ALPHA])


def test_commit_by_threshold():
    start = ([M, M, M, M], [0, 0, 0, 0])
    assert step(*start, commit=Commit(threshold=0.45)).committed.tolist() == [[True, True, True, False]]
    assert step(*start, commit=Commit(threshold=0.52)).committed.tolist() == [[True, False, True, False]]
    # nothing over the threshold: Fast-dLLM still commits the most confident one
    assert step(*start, commit=Commit(threshold=0.9)).committed.tolist() == [[True, False, False, False]]
    assert not step(*start, commit=Commit(threshold=0.9, at_least_one=False)).committed.any()
    # D2F: groups of 2 columns (its blocks); only a fully activated block takes its best one
    for full, expected in (([True, False], [True, False, False, False]), ([False, True], [False, False, True, False])):
        d2f = Commit(threshold=0.9, strict=True, at_least_one=torch.tensor(full), group=2)
        assert step(*start, commit=d2f).committed.tolist() == [expected]
    # >= (Fast-dLLM) takes a confidence equal to the threshold, > (D2F) does not
    exact = float(step(*start, commit=Commit(counts=[1])).confidence[0, 0])
    assert step(*start, commit=Commit(threshold=exact, at_least_one=False)).committed.tolist() == [[True, False, False, False]]
    assert not step(*start, commit=Commit(threshold=exact, strict=True, at_least_one=False)).committed.any()


def test_revision_is_strictly_greater_and_never_remasks():
    first = step([M, M, 3, M], [0, 0, 0.5, 0], commit=Commit(counts=[2]))
    # the same prediction again: every stored confidence equals the candidate's, so nothing changes
    again = evolve(block_logits(), first.tokens, first.confidence, mask_id=M, k=K, alpha=ALPHA)
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.confidence, first.confidence)
    assert not again.revised.any() and not again.committed.any()
    # equal confidence but a different stored token: kept (strictly greater only)
    tokens = first.tokens.clone()
    tokens[0, 0] = 3
    kept = evolve(block_logits(), tokens, first.confidence, mask_id=M, k=K, alpha=ALPHA)
    assert kept.tokens[0, 0] == 3 and not kept.revised.any()
    # a higher stored confidence keeps its token; a [MASK] is never revised, even when [MASK] is likely
    logits = block_logits()
    logits[0, :, M] = 5.0  # evotoken candidates never take [MASK]
    out = evolve(logits, torch.tensor([[2, M, 4, M]]), torch.tensor([[0.99, 0, 0, 0]], dtype=torch.float64),
                 mask_id=M, k=K, alpha=ALPHA)
    assert out.tokens.tolist() == [[2, M, 4, M]] and M not in out.soft_ids[0, :, :K].flatten().tolist()
    # CTS keeps the release's quirk T2: its argmax may be [MASK], which then replaces a decoded token
    cts = evolve(logits, torch.tensor([[2, M, 4, M]]), torch.zeros(1, 4, dtype=torch.float64), mask_id=M,
                 candidates="cts", k=K, alpha=ALPHA)
    assert cts.tokens.tolist() == [[M, M, M, M]]


def test_window_live_frozen_and_one_alpha_per_row():
    logits = block_logits().expand(2, 4, 6).clone()
    tokens = torch.tensor([[M, M, 3, M], [M, M, 3, M]])
    conf = torch.tensor([[0, 0, 0.5, 0]] * 2, dtype=torch.float64)
    out = evolve(logits, tokens, conf, mask_id=M, window=(1, 4), commit=Commit(counts=[1, 0]),
                 live=torch.tensor([[True], [False]]), k=K, alpha=[0.5, 0.8],
                 frozen=torch.tensor([True, False, False, False]))
    # row 0: column 0 is outside the window; row 1 is not live (its block is done): nothing changes
    assert out.tokens.tolist() == [[M, 0, 4, M], [M, M, 3, M]]
    # frozen column 0 is one-hot on its token ([Decode]); each row mixes with its own alpha
    assert out.soft_ids[:, 0].tolist() == [[M, M, M], [M, M, M]] and close(out.soft_weights[:, 0], [[0, 0, 1]] * 2)
    assert math.isclose(out.soft_weights[0, 3, -1], 0.5) and math.isclose(out.soft_weights[1, 3, -1], 0.8)
    # no k: no soft inputs (d2f without soft states)
    assert step([M, M, 3, M], [0, 0, 0.5, 0], k=None).soft_ids is None


def test_inputs_are_left_as_they_were():
    logits, tokens = block_logits(), torch.tensor([[M, M, 3, M]])
    conf = torch.tensor([[0, 0, 0.5, 0]], dtype=torch.float64)
    copies = logits.clone(), tokens.clone(), conf.clone()
    evolve(logits, tokens, conf, mask_id=M, commit=Commit(counts=[2]), k=K, alpha=ALPHA)
    assert all(torch.equal(a, b) for a, b in zip(copies, (logits, tokens, conf)))


# -- the three users -----------------------------------------------------------------------------------
@pytest.fixture
def calls(monkeypatch):
    """Route every user's `evolve` through a counter; each must import the shared function itself."""
    import evotok_plugins.d2f.blocks
    import evotok_plugins.evotoken.decoder
    from evotok_cli.training import cts

    seen: dict[str, int] = {}
    for name, module in (("evotoken", evotok_plugins.evotoken.decoder), ("d2f", evotok_plugins.d2f.blocks), ("cts", cts)):
        assert module.evolve is evolution.evolve, name

        def counting(*args, _name=name, **kw):
            seen[_name] = seen.get(_name, 0) + 1
            return evolution.evolve(*args, **kw)

        monkeypatch.setattr(module, "evolve", counting)
    return seen


def test_each_user_calls_the_rule(calls, tiny_model, tiny_llada):
    from evotok_cli.runtime.model import load_model
    from evotok_cli.training.cts import CTSSettings, cts_step
    from evotok_cli.training.objectives import Batch
    from evotok_plugins.d2f.decoder import D2FDecoder
    from evotok_plugins.evotoken.decoder import EvoTokenDecoder

    evo = EvoTokenDecoder(parse_options(EvoTokenDecoder.Config, {}, decoder="evotoken"))
    out = evo.generate(tiny_model, GenerationRequest(prompts=[[5, 17, 33]], gen_length=8, block_length=4, steps=8))
    assert calls["evotoken"] == out.nfe == 8  # once per pass
    d2f = D2FDecoder(parse_options(D2FDecoder.Config, {"soft": True, "block_size": 4}, decoder="d2f"))
    out = d2f.generate(tiny_model, GenerationRequest(prompts=[[5, 17, 33]], gen_length=8))
    assert calls["d2f"] == out.nfe
    lm = load_model(tiny_llada)
    lm.net.requires_grad_(True)
    batch = Batch(torch.randint(5, lm.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)),
                  torch.tensor([6, 9]))
    cts_step(lm.net, lm, batch, CTSSettings(trajectory_steps=3, decode_counts=[1], block_sizes=[8]),
             rng=random.Random(0))
    assert calls["cts"] == 2  # between passes; the state after the last one is discarded
