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
@pytest.mark.parametrize("merge", [True, False])  # one merged program (d2f/merged.py), or a program per row
def test_rows_update_in_one_call_per_step(tiny_model, tiny_dream_model, monkeypatch, dream, options, temperature,
                                          merge):
    model = tiny_dream_model if dream else tiny_model
    decoder = make_decoder("d2f", options)
    calls = _counting(monkeypatch)
    engine = Engine(model, max_rows=len(PROMPTS), merge_rows=merge)
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


def test_groups_follow_what_step_5_reads(tiny_model, monkeypatch):
    """Rows whose block size differs (the stacked shape) or whose skip_threshold differs update in calls of
    their own; rows that differ only in the pipeline's thresholds (what blocks exist, not how a block
    decodes) share one."""
    calls = _counting(monkeypatch)
    engine = Engine(tiny_model, max_rows=8)
    decoders = [make_decoder("d2f", {"block_size": "4"}), make_decoder("d2f", {"block_size": "4",
                                                                             "block_add_threshold": "0.5"}),
                make_decoder("d2f", {"block_size": "2"}), make_decoder("d2f", {"block_size": "4",
                                                                             "skip_threshold": "0.5"})]
    jobs = [_submit(engine, tiny_model, d, PROMPTS[2 * i:2 * i + 2], 0.0) for i, d in enumerate(decoders[:3])]
    jobs.append(_submit(engine, tiny_model, decoders[3], PROMPTS[:2], 0.0))
    engine.step()
    assert sorted(len(c) for c in calls) == [2, 2, 4]  # the first step: three groups, the first two rows' one
    engine.run()
    monkeypatch.undo()
    for i, (decoder, group) in enumerate(zip(decoders, jobs)):
        prompts = PROMPTS[2 * i:2 * i + 2] if i < 3 else PROMPTS[:2]
        _assert_solo(tiny_model, decoder, prompts, group, 0.0)
