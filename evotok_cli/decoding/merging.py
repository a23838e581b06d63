"""Rows of several requests decoded as ONE program (the engine merges them when it admits them together).

Why: every program is Python that resumes a few times per engine step, and a row that is a program of its
own costs the host that much per row per step, however well its forward and its update are batched (one
program per row: the host's torch operations and Python calls per step grew 4.3-6.5x from 8 to 64 rows;
merged, the operations stay the same: `benchmarks/engine_batching.py --count`, results README "session
12"). Rows that share a decoder, its options and the request's shape step in lockstep anyway (the same
blocks, the same schedule), so the engine admits them as one program over a stacked, left-padded canvas:
host work per step then grows with the groups, not the rows.

Why tokens stay exact: a merged program gives every row its own random stream (`program(row_streams=True)`,
from the row's own seed) and its grouped updates treat rows independently; with the exact pool (`KVPool`,
the CPU default, `--padded-attention rowwise`) the shared forward drops each row's padding columns
(`rows.run_rows`), so a row's forward sees exactly its own positions, bit for bit. The paged pool (the GPU
default, compiled forwards) already attends rows in one masked call, equal to the row alone up to float
rounding, merged or not. A decoder opts in through `merge_key` (hard-mask and evotoken: not with
rng=reference, nor with a threshold, where rows finish blocks at passes of their own). What a merged row
gives up: cancelling it alone stops its answer and its events, not its compute (its row decodes on with the
others, unread); a failure after the first forward fails every row of the group.

Rows that need no lockstep (d2f's: each row runs its own pipeline and feeds its own window) can also join a
group that is already running (`MergedRows.offer`): in a server, requests arrive one by one, and a request
that joins adds a row to the group's tensors instead of a program of its own.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from inspect import GEN_CREATED, getgeneratorstate
from threading import Event
from typing import Any

from evotok_cli.decoding.api import GenerationRequest, GenerationResult, row_seed

Job = Any  # decoding/stepper.py's Job (which imports this module)


@dataclass(frozen=True)
class Mergeable:
    """A one-row job's note (`make_jobs`): the engine may decode it with others of the same `key`."""

    key: Hashable
    model: Any
    decoder: Any
    request: GenerationRequest  # the job's own one-row request (its seed and listeners)


def mergeable(model: Any, decoder: Any, request: GenerationRequest) -> Mergeable | None:
    """A one-row request's note, or None (no `merge_key`, or an empty prompt: alone it fails, merged it
    would not)."""
    key_of = getattr(decoder, "merge_key", None)
    single = len(request.prompts) == 1 and len(request.prompts[0]) > 0
    key = key_of(model, request) if key_of is not None and single else None
    return None if key is None else Mergeable(key, model, decoder, request)


def fresh(job: Job) -> bool:
    """Whether a job may still be merged: mergeable, and its program has not run a line yet."""
    return (job.merge is not None and job.program is not None and not job.members
            and getgeneratorstate(job.program) == GEN_CREATED)


def groups(jobs: list[Job]) -> list[list[Job]]:
    """The fresh jobs among `jobs` by merge key, groups of two or more, in admission order."""
    by_key: dict[Hashable, list[Job]] = {}
    for job in jobs:
        if fresh(job):
            by_key.setdefault(job.merge.key, []).append(job)
    return [group for group in by_key.values() if len(group) > 1]


class MergedRows:
    """The rows of a merged program: each row's own request and whether it is answered (cancelled, or done
    before the others), and the listeners the program calls, which hand each row's events to its own
    request as its row 0. A program whose rows need no lockstep (d2f's) sets `accept` while it can take
    rows: a fresh one-row request with the same key then joins it as a new row (`offer`) instead of
    decoding alone."""

    def __init__(self, key: Hashable, parts: list[Mergeable], answered: list[Event],
                 on_row: Callable[[int, GenerationResult], None] | None = None):
        self.key, self.requests, self.answered = key, [p.request for p in parts], list(answered)
        self.accept: Callable[[GenerationRequest], int | None] | None = None
        self.request = replace(
            self.requests[0], prompts=[r.prompts[0] for r in self.requests], seed=None,
            seeds=[row_seed(r, 0) for r in self.requests], on_event=self._by_row("on_event"),
            on_final=self._by_row("on_final"), on_pass=self._to_all(), on_row=on_row, joins=self)

    def offer(self, request: GenerationRequest, answered: Event) -> int | None:
        """Row `request` joins the running program: its row index, or None (the program takes no more rows,
        or it does not fit, or the request wants events the program does not send, or it counts passes:
        `on_pass` hears the group's count, which a row that joined late does not share)."""
        if self.accept is None or request.on_pass is not None or any(
                getattr(request, name) is not None and getattr(self.request, name) is None
                for name in ("on_event", "on_final")):
            return None
        row = self.accept(request)
        if row is not None:
            self.requests.append(request)
            self.answered.append(answered)
        return row

    def _by_row(self, name: str) -> Callable[[Any], None] | None:
        if not any(getattr(r, name) is not None for r in self.requests):
            return None

        def hand_on(event: Any) -> None:
            listener = getattr(self.requests[event.row], name)
            if listener is not None and not self.answered[event.row].is_set():
                listener(replace(event, row=0))
        return hand_on

    def _to_all(self) -> Callable[[int], None] | None:
        if not any(r.on_pass is not None for r in self.requests):
            return None

        def hand_on(nfe: int) -> None:
            for request, done in zip(self.requests, self.answered):
                if request.on_pass is not None and not done.is_set():
                    request.on_pass(nfe)
        return hand_on


def merged_program(parts: list[Mergeable], answered: list[Event],
                   on_row: Callable[[int, GenerationResult], None] | None = None) -> tuple[Any, MergedRows]:
    """The program that decodes the rows of `parts` (`program(row_streams=True)`), and its rows. `on_row`:
    where a row that finishes before the others is answered (the engine's)."""
    first = parts[0]
    rows = MergedRows(first.key, parts, answered, on_row)
    return first.decoder.program(first.model, rows.request, row_streams=True), rows


def canvas_tokens(parts: list[Mergeable]) -> int:
    """Canvas positions the merged rows hold: each row is as long as the longest prompt + gen_length."""
    request = parts[0].request
    return len(parts) * (max(len(p.request.prompts[0]) for p in parts) + request.gen_length)


def row_result(result: GenerationResult, row: int) -> GenerationResult:
    """Row `row` of a merged program's result, as that row's own program would have returned it."""
    own = result.rows[row]
    return GenerationResult(rows=[own], nfe=own.nfe, seconds=result.seconds)
