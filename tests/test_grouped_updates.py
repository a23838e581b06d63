"""Grouped decoder updates: the rows of every program with the same decoder, options and window shape
update in ONE call per engine step (`engine.Update`), and each row still decodes what it decodes alone."""

from __future__ import annotations

import sys

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.decoding.engine import Engine, Update, make_jobs, run_updates
from evotok_cli.jobs.generation import make_decoder

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33], [40, 41], [50, 51, 52, 53, 54]]
SETTINGS = {"gen_length": 8, "block_length": 4, "steps": 8}


def _solo(model, decoder, prompt, temperature, seed):
    request = GenerationRequest(prompts=[prompt], temperature=temperature, seed=seed, **SETTINGS)
    return decoder.generate(model, request).rows[0]


def _counting(monkeypatch, decoder, name):
    """Wrap the update function the decoder's module hands to `Update`: (rows per call) for every call."""
    module = sys.modules[type(decoder).__module__]
    original = getattr(module, name)
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("name, options, function", [
    ("hard-mask", {}, "llada_rows"),
    ("hard-mask", {"cache": "dual"}, "llada_rows"),
    ("evotoken", {}, "_evolve_rows"),
    ("evotoken", {"cache": "prefix"}, "_evolve_rows"),
    ("evotoken", {"soft_mask": "false", "soft_decoded": "false", "revise": "false"}, "llada_rows"),
])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_of_one_decoder_update_in_one_call_per_step(tiny_model, monkeypatch, name, options, function,
                                                         temperature):
    decoder = make_decoder(name, options)
    calls = _counting(monkeypatch, decoder, function)
    engine = Engine(tiny_model, max_rows=len(PROMPTS))
    jobs = []
    for i, prompt in enumerate(PROMPTS):  # every row its own request and seed, prompts of different lengths
        request = GenerationRequest(prompts=[prompt], temperature=temperature, seeds=[i], **SETTINGS)
        jobs += [engine.submit(job) for _, job in make_jobs(tiny_model, decoder, request, cohort=1)]
    engine.run()
    assert calls == [len(PROMPTS)] * engine.steps  # one call per step, over every row, not one per row
    monkeypatch.undo()
    for i, (prompt, job) in enumerate(zip(PROMPTS, jobs)):
        assert job.error is None
        alone = _solo(tiny_model, decoder, prompt, temperature, seed=i)
        assert job.result.rows[0].token_ids == alone.token_ids and job.result.rows[0].nfe == alone.nfe


def test_rows_in_different_blocks_are_groups_of_their_own(tiny_model, monkeypatch):
    """A row that joins later sits in another block (the block at another offset of evotoken's window): its
    own group."""
    decoder = make_decoder("evotoken", {})
    calls = _counting(monkeypatch, decoder, "_evolve_rows")
    engine = Engine(tiny_model, max_rows=4)
    first = [engine.submit(job) for p in PROMPTS[:2] for _, job in make_jobs(
        tiny_model, decoder, GenerationRequest(prompts=[p], seeds=[0], **SETTINGS), cohort=1)]
    for _ in range(5):  # the first two rows reach their second block
        engine.step()
    late = [engine.submit(job) for _, job in make_jobs(
        tiny_model, decoder, GenerationRequest(prompts=[PROMPTS[2]], seeds=[0], **SETTINGS), cohort=1)]
    engine.run()
    assert 1 in calls and 2 in calls and max(calls) <= 3
    monkeypatch.undo()
    for prompt, job in zip(PROMPTS[:3], first + late):
        assert job.result.rows[0].token_ids == _solo(tiny_model, decoder, prompt, 0.0, 0).token_ids


def test_a_grouped_call_gives_each_request_what_it_gets_alone():
    """`run_updates` stacks the requests' tensors and per-row lists, and splits the results back."""
    seen = []

    def double(x, *, scale, tags):
        seen.append((x.shape[0], list(tags)))
        return x * scale, x.sum(dim=1)

    a = Update(double, "k", (torch.ones(1, 3),), rows={"tags": ["a"]}, shared={"scale": 2.0})
    b = Update(double, "k", (torch.arange(6.0).view(2, 3),), rows={"tags": ["b", "b"]}, shared={"scale": 2.0})
    assert a.group == b.group
    grouped = run_updates([a, b])
    assert seen == [(3, ["a", "b", "b"])]
    for request, result in zip([a, b], grouped):
        alone = request.run()
        assert all(torch.equal(x, y) for x, y in zip(result, alone))
    assert Update(double, "k", (torch.ones(1, 4),)).group != a.group  # another shape: another group


def test_a_failing_grouped_update_fails_its_own_row_only(tiny_model, monkeypatch):
    decoder = make_decoder("hard-mask", {})
    module = sys.modules[type(decoder).__module__]
    original = module.llada_rows

    def fragile(logits, window, confidence, **kwargs):
        if kwargs["generators"][-1] is not None and kwargs["generators"][-1].initial_seed() == 3:
            raise RuntimeError("bad row")
        return original(logits, window, confidence, **kwargs)

    monkeypatch.setattr(module, "llada_rows", fragile)
    engine = Engine(tiny_model, max_rows=4, merge_rows=False)  # programs of their own (merged rows fail together)
    jobs = [engine.submit(job) for i, p in enumerate(PROMPTS[:4]) for _, job in make_jobs(
        tiny_model, decoder, GenerationRequest(prompts=[p], seeds=[i], **SETTINGS), cohort=1)]
    engine.run()
    assert [j.error is not None for j in jobs] == [False, False, False, True]
    monkeypatch.undo()
    for i, job in enumerate(jobs[:3]):
        assert job.result.rows[0].token_ids == _solo(tiny_model, decoder, PROMPTS[i], 0.0, i).token_ids


@pytest.mark.parametrize("ties", [False, True])
def test_rows_of_different_widths_pick_what_each_picks_alone(ties):
    """`select_transfer` over rows ranked over different widths (rows of different prompt lengths): each
    row, tied at the n-th place or not, ranked over its own width, as alone."""
    from evotok_cli.decoding.schedule import select_transfer

    g = torch.Generator().manual_seed(0)
    confidence = torch.rand((6, 8), generator=g, dtype=torch.float64)
    if ties:
        confidence[1:4] = 0.5  # every position tied: which n win depends on how the row is ranked
    eligible = torch.rand((6, 8), generator=g) > 0.2
    eligible[:, :3] = True
    columns = [(3, 11), (5, 40), (1, 9), (20, 200), (3, 11), (0, 8)]
    grouped = select_transfer(confidence, eligible, [3] * 6, None, columns=columns)
    for b in range(6):
        alone = select_transfer(confidence[b:b + 1], eligible[b:b + 1], [3], None, columns=columns[b])
        assert torch.equal(grouped[b:b + 1], alone)
