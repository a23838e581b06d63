"""d2f rows of several requests admitted together decode as ONE program (plugins' d2f/merged.py), each
row keeping its own pipeline: every row decodes exactly what it decodes alone (tokens, NFE,
log-probabilities, trace events, streamed final prefixes), on an unshifted and a shifted-logit model,
with and without the cache and the soft states, greedy and sampled with a seed per row."""

from __future__ import annotations

import pytest
import torch

from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.decoding.engine import Engine, make_jobs
from evotok_cli.decoding.passes import RowWindow
from evotok_cli.decoding.rows import make_pool
from evotok_cli.jobs.generation import make_decoder
from evotok_cli.runtime.model import load_model
from evotok_plugins.d2f.pipeline import aligned_block_mask

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33], [40, 41]]
OPTIONS = {"block_size": "4", "skip_threshold": "0.3"}  # three blocks of 4; low enough that blocks overlap


def _request(prompt, seed, temperature=0.0, **extra):
    return GenerationRequest(prompts=[prompt], temperature=temperature, seeds=[seed], gen_length=12, **extra)


def _merged(model, decoder, requests, **engine):
    engine = Engine(model, max_rows=len(requests), **engine)
    jobs = [engine.submit(job) for r in requests for _, job in make_jobs(model, decoder, r, cohort=1)]
    engine.step()
    assert len(engine.live) == 1 and engine.live[0].members == jobs  # one program for every row
    engine.run()
    assert all(j.error is None for j in jobs), [j.error for j in jobs]
    return [j.result.rows[0] for j in jobs]


@pytest.mark.parametrize("options", [{}, {"cache": "false"}, {"soft": "true"}, {"soft": "true", "cache": "false"},
                                     {"skip_threshold": "0.9"}])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_each_merged_row_decodes_as_alone(tiny_model, options, temperature):
    decoder = make_decoder("d2f", {**OPTIONS, **options})
    requests = [_request(p, seed=i, temperature=temperature, logprobs=2) for i, p in enumerate(PROMPTS)]
    rows = _merged(tiny_model, decoder, requests)
    nfes = set()
    for request, row in zip(requests, rows):
        alone = decoder.generate(tiny_model, request).rows[0]
        assert row.token_ids == alone.token_ids and row.nfe == alone.nfe
        assert row.logprobs == alone.logprobs
        nfes.add(row.nfe)
    assert len(nfes) > 1 or options.get("skip_threshold") == "0.9"  # the rows' pipelines really differ


@pytest.mark.parametrize("soft", ["false", "true"])
def test_merged_rows_on_a_shifted_logit_model(tiny_dream, soft):
    """Dream reads position i from the output at i - 1: a row's first uncached position reads its own saved
    output of the cached prefix."""
    dream = load_model(tiny_dream)
    decoder = make_decoder("d2f", {**OPTIONS, "soft": soft})
    requests = [_request(p, seed=i) for i, p in enumerate(PROMPTS)]
    for request, row in zip(requests, _merged(dream, decoder, requests)):
        alone = decoder.generate(dream, request).rows[0]
        assert row.token_ids == alone.token_ids and row.nfe == alone.nfe


