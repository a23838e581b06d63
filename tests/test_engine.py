"""The step engine: rows join at any step and leave when done, share forwards, and each row decodes the
tokens it decodes alone."""

from __future__ import annotations

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.decoding.engine import Engine, Job, decode_together, drive, make_jobs
from evotok_cli.jobs.generation import make_decoder
from tests.simulated_memory import out_of_memory_when

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
        calls.append(len(kwargs["cache"].spans))  # the rows packed into the forward
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


MIXED = [("hard-mask", {"cache": "prefix"}), ("hard-mask", {"cache": "dual"}), ("evotoken", {"cache": "prefix"}),
         ("evotoken", {"cache": "dual", "threshold": "0.5"}), ("d2f", {"block_size": "4"}), ("hard-mask", {}),
         ("hard-mask", {"cfg_scale": "1.5"}), ("d2f", {"block_size": "4", "soft": "true", "cache": "false"}),
         ("evotoken", {})]


def _counting(model):
    """Count the network's forwards (a list of their batch sizes)."""
    calls = []
    original = model.net.forward

    def counting(*args, **kwargs):
        calls.append(len(kwargs["cache"].spans))  # the rows packed into the forward
        return original(*args, **kwargs)

    model.net.forward = counting
    return calls


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_every_decoder_and_cache_mode_shares_one_forward_per_step(tiny_model, temperature):
    """Cached windows (prefix, dual), d2f's block-causal pipeline, guidance's paired rows and uncached rows
    of different prompt lengths in one forward per step; each row decodes what it decodes alone, with its
    own seed."""
    engine = Engine(tiny_model, max_rows=len(MIXED) + 1)
    jobs = []
    for i, (name, options) in enumerate(MIXED):
        decoder = make_decoder(name, options)
        jobs.append((decoder, PROMPTS[i % len(PROMPTS)], i, engine.submit(_job(tiny_model, decoder, PROMPTS[i % len(PROMPTS)],
                                                                            temperature, seed=i))))
    calls = _counting(tiny_model)
    try:
        engine.run()
    finally:
        del tiny_model.net.forward
    assert len(calls) == engine.steps == engine.passes
    assert calls[0] == len(MIXED) + 1  # guidance's pair is two rows
    for decoder, prompt, seed, job in jobs:
        assert job.error is None
        alone = _solo(tiny_model, decoder, prompt, temperature, seed=seed)
        assert job.result.rows[0].token_ids == alone.token_ids and job.result.rows[0].nfe == alone.nfe
    assert not engine.pool.slots  # every slot went back with its job


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_cached_batch_gives_every_row_its_own_random_stream(tiny_model, mode):
    """The engine's rows (generate, bench, serve): each cached row samples what it samples alone from its
    own seed (a cached batch used to be one cohort drawing from its first row's stream)."""
    decoder = make_decoder("evotoken", {"cache": mode})
    request = GenerationRequest(prompts=PROMPTS, seed=7, temperature=0.9, **SETTINGS)
    jobs = make_jobs(tiny_model, decoder, request, cohort=2)
    assert [first for first, _ in jobs] == [0, 1, 2, 3, 4] and all(j.rows == 1 for _, j in jobs)
    batch = decode_together(tiny_model, decoder, request)
    solo = [_solo(tiny_model, decoder, p, 0.9, seed=7 + i).token_ids for i, p in enumerate(PROMPTS)]
    assert [r.token_ids for r in batch.rows] == solo
    assert len(set(map(tuple, solo))) > 1


def test_a_library_cohort_program_keeps_working(tiny_model):
    """A program over several padded rows (a library caller's `decoder.program(request)`), cached: its rows
    get slots of the pool and attend over their real keys, as they did with a cache of their own."""
    decoder = make_decoder("hard-mask", {"cache": "dual"})
    request = GenerationRequest(prompts=PROMPTS[:3], seed=0, **SETTINGS)
    cohort = drive(tiny_model, decoder.program(tiny_model, request))
    assert [r.token_ids for r in cohort.rows] == [_solo(tiny_model, decoder, p).token_ids for p in PROMPTS[:3]]


