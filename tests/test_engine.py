"""The step engine: rows join at any step and leave when done, share forwards, and each row decodes the
tokens it decodes alone."""

from __future__ import annotations

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.decoding.engine import Engine, Job, drive, make_jobs
from evotok_cli.generation import make_decoder

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33], [40, 41]]
SETTINGS = {"gen_length": 8, "block_length": 4, "steps": 8}


def _solo(model, decoder, prompt, temperature=0.0, seed=0):
    request = GenerationRequest(prompts=[prompt], temperature=temperature, seed=seed, **SETTINGS)
    return decoder.generate(model, request).rows[0]


def _job(model, decoder, prompt, temperature=0.0, seed=0):
    request = GenerationRequest(prompts=[prompt], temperature=temperature, seeds=[seed], **SETTINGS)
    [(_, job)] = make_jobs(model, decoder, request, cohort=1)
    return job


@pytest.mark.parametrize("name, options", [
    ("hard-mask", {}), ("evotoken", {}), ("evotoken", {"threshold": "0.5"}), ("hard-mask", {"remasking": "random"}),
    ("d2f", {"block_size": "4"}), ("d2f", {"block_size": "4", "soft": "true"}), ("hard-mask", {"cfg_scale": "1.5"}),
])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_joining_at_different_steps_decode_what_they_decode_alone(tiny_model, name, options, temperature):
    decoder = make_decoder(name, options)
    engine = Engine(tiny_model, max_rows=3)
    jobs = []
    for i, prompt in enumerate(PROMPTS):  # a new row every step, while earlier ones are mid-block
        jobs.append(engine.submit(_job(tiny_model, decoder, prompt, temperature, seed=i)))
        engine.step()
        assert engine.live_rows <= 3
    engine.run()
    for i, (prompt, job) in enumerate(zip(PROMPTS, jobs)):
        assert job.error is None and job.done.is_set()
        alone = _solo(tiny_model, decoder, prompt, temperature, seed=i)
        assert job.result.rows[0].token_ids == alone.token_ids
        assert job.result.rows[0].nfe == alone.nfe


def test_uncached_rows_share_one_forward_per_step(tiny_model):
    decoder = make_decoder("evotoken", {})
    engine = Engine(tiny_model, max_rows=8)
    for prompt in PROMPTS:
        engine.submit(_job(tiny_model, decoder, prompt))
    calls = []
    original = tiny_model.net.forward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("inputs_embeds", args[0] if args else None).shape[0])
        return original(*args, **kwargs)

    tiny_model.net.forward = counting
    try:
        engine.run()
    finally:
        del tiny_model.net.forward
    assert len(calls) == engine.steps == engine.passes == 8  # 8 passes each, all rows in every forward
    assert calls[0] == len(PROMPTS)


def test_a_finished_row_is_refilled_from_the_queue_at_once(tiny_model):
    decoder = make_decoder("hard-mask", {})
    engine = Engine(tiny_model, max_rows=2)
    short = GenerationRequest(prompts=[[5, 6]], gen_length=4, block_length=4, steps=2, seeds=[0])
    jobs = [engine.submit(make_jobs(tiny_model, decoder, short, cohort=1)[0][1])]
    jobs += [engine.submit(_job(tiny_model, decoder, p)) for p in PROMPTS[:3]]
    live = []
    while engine.step():
        live.append(sorted(j.id for j in engine.live))
    assert jobs[0].result.rows[0].nfe == 2
    assert jobs[2].admitted is not None and jobs[2].admitted >= jobs[0].finished  # took the short row's place
    assert max(len(ids) for ids in live) == 2 and all(j.done.is_set() for j in jobs)


def test_cancel_drops_a_job_at_the_next_step_and_others_go_on(tiny_model):
    decoder = make_decoder("hard-mask", {})
    engine = Engine(tiny_model, max_rows=4)
    keep, drop = engine.submit(_job(tiny_model, decoder, PROMPTS[0])), engine.submit(_job(tiny_model, decoder, PROMPTS[1]))
    engine.step()
    drop.cancel()
    engine.step()
    assert drop.done.is_set() and drop.result is None and drop not in engine.live
    engine.run()
    assert keep.result.rows[0].token_ids == _solo(tiny_model, decoder, PROMPTS[0]).token_ids