@pytest.mark.parametrize("soft", ["false", "true"])
def test_merged_rows_trace_and_stream_what_they_do_alone(tiny_model, soft):
    decoder = make_decoder("d2f", {**OPTIONS, "soft": soft})
    heard: dict[tuple[str, int], list] = {}

    def request(i, prompt, who):
        return _request(prompt, seed=i, trace=True, on_event=heard.setdefault((who, i), []).append,
                        on_final=heard.setdefault((who + "-final", i), []).append)

    _merged(tiny_model, decoder, [request(i, p, "merged") for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        decoder.generate(tiny_model, request(i, p, "alone"))
        assert heard[("merged", i)] and heard[("merged", i)] == heard[("alone", i)]
        assert heard[("merged-final", i)] and heard[("merged-final", i)] == heard[("alone-final", i)]


def test_merged_rows_over_the_paged_pool_match_alone(tiny_model):
    """The paged pool (the GPU default) attends rows in one masked call: equal to the row alone up to float
    rounding, so greedy tokens agree on this model."""
    decoder = make_decoder("d2f", OPTIONS)
    requests = [_request(p, seed=i) for i, p in enumerate(PROMPTS)]
    engine = Engine(tiny_model, max_rows=len(requests))
    engine.pool = make_pool(tiny_model, "masked")
    jobs = [engine.submit(job) for r in requests for _, job in make_jobs(tiny_model, decoder, r, cohort=1)]
    engine.run()
    assert engine.steps and all(j.error is None for j in jobs)
    for request, job in zip(requests, jobs):
        assert job.result.rows[0].token_ids == decoder.generate(tiny_model, request).rows[0].token_ids


def test_rows_that_finish_early_sit_out_and_are_not_fed(tiny_model, monkeypatch):
    """A row whose pipeline has ended feeds nothing: the forward's width is the live rows' windows."""
    decoder = make_decoder("d2f", {**OPTIONS, "cache": "false"})
    requests = [_request(p, seed=i) for i, p in enumerate(PROMPTS)]
    nfes = [decoder.generate(tiny_model, r).rows[0].nfe for r in requests]
    widths, original = [], tiny_model.net.forward

    def counting(*args, **kwargs):
        widths.append(kwargs["inputs_embeds"].shape[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_model.net, "forward", counting)
    _merged(tiny_model, decoder, requests)
    assert len(widths) == max(nfes)
    # without the cache each live row feeds its prompt and every block it has (here all three by the last
    # pass): never the padding, never a row that has finished
    last = [p for p, n in zip(PROMPTS, nfes) if n == max(nfes)]
    assert len(last) < len(PROMPTS) and widths[-1] == sum(len(p) + 12 for p in last)
    assert widths[0] == sum(len(p) + 4 for p in PROMPTS)  # the first pass: prompt + the first block


def test_different_options_or_budgets_do_not_merge(tiny_model):
    decoder, other = make_decoder("d2f", OPTIONS), make_decoder("d2f", {**OPTIONS, "soft": "true"})
    engine = Engine(tiny_model, max_rows=8)
    jobs = [engine.submit(job) for d, r in [(decoder, _request(PROMPTS[0], 0)), (decoder, _request(PROMPTS[1], 1)),
                                            (other, _request(PROMPTS[2], 2)),
                                            (decoder, GenerationRequest(prompts=[PROMPTS[3]], seeds=[3], gen_length=8))]
            for _, job in make_jobs(tiny_model, d, r, cohort=1)]
    engine.step()
    assert len(engine.live) == 3 and [len(j.members) for j in engine.live] == [2, 0, 0]
    engine.run()
    assert all(j.error is None for j in jobs)


def test_a_subclass_that_does_not_say_it_merges_runs_alone(tiny_model):
    from evotok_plugins.d2f.decoder import D2FDecoder

    class Mine(D2FDecoder):
        name = "mine"

    decoder = Mine(make_decoder("d2f", OPTIONS).config)
    assert decoder.merge_key(tiny_model, _request(PROMPTS[0], 0)) is None


def test_the_aligned_mask_is_the_block_causal_mask_of_every_row():
    """Prompt columns see the prompt; a query in block j sees keys up to block j's end."""
    mask = aligned_block_mask(gen_start=3, size=2, lo=1, hi=7, device="cpu")[0, 0]
    ends = [3, 3, 5, 5, 7, 7]  # queries at columns 1..6
    assert mask.shape == (6, 7)
    assert torch.equal(mask, torch.arange(7)[None] < torch.tensor(ends)[:, None])


def test_generate_decodes_a_batch_as_one_program_each_row_as_alone(tiny_model, monkeypatch):
    """The library's `generate` runs a request's rows as one merged program: as many forwards as its
    slowest row's passes (not the sum), and each row's tokens and NFE are its own alone."""
    decoder = make_decoder("d2f", OPTIONS)
    alone = [decoder.generate(tiny_model, _request(p, seed=i, temperature=0.8)).rows[0] for i, p in enumerate(PROMPTS)]
    calls, original = [], tiny_model.net.forward
    monkeypatch.setattr(tiny_model.net, "forward", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    batch = decoder.generate(tiny_model, GenerationRequest(prompts=PROMPTS, seeds=list(range(len(PROMPTS))),
                                                           gen_length=12, temperature=0.8))
    assert [(r.token_ids, r.nfe) for r in batch.rows] == [(r.token_ids, r.nfe) for r in alone]
    assert len(calls) == max(r.nfe for r in alone) < sum(r.nfe for r in alone)


def test_a_merged_row_is_answered_when_its_own_pipeline_ends(tiny_model):
    """Rows of one merged program end at passes of their own: each is answered then (its tokens and NFE as
    alone), not when the slowest row ends."""
    decoder = make_decoder("d2f", OPTIONS)
    requests = [_request(p, seed=i) for i, p in enumerate(PROMPTS)]
    engine = Engine(tiny_model, max_rows=len(requests))
    jobs = [engine.submit(job) for r in requests for _, job in make_jobs(tiny_model, decoder, r, cohort=1)]
    answered_at = {}
    while not all(j.done.is_set() for j in jobs):
        engine.step()
        answered_at.update({i: engine.steps for i, j in enumerate(jobs) if j.done.is_set() and i not in answered_at})
    nfes = [j.result.rows[0].nfe for j in jobs]
    assert len(set(nfes)) > 1 and len(set(answered_at.values())) > 1
    first = min(range(len(jobs)), key=lambda i: nfes[i])
    assert answered_at[first] < max(answered_at.values())  # the quickest row did not wait for the slowest
    for request, job in zip(requests, jobs):
        alone = decoder.generate(tiny_model, request).rows[0]
        assert (job.result.rows[0].token_ids, job.result.rows[0].nfe) == (alone.token_ids, alone.nfe)
        assert job.result.nfe == alone.nfe


@pytest.mark.parametrize("shifted", [False, True])
def test_an_empty_prompt_among_others_fails_as_alone(tiny_model, tiny_dream, shifted):
    """Alone an empty prompt is refused (build_canvas); merged beside a longer one its row would decode from
    padding alone (Dream: its first position from no output at all). `generate` refuses it the same way."""
    model = load_model(tiny_dream) if shifted else tiny_model
    decoder = make_decoder("d2f", OPTIONS)
    with pytest.raises(ConfigError) as alone:
        decoder.generate(model, GenerationRequest(prompts=[[]], gen_length=12, seeds=[0]))
    with pytest.raises(ConfigError) as merged:
        decoder.generate(model, GenerationRequest(prompts=[[5, 6, 7], []], gen_length=12, seeds=[0, 1]))
    assert str(merged.value) == str(alone.value)


def test_a_row_that_ends_is_answered_with_the_pass_read_at_no_step_of_its_own(tiny_model):
    """A merged row that ends is answered with the group's next pass's one read, not a read of its own (that
    cost the group an engine step without a forward each time rows ended: the job beside it ran forwards
    alone). Each row is answered at the step it is without merging, and the engine runs as many forwards."""
    decoder, beside = make_decoder("d2f", OPTIONS), make_decoder("d2f", {**OPTIONS, "soft": "true"})
    requests = [_request(p, seed=i, temperature=0.8) for i, p in enumerate(PROMPTS)]
    seen = []
    for merge in (True, False):
        engine = Engine(tiny_model, max_rows=8, merge_rows=merge)
        for _, job in make_jobs(tiny_model, beside, _request([50, 51], seed=9), cohort=1):
            engine.submit(job)  # a job that does not merge with the rows and outlives them
        jobs = [engine.submit(job) for r in requests for _, job in make_jobs(tiny_model, decoder, r, cohort=1)]
        calls, answered_at = 0, {}
        while not all(j.done.is_set() for j in jobs):
            engine.step()
            calls += 1
            answered_at.update({i: calls for i, j in enumerate(jobs) if j.done.is_set() and i not in answered_at})
        assert engine.merged_rows == (len(jobs) if merge else 0)
        seen.append((answered_at, engine.passes, [(j.result.rows[0].token_ids, j.result.rows[0].nfe) for j in jobs]))
    assert seen[0] == seen[1]
    assert len(set(seen[0][0].values())) > 1  # rows ended at steps of their own


@pytest.mark.parametrize("windows, error", [
    ([RowWindow(0, 4, 0, 4)], "2 rows but 1 windows"),
    ([RowWindow(0, 4, 0, 4), RowWindow(2, 4, 0, 2)], "windows\\[1\\]"),  # logits before its fed columns
    ([RowWindow(0, 4, 0, 4), RowWindow(0, 5, 0, 5)], "windows\\[1\\]"),  # past the window
])
def test_a_window_outside_its_row_is_refused(windows, error):
    """A row's window must lie in the pass's window and its logits in its fed columns, or the row would
    get another row's logits."""
    from evotok_cli.decoding.passes import ForwardPass

    with pytest.raises(ValueError, match=error):
        ForwardPass({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, position_ids=None, logits_slice=(0, 0),
                    windows=windows)


def _run_until_done(engine, jobs):
    while not all(j.done.is_set() for j in jobs):
        engine.step()


@pytest.mark.parametrize("options", [{}, {"soft": "true"}, {"cache": "false"}])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_request_arriving_later_joins_the_running_group_and_decodes_as_alone(tiny_model, options, temperature):
    """d2f's rows need no lockstep: a request admitted while a merged group runs joins it as a new row (one
    program, one forward per step) and still decodes exactly what it decodes alone."""
    decoder = make_decoder("d2f", {**OPTIONS, **options})
    requests = [_request(p, seed=i, temperature=temperature, logprobs=2) for i, p in enumerate(PROMPTS)]
    engine = Engine(tiny_model, max_rows=8)
    first = [engine.submit(job) for r in requests[:3] for _, job in make_jobs(tiny_model, decoder, r, cohort=1)]
    engine.step()
    engine.step()
    later = [engine.submit(job) for r in requests[3:] for _, job in make_jobs(tiny_model, decoder, r, cohort=1)]
    engine.step()
    assert len(engine.live) == 1 and engine.live[0].members == first + later  # they joined: one program
    assert engine.merged_rows == len(PROMPTS)
    _run_until_done(engine, first + later)
    for request, job in zip(requests, first + later):
        alone = decoder.generate(tiny_model, request).rows[0]
        row = job.result.rows[0]
        assert (row.token_ids, row.nfe, row.logprobs) == (alone.token_ids, alone.nfe, alone.logprobs)
        assert job.result.seconds <= job.seconds  # timed from the row's own start, not the group's


def test_a_row_that_does_not_fit_the_group_decodes_on_its_own(tiny_model):
    """A prompt longer than the group's prompt column, or another setting: the request runs as a program of
    its own, as before."""
    decoder = make_decoder("d2f", OPTIONS)
    engine = Engine(tiny_model, max_rows=4)
    first = [engine.submit(job) for i in (0, 2) for _, job in make_jobs(tiny_model, decoder, _request(PROMPTS[i], i),
                                                                          cohort=1)]
    engine.step()
    longer = [engine.submit(job) for _, job in make_jobs(tiny_model, decoder, _request(PROMPTS[1], 1), cohort=1)]
    other = [engine.submit(job) for _, job in make_jobs(tiny_model, decoder, GenerationRequest(
        prompts=[PROMPTS[4]], seeds=[4], gen_length=8), cohort=1)]
    engine.step()
    assert [len(j.members) for j in engine.live] == [2, 0, 0]  # neither joined
    _run_until_done(engine, first + longer + other)
    assert all(j.error is None for j in first + longer + other)
    assert longer[0].result.rows[0].token_ids == decoder.generate(tiny_model, _request(PROMPTS[1], 1)).rows[0].token_ids


def test_a_joined_row_streams_its_events_as_alone_and_a_stream_never_joins_a_silent_group(tiny_model):
    decoder = make_decoder("d2f", {**OPTIONS, "soft": "true"})
    heard: dict = {}

    def request(i, who, listen=True):  # listen=False: traced (the same merge key) but no final prefixes
        extra = {"trace": True, "on_event": heard.setdefault((who + "-trace", i), []).append}
        if listen:
            extra["on_final"] = heard.setdefault((who, i), []).append
        return _request(PROMPTS[i], seed=i, **extra)

    engine = Engine(tiny_model, max_rows=8)
    group = [engine.submit(job) for i in (0, 1) for _, job in make_jobs(tiny_model, decoder, request(i, "m"), cohort=1)]
    engine.step()
    joined = [engine.submit(job) for _, job in make_jobs(tiny_model, decoder, request(2, "m"), cohort=1)]
    engine.step()
    assert engine.live[0].members == group + joined
    _run_until_done(engine, group + joined)
    for i in (0, 1, 2):
        decoder.generate(tiny_model, request(i, "alone"))
        assert heard[("m", i)] and heard[("m", i)] == heard[("alone", i)]
        assert heard[("m-trace", i)] and heard[("m-trace", i)] == heard[("alone-trace", i)]
    silent = Engine(tiny_model, max_rows=8)
    quiet = [silent.submit(job) for i in (0, 1) for _, job in make_jobs(tiny_model, decoder, request(i, "q", False),
                                                                       cohort=1)]
    silent.step()
    streaming = [silent.submit(job) for _, job in make_jobs(tiny_model, decoder, request(2, "s"), cohort=1)]
    silent.step()
    assert [len(j.members) for j in silent.live] == [2, 0]  # it would hear no final prefix in that group
    _run_until_done(silent, quiet + streaming)
    assert heard[("s", 2)] == heard[("alone", 2)]


def test_a_group_with_joined_rows_preempted_mid_run_decodes_as_alone(tiny_model):
    decoder = make_decoder("d2f", OPTIONS)
    requests = [_request(p, seed=i, temperature=0.8) for i, p in enumerate(PROMPTS)]
    engine = Engine(tiny_model, max_rows=8, max_tokens=10_000)
    other = [engine.submit(job) for _, job in make_jobs(tiny_model, decoder, GenerationRequest(
        prompts=[[50, 51]], seeds=[9], gen_length=16), cohort=1)]  # another budget: never joins
    jobs = [engine.submit(job) for r in requests[:2] for _, job in make_jobs(tiny_model, decoder, r, cohort=1)]
    engine.step()
    jobs += [engine.submit(job) for r in requests[2:] for _, job in make_jobs(tiny_model, decoder, r, cohort=1)]
    engine.step()
    engine.step()
    assert any(len(j.members) == len(PROMPTS) for j in engine.live)
    engine.max_tokens = 1
    _run_until_done(engine, jobs + other)
    assert engine.preemptions > 0
    for request, job in zip(requests, jobs):
        assert job.result.rows[0].token_ids == decoder.generate(tiny_model, request).rows[0].token_ids


def test_a_group_that_has_held_max_rows_takes_no_more_and_frees_room_as_rows_end(tiny_model):
    """A row answered early no longer counts against max_rows (a waiting request is admitted), but a group
    that has held max_rows rows takes no more: their KV slots stay until it ends, so it drains."""
    decoder = make_decoder("d2f", OPTIONS)
    engine = Engine(tiny_model, max_rows=2)
    group = [engine.submit(job) for i in (0, 3) for _, job in make_jobs(tiny_model, decoder, _request(PROMPTS[i], i),
                                                                          cohort=1)]
    waiting = [engine.submit(job) for _, job in make_jobs(tiny_model, decoder, _request(PROMPTS[2], 2), cohort=1)]
    while waiting[0].admitted is None:
        engine.step()
    assert any(j.done.is_set() for j in group) and not all(j.done.is_set() for j in group)  # admitted mid-group
    assert [len(j.members) for j in engine.live] == [2, 0]  # did not join the full group
    _run_until_done(engine, group + waiting)
    assert waiting[0].result.rows[0].token_ids == decoder.generate(tiny_model, _request(PROMPTS[2], 2)).rows[0].token_ids


def test_a_cancelled_row_frees_its_place_in_max_rows_when_its_pipeline_ends(tiny_model):
    """A cancelled row is answered at once but decodes on with the group; once its pipeline ends it no longer
    counts against max_rows, as a row answered early does (it counted until the group ended)."""
    decoder = make_decoder("d2f", OPTIONS)
    nfes = [decoder.generate(tiny_model, _request(PROMPTS[i], i)).rows[0].nfe for i in (1, 3)]
    assert nfes[1] + 2 < nfes[0]  # row 3's pipeline ends steps before row 1's
    engine = Engine(tiny_model, max_rows=8)
    jobs = [engine.submit(job) for i in (1, 3) for _, job in make_jobs(tiny_model, decoder, _request(PROMPTS[i], i),
                                                                        cohort=1)]
    engine.step()
    [group] = engine.live
    jobs[1].cancel()
    for _ in range(nfes[1] + 2):
        engine.step()
    assert jobs[1].done.is_set() and not jobs[0].done.is_set()
    assert group.rows == 1 and engine.live_rows == 1


@pytest.mark.parametrize("model_name, pool", [("dream", "rowwise"), ("llada", "masked"), ("dream", "masked")])
def test_rows_joining_on_a_shifted_logit_model_or_the_paged_pool_decode_as_alone(tiny_model, tiny_dream, model_name,
                                                                                  pool):
    """A joined row on Dream reads its first uncached position from its own saved output (`saved` grows
    with the rows); on the paged pool it takes a slot of its own mid-run."""
    model = load_model(tiny_dream) if model_name == "dream" else tiny_model
    decoder = make_decoder("d2f", {**OPTIONS, "soft": "true"})
    requests = [_request(p, seed=i) for i, p in enumerate(PROMPTS)]
    engine = Engine(model, max_rows=8)
    engine.pool = make_pool(model, pool)
    jobs = [engine.submit(job) for r in requests[:2] for _, job in make_jobs(model, decoder, r, cohort=1)]
    engine.step()
    engine.step()
    jobs += [engine.submit(job) for r in requests[2:] for _, job in make_jobs(model, decoder, r, cohort=1)]
    engine.step()
    assert engine.live[0].members == jobs
    _run_until_done(engine, jobs)
    for request, job in zip(requests, jobs):
        alone = decoder.generate(model, request).rows[0]
        assert (job.result.rows[0].token_ids, job.result.rows[0].nfe) == (alone.token_ids, alone.nfe)
