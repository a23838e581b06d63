"""Rows of several requests admitted together decode as ONE program (decoding/merging.py), and each row
still decodes exactly what it decodes alone: tokens, NFE, log-probabilities, its stream events."""

from __future__ import annotations

import pytest

from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.decoding.engine import Engine, make_jobs
from evotok_cli.jobs.generation import make_decoder

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33], [40, 41]]
SETTINGS = {"gen_length": 8, "block_length": 4, "steps": 8}


def _request(prompt, seed, temperature=0.0, **extra):
    return GenerationRequest(prompts=[prompt], temperature=temperature, seeds=[seed], **SETTINGS, **extra)


def _solo(model, decoder, prompt, seed, temperature=0.0, **extra):
    return decoder.generate(model, _request(prompt, seed, temperature, **extra)).rows[0]


def _submit(engine, model, decoder, requests):
    return [engine.submit(job) for r in requests for _, job in make_jobs(model, decoder, r, cohort=1)]


@pytest.mark.parametrize("name, options", [
    ("hard-mask", {}), ("hard-mask", {"cache": "prefix"}), ("hard-mask", {"cache": "dual"}),
    ("hard-mask", {"cfg_scale": "1.5"}), ("evotoken", {}), ("evotoken", {"cache": "prefix"}),
    ("evotoken", {"cache": "dual"}), ("evotoken", {"soft_mask": "false", "soft_decoded": "false", "revise": "false"}),
])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_admitted_together_are_one_program_and_each_decodes_as_alone(tiny_model, name, options, temperature):
    decoder = make_decoder(name, options)
    engine = Engine(tiny_model, max_rows=len(PROMPTS))
    jobs = _submit(engine, tiny_model, decoder, [_request(p, seed=i, temperature=temperature, logprobs=2)
                                                 for i, p in enumerate(PROMPTS)])
    engine.step()
    assert len(engine.live) == 1 and engine.live[0].members == jobs  # one program for the five rows
    assert engine.merged_rows == len(PROMPTS)
    engine.run()
    for i, (prompt, job) in enumerate(zip(PROMPTS, jobs)):
        assert job.error is None and len(job.result.rows) == 1
        alone = _solo(tiny_model, decoder, prompt, i, temperature, logprobs=2)
        row = job.result.rows[0]
        assert row.token_ids == alone.token_ids and row.nfe == alone.nfe
        assert row.logprobs == alone.logprobs


