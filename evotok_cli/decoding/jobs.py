"""How a request becomes engine jobs (`make_jobs`: one per row for a program decoder, cohorts run whole
for a generate-only plugin) and how a batch is decoded in an engine of its own (`decode_together`)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from evotok_cli.decoding.api import GenerationResult
from evotok_cli.decoding.merging import mergeable
from evotok_cli.decoding.stepper import Engine, Job


def make_jobs(model: Any, decoder: Any, request: Any, *, cohort: int) -> list[tuple[int, Job]]:
    """The jobs that decode `request`'s rows, each with the index of its first row.

    A decoder whose `sequential(request)` is true (rng=reference) gets one job that decodes the rows in
    turn. A decoder with `program` and `split(request)` true (every built-in decoder, cached or not) gets
    one job per row: its own random stream and KV slots, sharing each step's forward with anything (and,
    when its decoder gives a `merge_key`, merged by the engine with rows admitted beside it); with
    `split` false, cohorts of up to `cohort` consecutive rows (their passes share the forward too). A
    decoder with only `generate` (an older third-party plugin) gets jobs of up to `cohort` rows that
    run whole (`Job.run_whole`: its `generate` in one go) when their turn comes.
    """
    from dataclasses import replace

    from evotok_cli.decoding.api import ProgramDecoder, decodes_in_turn, row_seed, splits_rows

    n = len(request.prompts)
    seeds = [row_seed(request, i) for i in range(n)]
    def tokens(prompts: list[list[int]]) -> int:  # canvas positions: what the rows' K/V and activations hold
        return sum(len(q) + request.gen_length for q in prompts)

    if decodes_in_turn(decoder, request):
        widest = max(request.prompts, key=len, default=[])
        return [(0, Job(decoder.program(model, request), rows=1, tokens=tokens([widest])))]  # one stream
    per_row = splits_rows(decoder, request)
    size = 1 if per_row else cohort
    jobs = []
    for first in range(0, n, size):
        part = replace(request, prompts=request.prompts[first:first + size], seeds=seeds[first:first + size],
                       seed=None, on_event=shifted_listener(request.on_event, first),
                       on_final=shifted_listener(request.on_final, first))
        if isinstance(decoder, ProgramDecoder):
            job = Job(decoder.program(model, part), rows=len(part.prompts), tokens=tokens(part.prompts),
                      merge=mergeable(model, decoder, part) if per_row else None)
        else:
            job = Job(None, rows=len(part.prompts), tokens=tokens(part.prompts),
                      run_whole=lambda p=part: decoder.generate(model, p))
        jobs.append((first, job))
    return jobs


def decode_together(model: Any, decoder: Any, request: Any) -> GenerationResult:
    """Decode all of `request`'s rows in an engine of their own, each row with its own random stream and KV
    slots (its own program, or a row of a merged one), sharing one forward per step."""
    engine = Engine(model, max_rows=max(1, len(request.prompts)))
    t0 = time.perf_counter()
    jobs = [engine.submit(job) for _, job in make_jobs(model, decoder, request, cohort=len(request.prompts))]
    engine.run()
    for job in jobs:
        if job.error is not None:
            raise job.error
    rows = [row for job in jobs for row in job.result.rows]
    return GenerationResult(rows=rows, nfe=max((job.result.nfe for job in jobs), default=0),
                            seconds=time.perf_counter() - t0)


def shifted_listener(listener: Callable[[Any], None] | None, offset: int) -> Callable[[Any], None] | None:
    """A step-event listener that sees row indices of the whole request, not of one job."""
    if listener is None or offset == 0:
        return listener
    from dataclasses import replace

    return lambda event: listener(replace(event, row=event.row + offset))
