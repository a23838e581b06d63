"""Preemption by recompute: a job whose KV slots are dropped (a step out of memory, or live rows over a
lowered token budget) is requeued, rebuilds its slots from the cached passes it ran when admitted again,
and decodes exactly the tokens and NFE of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.decoding.engine import Engine, make_jobs
from evotok_cli.decoding.rows import make_pool
from evotok_cli.jobs.generation import make_decoder
from tests.simulated_memory import out_of_memory_when

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33]]
SETTINGS = {"gen_length": 8, "block_length": 4, "steps": 8}
CACHED = [("hard-mask", {"cache": "dual"}), ("evotoken", {"cache": "prefix"}), ("d2f", {"block_size": "4"})]


def _job(model, decoder, prompt, seed):
    request = GenerationRequest(prompts=[prompt], temperature=0.8, seeds=[seed], **SETTINGS)
    [(_, job)] = make_jobs(model, decoder, request, cohort=1)
    return job


def _solo(model, decoder, prompt, seed):
    request = GenerationRequest(prompts=[prompt], temperature=0.8, seeds=[seed], **SETTINGS)
    return decoder.generate(model, request).rows[0]


def _assert_as_alone(model, decoder, jobs):
    for i, (prompt, job) in enumerate(zip(PROMPTS, jobs)):
        assert job.error is None
        alone = _solo(model, decoder, prompt, seed=i)
        assert job.result.rows[0].token_ids == alone.token_ids
        assert job.result.rows[0].nfe == alone.nfe


@pytest.mark.parametrize("name, options", CACHED)
def test_a_budget_lowered_mid_run_preempts_and_tokens_stay_as_alone(tiny_model, name, options):
    """Every job admitted, three steps run (slots written mid-block), then the budget is cut to one
    canvas: the youngest jobs are preempted and requeued, and finish later from recomputed slots."""
    decoder = make_decoder(name, options)
    engine = Engine(tiny_model, max_rows=8, max_tokens=10_000, merge_rows=False)  # jobs of their own
    jobs = [engine.submit(_job(tiny_model, decoder, p, seed=i)) for i, p in enumerate(PROMPTS)]
    for _ in range(3):
        engine.step()
    assert len(engine.live) == len(PROMPTS)
    engine.max_tokens = 1  # one job at a time from now on
    engine.step()
    assert len(engine.live) == 1 and engine.preemptions == len(PROMPTS) - 1
    engine.run()
    assert engine.preemptions >= len(PROMPTS) - 1
    _assert_as_alone(tiny_model, decoder, jobs)


@pytest.mark.parametrize("name, options", CACHED[:2])
def test_a_row_out_of_memory_alone_preempts_others_rather_than_failing(tiny_model, name, options):
    """Memory for two written slots only: splitting the step cannot help (the slots stay held), so the
    engine drops other jobs' slots (youngest first), lowers its budget to what fit, and every job ends
    with its own tokens."""
    decoder = make_decoder(name, options)
    engine = Engine(tiny_model, max_rows=8, merge_rows=False)  # jobs of their own
    jobs = [engine.submit(_job(tiny_model, decoder, p, seed=i)) for i, p in enumerate(PROMPTS)]
    with out_of_memory_when(tiny_model, lambda _: sum(1 for c in engine.pool.slots.values() if c.filled) > 2):
        engine.run()
    assert engine.preemptions > 0 and engine.retries > 0
    assert engine.max_tokens is not None and engine.max_tokens < sum(j.tokens for j in jobs)
    _assert_as_alone(tiny_model, decoder, jobs)


def test_a_row_out_of_memory_with_nobody_to_preempt_fails_alone(tiny_model):
    decoder = make_decoder("hard-mask", {"cache": "dual"})
    engine = Engine(tiny_model, max_rows=8, merge_rows=False)  # jobs of their own
    job = engine.submit(_job(tiny_model, decoder, PROMPTS[0], seed=0))

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    tiny_model.net.forward = no_memory
    try:
        engine.run()
    finally:
        del tiny_model.net.forward
    assert isinstance(job.error, torch.OutOfMemoryError) and engine.preemptions == 0


@pytest.mark.parametrize("name, options", [*CACHED, ("evotoken", {})])
def test_a_merged_job_out_of_memory_alone_runs_over_fewer_rows(tiny_model, name, options):
    """A merged program is one job: when its forward does not fit (here: more than two rows' worth of
    positions), the engine runs its pass over halves of its rows, halved again while needed, rather than
    failing every row; each row still decodes what it decodes alone."""
    decoder = make_decoder(name, options)
    engine = Engine(tiny_model, max_rows=8)
    jobs = [engine.submit(_job(tiny_model, decoder, p, seed=i)) for i, p in enumerate(PROMPTS)]
    limit = 2 * (max(len(p) for p in PROMPTS) + SETTINGS["gen_length"])  # two of the widest rows
    widths = []

    def two_rows(kwargs):
        widths.append(kwargs["inputs_embeds"].shape[1])
        return widths[-1] > limit

    with out_of_memory_when(tiny_model, two_rows):
        engine.run()
    assert engine.merged_rows == len(PROMPTS) and engine.retries > 0 and engine.preemptions == 0
    assert all(j.passes == 0 for j in jobs)  # every pass ran in the merged program, none in a row's own rerun
    assert any(w > limit for w in widths) and any(w <= limit for w in widths)  # refused, then run in halves
    _assert_as_alone(tiny_model, decoder, jobs)


@pytest.mark.parametrize("mode", ["rowwise", "masked"])
def test_merged_d2f_rows_that_have_ended_never_make_a_split_half_of_their_own(tiny_model, mode):
    """d2f rows that have ended sit the pass out (an empty window): the first two rows here end first, and
    halving the rows as listed made a half that fed no column, whose forward failed every other row. The
    fed rows are halved instead; on both pools every row still decodes as alone."""
    decoder = make_decoder("d2f", {"block_size": "4", "skip_threshold": "0.3", "cache": "false"})
    prompts = [[30, 31, 32, 33], [40, 41], [5, 6, 7], [9, 10, 11, 12, 13, 14], [20]]
    requests = [GenerationRequest(prompts=[p], seeds=[i], gen_length=12) for i, p in enumerate(prompts)]
    engine = Engine(tiny_model, max_rows=8)
    engine.pool = make_pool(tiny_model, mode)
    jobs = [engine.submit(job) for r in requests for _, job in make_jobs(tiny_model, decoder, r, cohort=1)]
    def one_row(kwargs):  # room for one row's positions (rowwise) or one batch row (masked, bucketed)
        x = kwargs["inputs_embeds"]
        return x.shape[0] > 2 if mode == "masked" else x.shape[1] > len(prompts[3]) + 12

    with out_of_memory_when(tiny_model, one_row):
        engine.run()
    assert engine.retries > 0 and engine.preemptions == 0 and engine.merged_rows == len(prompts)
    for request, job in zip(requests, jobs):
        assert job.error is None, job.error
        assert job.result.rows[0].token_ids == decoder.generate(tiny_model, request).rows[0].token_ids