def test_the_shared_forward_feeds_no_padding_column(tiny_model, monkeypatch):
    """A merged program's canvas is left-padded to its longest prompt; the forward sees each row's own
    columns only (what the row alone feeds)."""
    decoder = make_decoder("hard-mask", {})
    engine = Engine(tiny_model, max_rows=len(PROMPTS))
    fed = []
    original = tiny_model.net.forward

    def counting(*args, **kwargs):
        fed.append(kwargs["inputs_embeds"].shape[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_model.net, "forward", counting)
    _submit(engine, tiny_model, decoder, [_request(p, seed=0) for p in PROMPTS])
    engine.run()
    assert fed and set(fed) == {sum(len(p) + SETTINGS["gen_length"] for p in PROMPTS)}


@pytest.mark.parametrize("different", [
    {"threshold": "0.9"},  # rows finish blocks at passes of their own
    {"rng": "reference"},  # the release's stream: one program decodes its rows in turn
])
def test_requests_that_cannot_step_in_lockstep_are_not_merged(tiny_model, different):
    decoder = make_decoder("hard-mask", different)
    engine = Engine(tiny_model, max_rows=len(PROMPTS))
    jobs = _submit(engine, tiny_model, decoder, [_request(p, seed=i) for i, p in enumerate(PROMPTS[:3])])
    engine.step()
    assert not any(j.members for j in engine.live)
    engine.run()
    for i, (prompt, job) in enumerate(zip(PROMPTS, jobs)):
        assert job.result.rows[0].token_ids == _solo(tiny_model, decoder, prompt, i).token_ids


def test_only_requests_with_the_same_settings_merge(tiny_model):
    decoder, other = make_decoder("evotoken", {}), make_decoder("evotoken", {"alpha": "0.5"})
    engine = Engine(tiny_model, max_rows=8)
    same = _submit(engine, tiny_model, decoder, [_request(p, seed=0) for p in PROMPTS[:2]])
    longer = _submit(engine, tiny_model, decoder, [GenerationRequest(prompts=[PROMPTS[2]], seeds=[0],
                                                                     gen_length=12, block_length=4, steps=12)])
    options = _submit(engine, tiny_model, other, [_request(PROMPTS[3], seed=0)])
    engine.step()
    merged = [j for j in engine.live if j.members]
    assert len(engine.live) == 3 and len(merged) == 1 and merged[0].members == same
    engine.run()
    assert longer[0].result.rows[0].token_ids == decoder.generate(tiny_model, GenerationRequest(
        prompts=[PROMPTS[2]], seeds=[0], gen_length=12, block_length=4, steps=12)).rows[0].token_ids
    assert options[0].result.rows[0].token_ids == _solo(tiny_model, other, PROMPTS[3], 0).token_ids


def test_a_cancelled_row_is_answered_at_once_and_the_others_go_on(tiny_model):
    decoder = make_decoder("evotoken", {"cache": "dual"})
    engine = Engine(tiny_model, max_rows=len(PROMPTS))
    jobs = _submit(engine, tiny_model, decoder, [_request(p, seed=i) for i, p in enumerate(PROMPTS)])
    engine.step()
    jobs[1].cancel()
    engine.step()
    assert jobs[1].done.is_set() and jobs[1].result is None and jobs[1].error is None
    engine.run()
    for i in (0, 2, 3, 4):
        assert jobs[i].result.rows[0].token_ids == _solo(tiny_model, decoder, PROMPTS[i], i).token_ids


def test_when_every_row_is_cancelled_the_merged_program_stops(tiny_model):
    decoder = make_decoder("hard-mask", {})
    engine = Engine(tiny_model, max_rows=len(PROMPTS))
    jobs = _submit(engine, tiny_model, decoder, [_request(p, seed=0) for p in PROMPTS])
    engine.step()
    for job in jobs:
        job.cancel()
    engine.step()
    assert engine.idle() and all(j.done.is_set() and j.result is None for j in jobs)


def test_a_failing_row_fails_alone_and_the_others_decode_as_alone(tiny_model):
    """A prompt too long for the model fails when the merged canvas is built: the rows run again each as
    a program of its own, so only that row gets the error."""
    decoder = make_decoder("evotoken", {})
    engine = Engine(tiny_model, max_rows=4)
    jobs = _submit(engine, tiny_model, decoder, [_request(PROMPTS[0], 0), _request([5] * 300, 1),
                                                 _request(PROMPTS[1], 2)])
    engine.run()
    assert "exceeds the model's maximum" in str(jobs[1].error)
    assert engine.merged_rows == 0  # the rows decoded as programs of their own after all
    for job, prompt, seed in ((jobs[0], PROMPTS[0], 0), (jobs[2], PROMPTS[1], 2)):
        assert job.error is None and job.result.rows[0].token_ids == _solo(tiny_model, decoder, prompt, seed).token_ids


def test_each_row_streams_its_own_events(tiny_model):
    """Final prefixes and traced passes reach each row's own request as its row 0, as when decoded alone."""
    decoder = make_decoder("evotoken", {})

    def listened(prompt, seed):
        finals, events = [], []
        request = _request(prompt, seed, trace=True, on_event=events.append, on_final=finals.append)
        return request, finals, events

    engine = Engine(tiny_model, max_rows=3)
    heard = [listened(p, i) for i, p in enumerate(PROMPTS[:3])]
    _submit(engine, tiny_model, decoder, [r for r, _, _ in heard])
    engine.step()
    assert engine.live[0].members
    engine.run()
    for i, (prompt, (_, finals, events)) in enumerate(zip(PROMPTS, heard)):
        request, alone_finals, alone_events = listened(prompt, i)
        decoder.generate(tiny_model, request)
        assert finals == alone_finals and len(finals) == 1  # two blocks: one boundary before the last
        assert [(e.row, e.step, e.tokens, e.committed) for e in events] == \
               [(e.row, e.step, e.tokens, e.committed) for e in alone_events]


@pytest.mark.parametrize("name, options", [("hard-mask", {"cache": "dual"}), ("evotoken", {"cache": "dual"}),
                                           ("d2f", {"block_size": "4", "skip_threshold": "0.3"})])
def test_a_merged_program_preempted_mid_run_decodes_as_alone(tiny_model, monkeypatch, name, options):
    """Out of budget, the merged job (all its rows, the youngest job) loses its slots and is recomputed
    from its canvas."""
    decoder = make_decoder(name, options)
    engine = Engine(tiny_model, max_rows=8, max_tokens=10_000)
    other = _submit(engine, tiny_model, decoder, [_request(PROMPTS[3], seed=3)])  # admitted first, alone
    engine.step()
    merged = _submit(engine, tiny_model, decoder, [_request(p, seed=i) for i, p in enumerate(PROMPTS[:3])])
    preempted = []
    original = Engine._preempt
    monkeypatch.setattr(Engine, "_preempt", lambda self, job: (preempted.append(job), original(self, job)))
    for _ in range(2 if name == "d2f" else 3):  # d2f: before the other job's pipeline ends
        engine.step()
    assert merged[0].passes == 0 and any(j.members == merged and j.passes for j in engine.live)  # mid-run
    engine.max_tokens = 1
    engine.run()
    assert [job.members for job in preempted][:1] == [merged]  # the merged job itself was preempted
    for i, job in enumerate([*merged, *other]):
        assert job.result.rows[0].token_ids == _solo(tiny_model, decoder, PROMPTS[i], i).token_ids


def test_a_failure_after_the_first_forward_fails_every_row_once(tiny_model, monkeypatch):
    """The rows step together: a forward that fails mid-run fails the group, and no row is rerun (its
    events would be streamed again)."""
    decoder = make_decoder("hard-mask", {})
    engine = Engine(tiny_model, max_rows=4)
    finals = [[] for _ in PROMPTS[:3]]
    jobs = _submit(engine, tiny_model, decoder, [_request(p, seed=i, on_final=finals[i].append)
                                                 for i, p in enumerate(PROMPTS[:3])])
    original, calls = tiny_model.net.forward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("a failing forward")
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_model.net, "forward", failing)
    engine.run()
    assert all("a failing forward" in str(job.error) for job in jobs)
    assert [len(f) for f in finals] == [1, 1, 1] and len(calls) == 6


