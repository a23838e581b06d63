"""d2f's step 5 as a grouped update: the active blocks of every d2f row with the same options and block size
update in ONE call per engine step (`blocks.d2f_blocks`), rows with different numbers of active blocks
included, and each row still decodes the tokens and NFE it decodes alone (LLaDA and Dream, soft on and off,
T=0 and sampled with each row's own seed)."""

from __future__ import annotations

import pytest

from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.decoding.engine import Engine, make_jobs
from evotok_cli.jobs.generation import make_decoder
from evotok_plugins.d2f import blocks

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33], [40, 41], [50, 51, 52, 53, 54]]
GEN = 12


@pytest.fixture(scope="module")
def tiny_dream_model(tiny_dream):
    from evotok_cli.runtime.model import load_model
    return load_model(tiny_dream)


def _counting(monkeypatch) -> list[list[int]]:
    """Wrap `d2f_blocks`: for every call, the number of blocks of each row in it (a row's blocks share its
    generator, in order)."""
    original = blocks.d2f_blocks
    calls: list[list[int]] = []

    def counted(*args, **kwargs):
        per_row: list[int] = []
        previous = object()
        for g in kwargs["generators"]:
            if g is previous:
                per_row[-1] += 1
            else:
                per_row.append(1)
            previous = g
        assert sum(per_row) == args[0].shape[0]
        calls.append(per_row)
        return original(*args, **kwargs)

    monkeypatch.setattr(blocks, "d2f_blocks", counted)
    return calls


def _submit(engine, model, decoder, prompts, temperature, first_seed=0):
    jobs = []
    for i, prompt in enumerate(prompts):  # every row its own request and seed
        request = GenerationRequest(prompts=[prompt], gen_length=GEN, temperature=temperature,
                                    seeds=[first_seed + i])
        jobs += [engine.submit(job) for _, job in make_jobs(model, decoder, request, cohort=1)]
    return jobs


def _assert_solo(model, decoder, prompts, jobs, temperature, first_seed=0):
    for i, (prompt, job) in enumerate(zip(prompts, jobs)):
        assert job.error is None
        alone = decoder.generate(model, GenerationRequest(prompts=[prompt], gen_length=GEN, temperature=temperature,
                                                          seeds=[first_seed + i])).rows[0]
        assert (job.result.rows[0].token_ids, job.result.rows[0].nfe) == (alone.token_ids, alone.nfe)


@pytest.mark.parametrize("dream", [False, True])
@pytest.mark.parametrize("options", [{"block_size": "4"}, {"block_size": "4", "soft": "true"},
                                     {"block_size": "4", "skip_threshold": "0.2", "block_add_threshold": "0.25"}])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_rows_update_in_one_call_per_step(tiny_model, tiny_dream_model, monkeypatch, dream, options, temperature):
    model = tiny_dream_model if dream else tiny_model
    decoder = make_decoder("d2f", options)
    calls = _counting(monkeypatch)
    engine = Engine(model, max_rows=len(PROMPTS))
    jobs = _submit(engine, model, decoder, PROMPTS, temperature)
    engine.run()
    assert len(calls) == engine.steps  # one call per step, not one per row
    assert all(len(c) == len(PROMPTS) for c in calls[:2])  # every row in it while all are live
    assert any(sum(c) > len(c) for c in calls)  # rows pipeline several blocks: stacked along dim 0
    if "skip_threshold" in options:  # rows that commit at their own pace: different block counts in one call
        assert any(len(set(c)) > 1 for c in calls)
    monkeypatch.undo()
    _assert_solo(model, decoder, PROMPTS, jobs, temperature)


def test_rows_with_different_block_counts_share_the_call(tiny_model, monkeypatch):
    """Rows that joined at different steps hold different numbers of active blocks in the same call; the
    engine hands each its own blocks back (split by each request's dim-0 length)."""
    decoder = make_decoder("d2f", {"block_size": "4"})
    calls = _counting(monkeypatch)
    engine = Engine(tiny_model, max_rows=len(PROMPTS))
    early = _submit(engine, tiny_model, decoder, PROMPTS[:3], 0.9)
    for _ in range(3):  # the early rows add their second block
        engine.step()
    late = _submit(engine, tiny_model, decoder, PROMPTS[3:], 0.9, first_seed=3)
    engine.run()
    assert any(len(set(c)) > 1 for c in calls)  # one call holding rows with 1 and with 2+ active blocks
    monkeypatch.undo()
    _assert_solo(tiny_model, decoder, PROMPTS, early + late, 0.9)


def test_other_options_are_another_group(tiny_model, monkeypatch):
    """Rows whose options change the outcome (here the block size) update in a call of their own."""
    calls = _counting(monkeypatch)
    engine = Engine(tiny_model, max_rows=4)
    fours, twos = make_decoder("d2f", {"block_size": "4"}), make_decoder("d2f", {"block_size": "2"})
    jobs4 = _submit(engine, tiny_model, fours, PROMPTS[:2], 0.0)
    jobs2 = _submit(engine, tiny_model, twos, PROMPTS[2:4], 0.0)
    engine.step()
    assert [len(c) for c in calls] == [2, 2]  # the first step: two groups of two rows
    engine.run()
    monkeypatch.undo()
    _assert_solo(tiny_model, fours, PROMPTS[:2], jobs4, 0.0)
    _assert_solo(tiny_model, twos, PROMPTS[2:4], jobs2, 0.0, first_seed=0)