def test_a_failing_job_fails_alone(tiny_model):
    decoder = make_decoder("hard-mask", {})
    engine = Engine(tiny_model, max_rows=4)
    too_long = GenerationRequest(prompts=[[5] * 300], seeds=[0], **SETTINGS)  # longer than the model's 256
    bad = engine.submit(make_jobs(tiny_model, decoder, too_long, cohort=1)[0][1])
    good = engine.submit(_job(tiny_model, decoder, PROMPTS[0]))
    engine.run()
    assert "exceeds the model's maximum" in str(bad.error) and good.result is not None


def test_a_cached_batch_is_one_cohort_and_matches_the_batch_decoder(tiny_model):
    decoder = make_decoder("evotoken", {"cache": "dual"})
    request = GenerationRequest(prompts=PROMPTS, seed=0, **SETTINGS)
    jobs = make_jobs(tiny_model, decoder, request, cohort=2)
    assert [first for first, _ in jobs] == [0, 2, 4] and [j.rows for _, j in jobs] == [2, 2, 1]
    engine = Engine(tiny_model, max_rows=4)
    for _, job in jobs:
        engine.submit(job)
    engine.run()
    for first, job in jobs:
        alone = drive(tiny_model, decoder.program(tiny_model, GenerationRequest(
            prompts=PROMPTS[first:first + job.rows], seed=first, **SETTINGS)))
        assert [r.token_ids for r in job.result.rows] == [r.token_ids for r in alone.rows]


def test_a_decoder_without_a_program_still_runs(tiny_model):
    class Closed:
        name, Config = "closed", None

        def generate(self, model, request):
            return make_decoder("hard-mask", {}).generate(model, request)

    request = GenerationRequest(prompts=PROMPTS[:3], seed=0, **SETTINGS)
    jobs = make_jobs(tiny_model, Closed(), request, cohort=2)
    engine = Engine(tiny_model, max_rows=2)
    for _, job in jobs:
        engine.submit(job)
    engine.run()
    rows = [r.token_ids for _, job in jobs for r in job.result.rows]
    assert rows == [_solo(tiny_model, make_decoder("hard-mask", {}), p).token_ids for p in PROMPTS[:3]]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_gives_every_prompt_the_same_tokens_at_any_batch_size(tiny_model, temperature):
    from evotok_cli.generation import generate
    from evotok_cli.prompts import Prompt

    decoder = make_decoder("evotoken", {})
    outputs = []
    for batch_size in (1, 2, 5):
        results, _ = generate(tiny_model, "evotoken", decoder, [Prompt(None, ids=p) for p in PROMPTS],
                              temperature=temperature, seed=3, batch_size=batch_size, **SETTINGS)
        outputs.append([r["token_ids"] for r in results])
    assert outputs[0] == outputs[1] == outputs[2]


def test_background_engine_runs_jobs_submitted_from_another_thread(tiny_model):
    from evotok_cli.decoding.engine import BackgroundEngine

    decoder = make_decoder("hard-mask", {})
    loop = BackgroundEngine(Engine(tiny_model, max_rows=4))
    try:
        jobs = [loop.submit(_job(tiny_model, decoder, p)) for p in PROMPTS]
        assert all(j.done.wait(60) for j in jobs)
        assert [j.result.rows[0].token_ids for j in jobs] == [_solo(tiny_model, decoder, p).token_ids for p in PROMPTS]
    finally:
        assert loop.stop(timeout=10)


def test_drive_is_generate(tiny_model):
    decoder = make_decoder("hard-mask", {})
    request = GenerationRequest(prompts=PROMPTS[:2], seed=0, **SETTINGS)
    assert ([r.token_ids for r in drive(tiny_model, decoder.program(tiny_model, request)).rows]
            == [r.token_ids for r in decoder.generate(tiny_model, request).rows])
    assert isinstance(Job(None, rows=1).seconds, float) and torch.is_grad_enabled()
