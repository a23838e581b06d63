"""The decoder protocol the engine reads (`ProgramDecoder`, `splits_rows`, `decodes_in_turn`): built-in
decoders run as programs, one per row; a third-party decoder with `generate` alone still runs, whole, in
cohorts; a program decoder without `split` gets cohorts of programs."""

from __future__ import annotations

from evotok_cli.decoding.api import GenerationRequest, ProgramDecoder, decodes_in_turn, splits_rows
from evotok_cli.decoding.engine import Engine, decode_together, make_jobs
from evotok_cli.jobs.generation import make_decoder

PROMPTS = [[5, 6, 7], [9, 10, 11, 12], [20], [30, 31], [40, 41, 42]]
SETTINGS = {"gen_length": 8, "block_length": 4, "steps": 8}


class GenerateOnly:
    """An older third-party plugin: `generate` and nothing else (no program, no split)."""

    name = "generate-only"

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, model, request):
        self.calls.append(len(request.prompts))
        return self.inner.generate(model, request)


class ProgramOnly:
    """A program decoder that declares neither `split` nor `sequential`: both read as False."""

    def __init__(self, inner):
        self.inner = inner

    def generate(self, model, request):
        return self.inner.generate(model, request)

    def program(self, model, request):
        return self.inner.program(model, request)


def _request(**extra):
    return GenerationRequest(prompts=PROMPTS, temperature=0.8, seed=3, **SETTINGS, **extra)


def test_the_built_in_decoders_are_program_decoders_with_a_program_per_row():
    request = _request()
    for name, options in [("hard-mask", {}), ("evotoken", {}), ("d2f", {"block_size": "4"})]:
        decoder = make_decoder(name, options)
        assert isinstance(decoder, ProgramDecoder), name
        assert splits_rows(decoder, request) and not decodes_in_turn(decoder, request), name
    reference = make_decoder("hard-mask", {"rng": "reference"})
    assert decodes_in_turn(reference, request) and not splits_rows(reference, request)
    plain = GenerateOnly(make_decoder("hard-mask", {}))
    assert not isinstance(plain, ProgramDecoder)
    assert not splits_rows(plain, request) and not decodes_in_turn(plain, request)


def test_a_generate_only_decoder_runs_whole_in_cohorts(tiny_model):
    inner = make_decoder("hard-mask", {})
    plain = GenerateOnly(inner)
    jobs = make_jobs(tiny_model, plain, _request(), cohort=2)
    assert [first for first, _ in jobs] == [0, 2, 4]
    assert all(job.program is None and job.run_whole is not None for _, job in jobs)
    engine = Engine(tiny_model, max_rows=8)
    for _, job in jobs:
        engine.submit(job)
    engine.run()
    assert plain.calls == [2, 2, 1]
    for first, job in jobs:  # each cohort is the plugin's own generate over those rows, with their seeds
        assert job.error is None
        prompts = PROMPTS[first:first + 2]
        own = inner.generate(tiny_model, GenerationRequest(prompts=prompts, temperature=0.8,
                                                           seeds=[3 + first + i for i in range(len(prompts))],
                                                           **SETTINGS))
        assert [r.token_ids for r in job.result.rows] == [r.token_ids for r in own.rows]


def test_a_generate_only_decoder_decodes_a_batch_like_its_own_generate(tiny_model):
    inner = make_decoder("evotoken", {})
    plain = GenerateOnly(inner)
    together = decode_together(tiny_model, plain, _request())
    assert plain.calls == [len(PROMPTS)]
    own = inner.generate(tiny_model, _request())
    assert [r.token_ids for r in together.rows] == [r.token_ids for r in own.rows]


def test_a_program_decoder_without_split_gets_cohorts_of_programs(tiny_model):
    decoder = ProgramOnly(make_decoder("hard-mask", {}))
    assert isinstance(decoder, ProgramDecoder) and not splits_rows(decoder, _request())
    jobs = make_jobs(tiny_model, decoder, _request(), cohort=3)
    assert [(first, job.rows) for first, job in jobs] == [(0, 3), (3, 2)]
    assert all(job.program is not None and job.run_whole is None for _, job in jobs)
    engine = Engine(tiny_model, max_rows=8)
    for _, job in jobs:
        engine.submit(job)
    engine.run()
    assert all(job.error is None and len(job.result.rows) == job.rows for _, job in jobs)