def test_a_pass_with_its_own_cache_object_still_runs(tiny_model):
    """The interface before the pool: a program that yields a cache object of its own runs alone."""
    from evotok_cli.decoding.engine import ForwardPass

    def old_style(model, prompt):
        x = torch.tensor([prompt])
        cache = model.new_cache(1, len(prompt))
        logits = yield ForwardPass({"input_ids": x}, position_ids=None, cache=cache, logits_slice=(0, len(prompt)))
        from evotok_cli.decoding.api import GenerationResult, RowResult
        return GenerationResult(rows=[RowResult(token_ids=logits.argmax(-1)[0].tolist(), nfe=1)], nfe=1)

    engine = Engine(tiny_model, max_rows=4)
    old = engine.submit(Job(old_style(tiny_model, PROMPTS[1]), rows=1))
    new = engine.submit(_job(tiny_model, make_decoder("hard-mask", {"cache": "dual"}), PROMPTS[0]))
    engine.run()
    assert old.error is None and len(old.result.rows[0].token_ids) == len(PROMPTS[1])
    assert new.result.rows[0].token_ids == _solo(tiny_model, make_decoder("hard-mask", {"cache": "dual"}),
                                                 PROMPTS[0]).token_ids


def test_an_out_of_memory_step_is_retried_in_halves(tiny_model):
    """A forward that does not fit is split in two before any row fails; the rows' tokens stay their own."""
    decoder = make_decoder("evotoken", {"cache": "dual"})
    engine = Engine(tiny_model, max_rows=8)
    jobs = [engine.submit(_job(tiny_model, decoder, p, seed=i)) for i, p in enumerate(PROMPTS)]
    with out_of_memory_when(tiny_model, lambda kwargs: len(kwargs["cache"].spans) > 2):  # > two rows packed
        engine.run()
    assert engine.retries > 0
    for i, (prompt, job) in enumerate(zip(PROMPTS, jobs)):
        assert job.error is None
        assert job.result.rows[0].token_ids == _solo(tiny_model, decoder, prompt, seed=i).token_ids


def test_admission_by_tokens_in_flight(tiny_model):
    """With a token budget the engine admits what fits beside the live rows (and a job alone always)."""
    decoder = make_decoder("hard-mask", {"cache": "prefix"})
    engine = Engine(tiny_model, max_rows=64, max_tokens=25)  # canvases of 8 + 3..14 tokens: two at most
    jobs = [engine.submit(_job(tiny_model, decoder, p)) for p in PROMPTS]
    peak = 0
    while engine.step():
        peak = max(peak, engine.live_tokens)
        assert engine.live_tokens <= 25 or len(engine.live) == 1
    assert all(j.result is not None for j in jobs) and peak > 0


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
    from evotok_cli.jobs.generation import generate
    from evotok_cli.runtime.prompts import Prompt

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


def test_at_most_one_read_back_per_step(tiny_model):
    """Threshold liveness, d2f's block progress and EOS, and finished rows' tokens: every row's reads of a
    step are one device-to-host copy (`HostRead`), however many rows there are."""
    from tests.test_syncs import SyncCounter

    tiny_model.logits_checked = True  # the one-off NaN check of the first forward is not a per-step cost
    engine = Engine(tiny_model, max_rows=8)
    jobs = []
    for i, (name, options) in enumerate([("evotoken", {"threshold": "0.5"}), ("d2f", {"block_size": "4"}),
                                         ("hard-mask", {"cache": "dual", "threshold": "0.7"}),
                                         ("d2f", {"block_size": "4", "soft": "true"}), ("hard-mask", {})]):
        decoder = make_decoder(name, options)
        jobs.append((decoder, PROMPTS[i], engine.submit(_job(tiny_model, decoder, PROMPTS[i], seed=i))))
    per_step = []
    while True:
        with SyncCounter() as counter:
            if not engine.step():
                break
        per_step.append(counter.total)
    assert max(per_step) == 1 and len(per_step) > 4
    for decoder, prompt, job in jobs:
        assert job.result.rows[0].token_ids == _solo(tiny_model, decoder, prompt).token_ids


