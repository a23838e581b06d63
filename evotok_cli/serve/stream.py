"""Server-sent events for `"stream": true`: OpenAI chunks, then `data: [DONE]`.

Text is sent once it can no longer change: positions before the current block of a StepEvent are final
(for d2f: the blocks that left the `active` state), so a row's text grows block by block, and its last
chunk carries the rest and the finish_reason. A "final" stream of a decoder with `final_events`
(hard-mask, evotoken) builds no per-pass trace: it gets one `FinalPrefix` per row and block boundary
instead, and sends the same chunks. `"stream_mode": "evolve"` sends a chunk for every forward pass and
row, with the whole canvas in an `evotok` field (schema in docs/serve.md). A choice's text stops at
`max_tokens` tokens; its logprobs, when asked for, come whole with its last chunk.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from evotok_cli.base.errors import EvotokError
from evotok_cli.decoding.api import FinalPrefix
from evotok_cli.jobs.generation import row_result
from evotok_cli.serve.responses import Logprobs, Reply, cut_at_stop, finish, usage
from evotok_cli.serve.schema import ApiError, CompletionFields
from evotok_cli.serve.sessions import Service, Session


def sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


DONE = "data: [DONE]\n\n"


def final_end(event: Any) -> int:
    """Generated positions before this index are final after the pass of `event` (a StepEvent), or at a
    FinalPrefix (what a "final" stream gets from a decoder with `final_events`: no per-pass trace)."""
    if isinstance(event, FinalPrefix):
        return event.end
    if event.blocks is not None:  # d2f: blocks leave `active` in order
        end = 0
        for block in event.blocks:
            if block["state"] == "active":
                break
            end = block["end"]
        return end
    return event.block[0]


class RowText:
    """One row's answer text as its positions become final: deltas that never need taking back.

    The decoded prefix is held back by what could still change when more tokens follow: a character
    whose bytes are incomplete, trailing whitespace (tokenizers tidy spaces before punctuation), and the
    last len(longest stop string) - 1 characters, which could begin a stop string."""

    def __init__(self, model: Any, stops: list[str], max_tokens: int | None = None):
        self.model, self.stops, self.max_tokens = model, stops, max_tokens
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent, self.seen, self.closed = "", 0, False

    def advance(self, tokens: list[int], end: int) -> str:
        if self.closed or end <= self.seen:
            return ""
        self.seen = end
        full = self.max_tokens is not None and end >= self.max_tokens  # the answer cannot grow past here
        ids = tokens[:min(end, self.max_tokens)] if full else tokens[:end]
        text, hit = cut_at_stop(self.model.answer_text(ids), self.stops)
        if hit or full or any(t in self.model.stop_ids for t in ids):
            self.closed = True  # the answer is complete: what remains can only be the end of the row
        else:
            text = text[:len(text) - self.hold].rstrip().rstrip("\ufffd")
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, text: str) -> str:
        """The rest of the row's final text."""
        self.closed = True
        if not text.startswith(self.sent):  # a bug: the streamed prefix and the final text disagree
            print(f"warning: streamed text {self.sent!r} is not a prefix of the answer {text!r}", file=sys.stderr)
            return ""
        return text[len(self.sent):]


class Pieces:
    """Token id -> its text (None for [MASK]), cached: the evolve stream names every position's token."""

    def __init__(self, model: Any):
        self.tokenizer, self.mask_id, self.cache = model.tokenizer, model.mask_id, {}

    def __call__(self, token: int) -> str | None:
        if token == self.mask_id:
            return None
        if token not in self.cache:
            self.cache[token] = (str(token) if self.tokenizer is None
                                 else self.tokenizer.decode([token], skip_special_tokens=False))
        return self.cache[token]


def evolve(event: Any, pieces: Pieces) -> dict[str, Any]:
    """The canvas after one pass of one row (the `evotok` field of an evolve chunk)."""
    candidates = None if event.candidates is None else [
        [[pieces(t), w] for t, w in slots] for slots in event.candidates]
    return {"index": event.row, "step": event.step, "block": list(event.block), "final": final_end(event),
            "states": event.states, "tokens": [pieces(t) for t in event.tokens], "ids": event.tokens,
            "confidence": event.confidence, "committed": event.committed, "revised": event.revised,
            "candidates": candidates, "blocks": event.blocks}


