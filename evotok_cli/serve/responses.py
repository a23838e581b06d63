"""OpenAI response objects: completions, chat completions, their stream chunks and usage.

A choice's text is `generate --json`'s `text` for the same row, cut before the first stop string; its
finish_reason is "stop" when a stop string or a stop id (EOS, end of turn) ended it, else "length".
"""

from __future__ import annotations

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

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, index: int, text: str | None, finish_reason: str | None = None,
              role: bool = False) -> dict[str, Any]:
        """One choice of a stream chunk."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**self.head(self.chunk_object), "choices": choices, **extra}


def finish(result: dict[str, Any], stops: list[str]) -> tuple[str, str]:
    """A row's returned text and finish_reason."""
    text, hit = cut_at_stop(result["text"], stops)
    stopped = hit or result["tokens"] < len(result["token_ids"])  # a stop id came before the end
    return text, "stop" if stopped else "length"


def usage(prompt_tokens: int, results: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's usage, plus `nfe`: the most forward passes any row needed."""
    completion = sum(r["tokens"] for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "nfe": max((r["nfe"] for r in results), default=0)}


def response(reply: Reply, results: list[dict[str, Any]], stops: list[str], prompt_tokens: int,
             extension: dict[str, Any]) -> dict[str, Any]:
    """The whole (non-streamed) answer; `evotok` holds the decoder, its settings and each row's NFE."""
    choices = [reply.choice(i, *finish(r, stops)) for i, r in enumerate(results)]
    return {**reply.head(reply.object), "choices": choices, "usage": usage(prompt_tokens, results),
            "evotok": {**extension, "nfe": [r["nfe"] for r in results]}}