def test_the_paged_pool_runs_the_same_rows_in_tensor_operations(tiny_model):
    """"masked" mode (the GPU default, and any compiled forward): one pool tensor per layer, rows written
    and read through index tensors, one masked attention call per layer. Logits equal the exact per-row
    path up to float rounding, and the mixed load decodes each row as it decodes alone."""
    from evotok_cli.decoding.engine import ForwardPass, make_pool, run_rows
    from evotok_cli.runtime.cache import SlotPool

    paged, exact = make_pool(tiny_model, "masked"), make_pool(tiny_model, "rowwise")
    assert isinstance(paged, SlotPool)
    canvas = [torch.tensor([p + [tiny_model.mask_id] * 4]) for p in PROMPTS[:3]]
    for step in range(2):  # a full pass fills the cache, then windows reuse it
        passes = [(k, ForwardPass({"input_ids": c[:, (0 if step == 0 else c.shape[1] - 4):]}, position_ids=None,
                                  logits_slice=(0, 4 if step else c.shape[1]), start=0 if step == 0 else c.shape[1] - 4,
                                  kv_length=c.shape[1])) for k, c in enumerate(canvas)]
        for got, want in zip(run_rows(tiny_model, passes, paged), run_rows(tiny_model, passes, exact)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    import dataclasses

    masked = dataclasses.replace(tiny_model, padded_mode="masked")  # the same weights, loaded masked
    engine = Engine(masked, max_rows=len(MIXED) + 1)
    assert isinstance(engine.pool, SlotPool)
    jobs = []
    for i, (name, options) in enumerate(MIXED):
        decoder = make_decoder(name, options)
        prompt = PROMPTS[i % len(PROMPTS)]
        jobs.append((decoder, prompt, engine.submit(_job(masked, decoder, prompt, seed=i))))
    engine.run()
    assert engine.passes == engine.steps
    for decoder, prompt, job in jobs:
        assert job.error is None
        assert job.result.rows[0].token_ids == _solo(tiny_model, decoder, prompt).token_ids
    assert not engine.pool.owned and len(engine.pool.free_slots) == engine.pool.capacity - 1


def test_a_pass_of_the_older_blockwise_forward_gets_one_line_saying_how_to_move(tiny_model):
    from evotok_cli.base.errors import ConfigError
    from evotok_cli.decoding.engine import CPU_TOKENS_IN_FLIGHT, ForwardPass, default_tokens_in_flight

    with pytest.raises(ConfigError, match="kv_length") as err:
        ForwardPass({"input_ids": torch.tensor([[5]])}, position_ids=None, logits_slice=(0, 1), cache=12)
    assert "\n" not in err.value.line() and err.value.line().endswith(")")
    assert default_tokens_in_flight(tiny_model) == CPU_TOKENS_IN_FLIGHT


def test_the_server_admits_by_tokens_in_flight_and_reports_them(tiny_model):
    from fastapi.testclient import TestClient

    from evotok_cli.decoding.engine import CPU_TOKENS_IN_FLIGHT
    from evotok_cli.jobs.config import GENERATE_DEFAULTS
    from evotok_cli.serve import app as app_module
    from evotok_cli.serve.plan import Served
    from evotok_cli.serve.sessions import Service

    served = Served(tiny_model, "tiny", None, "hard-mask", dict(GENERATE_DEFAULTS))
    default = Service(served, max_rows=2, max_queue=2, timeout=30)
    assert default.engine.max_tokens == CPU_TOKENS_IN_FLIGHT and default.background.stop(timeout=10)
    service = Service(served, max_rows=2, max_queue=2, timeout=30, max_tokens_in_flight=300)
    with TestClient(app_module.create_app(service, api_key=None, decoders=["hard-mask"])) as http:
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}).status_code == 200
        text = http.get("/metrics").text
    assert "evotok_max_tokens_in_flight 300" in text and "evotok_tokens_in_flight 0" in text
    assert "evotok_step_retries_total 0" in text


@pytest.mark.parametrize("mode", ["rowwise", "masked"])
def test_dream_rows_share_one_forward_in_both_pools(tiny_dream, mode):
    """Shifted logits and grouped-query heads (Dream): cached windows, d2f and uncached rows in one forward
    per step, each row's tokens those of its run alone (exactly with the per-row pool; the paged pool's
    masked call rounds differently, and on this model decodes the same tokens)."""
    from evotok_cli.runtime.cache import KVPool, SlotPool
    from evotok_cli.runtime.model import load_model

    model = load_model(tiny_dream, padded_attention=mode)
    modes = [("hard-mask", {"cache": "dual"}), ("evotoken", {"cache": "prefix"}), ("d2f", {"block_size": "4"}),
             ("evotoken", {}), ("hard-mask", {"cfg_scale": "1.5"})]
    engine = Engine(model, max_rows=8)
    assert isinstance(engine.pool, SlotPool if mode == "masked" else KVPool)
    jobs = []
    for i, (name, options) in enumerate(modes):
        decoder = make_decoder(name, options)
        jobs.append((decoder, PROMPTS[i], engine.submit(_job(model, decoder, PROMPTS[i], seed=i))))
    engine.run()
    assert engine.passes == engine.steps
    for decoder, prompt, job in jobs:
        assert job.error is None
        assert job.result.rows[0].token_ids == _solo(model, decoder, prompt).token_ids