class Answers:
    """The chunks of one streamed request's answers, and what they have sent so far: each row's text, its
    result once its job is done, and whether any text went out yet (the time-to-first-text metric)."""

    def __init__(self, service: Service, session: Session, fields: CompletionFields, reply: Reply,
                 arrival: float):
        self.service, self.fields, self.reply, self.arrival = service, fields, reply, arrival
        self.model, self.plan = service.served.model, session.plan
        self.texts = [RowText(self.model, fields.stop, self.plan.max_tokens) for _ in self.plan.rows]
        self.firsts = {job.id: first for first, job in session.jobs}
        self.pieces = Pieces(self.model) if fields.stream_mode == "evolve" else None
        self.logprobs = Logprobs(self.plan.top_logprobs) if self.plan.logprobs else None
        self.results: dict[int, dict[str, Any]] = {}
        self.reasons: list[str] = []
        self.texting = False

    @property
    def complete(self) -> bool:
        return len(self.results) >= len(self.plan.rows)

    def text_sent(self, delta: str) -> None:
        if delta and not self.texting:
            self.texting = True
            self.service.metrics.first_text.observe(time.perf_counter() - self.arrival)

    def roles(self) -> str:
        """A chat stream's first chunk: every choice's `role`."""
        return sse(self.reply.chunk([self.reply.delta(i, "", role=True) for i in range(len(self.plan.rows))]))

    def step(self, event: Any) -> str | None:
        """The chunk of one pass of one row (a StepEvent or FinalPrefix): its new final text, and in an evolve
        stream its canvas; None when there is nothing to send."""
        delta = self.texts[event.row].advance(event.tokens, final_end(event))
        self.text_sent(delta)
        if self.pieces is not None:
            return sse(self.reply.chunk([self.reply.delta(event.row, delta)], evotok=evolve(event, self.pieces)))
        return sse(self.reply.chunk([self.reply.delta(event.row, delta)])) if delta else None

    def finished(self, job: Any) -> Iterator[str]:
        """The last chunk of each row of a job that finished: the rest of its text and its finish_reason."""
        first = self.firsts[job.id]
        for offset, row in enumerate(job.result.rows):
            i = first + offset
            self.results[i] = result = row_result(self.model, self.plan.rows[i], row, job.seconds,
                                                  max_tokens=self.plan.max_tokens)
            self.service.metrics.completion_tokens += result["tokens"]
            text, reason = finish(result, self.fields.stop)
            self.reasons.append(reason)
            rest = self.texts[i].finish(text)
            self.text_sent(rest or "end")  # an empty answer's first text is its end
            logprobs = self.logprobs(self.reply.chat, result, text) if self.logprobs else None
            yield sse(self.reply.chunk([self.reply.delta(i, rest, reason, logprobs=logprobs)]))

    def closing(self) -> Iterator[str]:
        """Once every row has finished: the request's metrics, and the usage chunk when it was asked for."""
        self.service.metrics.prompt_tokens += self.plan.prompt_tokens
        self.service.metrics.answered(time.perf_counter() - self.arrival, self.reasons)
        if self.fields.include_usage:
            ordered = [self.results[i] for i in sorted(self.results)]
            yield sse(self.reply.chunk([], usage=usage(self.plan.prompt_tokens, ordered)))


async def chunks(service: Service, session: Session, fields: CompletionFields, reply: Reply, deadline: float,
                 note: Callable[[str], None], *, arrival: float | None = None) -> AsyncIterator[str]:
    """The SSE body of one streamed request; cancelling it (a client gone) cancels the session's jobs."""
    arrival = time.perf_counter() if arrival is None else arrival
    answers = Answers(service, session, fields, reply, arrival)
    try:
        if reply.chat:
            yield answers.roles()
        while not answers.complete:
            kind, item = await next_item(session, deadline)
            if kind == "step":
                chunk = answers.step(item)
                if chunk is not None:
                    yield chunk
                continue
            failure = failure_of(item, session)
            if failure is not None:
                note(failure.code or "error")
                yield sse(failure.body())
                break
            for chunk in answers.finished(item):
                yield chunk
        else:
            for chunk in answers.closing():
                yield chunk
        yield DONE
    except asyncio.TimeoutError:
        service.cancel(session, "timeout")
        note("timeout")
        yield sse(timeout_error(service.timeout).body())
        yield DONE
    except asyncio.CancelledError:
        note("disconnect")
        raise
    finally:
        service.close(session, "disconnect")
        service.metrics.queued(session, arrival)


async def next_item(session: Session, deadline: float) -> tuple[str, Any]:
    """The session's next ("step", event) or ("done", job); asyncio.TimeoutError once `deadline` has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise asyncio.TimeoutError
    return await asyncio.wait_for(session.queue.get(), timeout=remaining)


def timeout_error(seconds: float) -> ApiError:
    return ApiError(504, f"the request took longer than the server's --timeout of {seconds:g} s; it was cancelled",
                    code="timeout", type="server_error")


def failure_of(job: Any, session: Session) -> ApiError | None:
    """Why a finished job has no result, as an error object (None when it has one)."""
    if job.error is not None:
        return job_error(job.error)
    if job.result is None:
        reason = session.reason or "shutdown"
        if reason == "shutdown":
            return ApiError(503, "the server shut down before this request finished", code="shutting_down",
                            type="server_error")
        return ApiError(499, f"cancelled ({reason})", code=reason, type="server_error")
    return None


def job_error(error: BaseException) -> ApiError:
    """A decoding failure: the user's (400, one line) or the server's (500, no traceback)."""
    if isinstance(error, EvotokError):
        return ApiError(400, error.line(), code="invalid_value")
    print(f"error: decoding failed ({type(error).__name__}: {error})", file=sys.stderr)
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    return ApiError(500, "internal error while decoding", code="internal_error", type="server_error")