def test_a_cancelled_row_hears_no_more_events(tiny_model):
    decoder = make_decoder("evotoken", {})
    engine = Engine(tiny_model, max_rows=3)
    passes = [[] for _ in PROMPTS[:3]]
    jobs = _submit(engine, tiny_model, decoder, [_request(p, seed=i, on_pass=passes[i].append)
                                                 for i, p in enumerate(PROMPTS[:3])])
    engine.step()
    engine.step()
    jobs[0].cancel()
    engine.step()
    heard = len(passes[0])
    engine.run()
    assert len(passes[0]) == heard < len(passes[1]) == SETTINGS["steps"]


def test_a_subclass_must_opt_in_again_and_an_older_program_signature_is_not_merged(tiny_model):
    """`merges_rows` counts in the class that sets it: a plugin subclass that overrides hooks runs its rows
    alone unless it says so; one that opts in with a `program` lacking `row_streams` runs unmerged too."""
    base = type(make_decoder("hard-mask", {}))

    class Quiet(base):
        pass

    class Older(base):
        merges_rows = True

        def program(self, model, request):
            return super().program(model, request)

    for cls in (Quiet, Older):
        decoder = cls(make_decoder("hard-mask", {}).config)
        engine = Engine(tiny_model, max_rows=3)
        jobs = _submit(engine, tiny_model, decoder, [_request(p, seed=i) for i, p in enumerate(PROMPTS[:3])])
        engine.step()
        assert len(engine.live) == 3 and not any(j.members for j in engine.live)
        engine.run()
        assert all(j.error is None for j in jobs)


def test_an_empty_prompt_fails_alone_as_when_decoded_alone(tiny_model):
    decoder = make_decoder("hard-mask", {})
    engine = Engine(tiny_model, max_rows=3)
    jobs = _submit(engine, tiny_model, decoder, [_request(PROMPTS[0], 0), _request([], 1), _request(PROMPTS[1], 2)])
    engine.run()
    assert "a prompt is empty" in str(jobs[1].error) and jobs[0].error is None and jobs[2].error is None


def test_a_request_that_counts_passes_never_joins_a_running_d2f_group(tiny_model):
    """`on_pass` hears the group's pass count (its oldest rows'): a row that joined late heard 4, 5, ... and
    then the ended rows' count again and again, where alone it hears 1, 2, ... So such a request decodes as a
    program of its own, and hears what it hears alone; one without the listener still joins."""
    decoder = make_decoder("d2f", {"block_size": "4", "skip_threshold": "0.3"})
    heard: dict = {}

    def request(i, who, counts=True):
        extra = {"on_pass": heard.setdefault((who, i), []).append} if counts else {}
        return GenerationRequest(prompts=[PROMPTS[i]], seeds=[i], gen_length=12, **extra)

    engine = Engine(tiny_model, max_rows=8)
    jobs = _submit(engine, tiny_model, decoder, [request(0, "m"), request(1, "m")])
    for _ in range(3):
        engine.step()
    jobs += _submit(engine, tiny_model, decoder, [request(2, "m"), request(3, "m", counts=False)])
    engine.step()
    assert [len(j.members) for j in engine.live] == [3, 0]  # the silent one joined, the counting one did not
    engine.run()
    for i in (0, 1, 2):
        decoder.generate(tiny_model, request(i, "alone"))
        assert heard[("m", i)] and heard[("m", i)] == heard[("alone", i)]
    assert all(j.error is None for j in jobs)
