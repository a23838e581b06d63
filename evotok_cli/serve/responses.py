"""OpenAI response objects: completions, chat completions, their stream chunks, usage and logprobs.

A choice's text is `generate --json`'s `text` for the same row, cut at `max_tokens` tokens and before the
first stop string; its finish_reason is "stop" when a stop string or a stop id (EOS, end of turn) ended
it, else "length" (the canvas ran out, or the answer was cut at max_tokens).
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


@dataclass
class Reply:
    """What every object of one response shares."""

    chat: bool
    model: str
    id: str = field(default_factory=lambda: "")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str, finish_reason: str | None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def delta(self, index: int, text: str | None, finish_reason: str | None = None,
              role: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """One choice of a stream chunk."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**self.head(self.chunk_object), "choices": choices, **extra}


def finish(result: dict[str, Any], stops: list[str]) -> tuple[str, str]:
    """A row's returned text and finish_reason (`row_result` has cut it at max_tokens: its `token_ids` end at
    the cut, so a stop id before their end means the answer ended by itself)."""
    text, hit = cut_at_stop(result["text"], stops)
    stopped = hit or result["tokens"] < len(result["token_ids"])
    return text, "stop" if stopped else "length"


def usage(prompt_tokens: int, results: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's usage, plus `nfe`: the most forward passes any row needed."""
    completion = sum(r["tokens"] for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "nfe": max((r["nfe"] for r in results), default=0)}


class Logprobs:
    """A row's per-token log-probabilities in OpenAI's shapes, from `row_result`'s `logprobs`: for each
    answer token, the log-probability the decoder's model gave it at the pass that wrote it (temperature 1,
    before sampling filters) and the most probable tokens of that pass."""

    def __init__(self, top: int):
        self.top = top

    def entries(self, result: dict[str, Any], text: str) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """(token text, logprob, top alternatives) of the answer tokens whose text is in the returned `text`
        (a stop string may have cut it)."""
        out: list[tuple[str, float, list[tuple[str, float]]]] = []
        length, whole = 0, text == result["text"]
        for entry in result.get("logprobs") or []:
            if not whole and length >= len(text):
                break
            out.append((entry["token"], _finite(entry["logprob"]),
                        [(t["token"], _finite(t["logprob"])) for t in entry["top"][:self.top]]))
            length += len(entry["token"])
        return out

    def chat(self, result: dict[str, Any], text: str) -> dict[str, Any]:
        def item(piece: str, logprob: float) -> dict[str, Any]:
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        content = [{**item(p, lp), "top_logprobs": [item(t, tl) for t, tl in top]}
                   for p, lp, top in self.entries(result, text)]
        return {"content": content, "refusal": None}

    def completion(self, result: dict[str, Any], text: str) -> dict[str, Any]:
        entries = self.entries(result, text)
        offsets, at = [], 0
        for piece, _, _ in entries:
            offsets.append(at)
            at += len(piece)
        return {"tokens": [p for p, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries] if self.top else None, "text_offset": offsets}

    def __call__(self, chat: bool, result: dict[str, Any], text: str) -> dict[str, Any]:
        return self.chat(result, text) if chat else self.completion(result, text)


def _finite(value: float | None) -> float:
    """JSON has no -Infinity: a token given no chance (or, None, a position no pass wrote) is reported as
    -9999.0, as vLLM reports -inf."""
    return value if value is not None and math.isfinite(value) else -9999.0


def response(reply: Reply, results: list[dict[str, Any]], plan: Any) -> dict[str, Any]:
    """The whole (non-streamed) answer; `evotok` holds the decoder, its settings, each choice's seed and NFE."""
    logprobs = Logprobs(plan.top_logprobs) if plan.logprobs else None
    choices = []
    for i, r in enumerate(results):
        text, reason = finish(r, plan.stops)
        choices.append(reply.choice(i, text, reason, logprobs(reply.chat, r, text) if logprobs else None))
    return {**reply.head(reply.object), "choices": choices, "usage": usage(plan.prompt_tokens, results),
            "evotok": extension(plan, results)}


def extension(plan: Any, results: list[dict[str, Any]]) -> dict[str, Any]:
    """evotok's own part of an answer: how to reproduce it (decoder, settings, the seed of every choice), and
    each choice's generated span as token ids, special tokens and all (`bench --endpoint` scores the span
    decoded with them kept, as a local bench does, which the text cut at the first stop id cannot give)."""
    return {"decoder": plan.decoder_name, "settings": plan.settings, "seeds": plan.seeds,
            "nfe": [r["nfe"] for r in results], "token_ids": [r["token_ids"] for r in results]}
