"""Request bodies of /v1/completions and /v1/chat/completions, checked field by field.

Every client mistake becomes an `ApiError`: HTTP 400 with an OpenAI error object naming the field
(`param`), never a 500. Checks here need no model; `plan.py` does the ones that do (decoder options,
settings the decoder reads, token ids in the vocabulary, the context length).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from evotok_cli.prompts import Prompt

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_PROMPTS = 64  # prompts in one completions request
MAX_N = 64  # choices per prompt
MAX_ROWS = 256  # prompts x n: rows one request may put into the engine
MAX_STOPS = 4  # as OpenAI
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
STREAM_MODES = ("final", "evolve")
SEED_MAX = 2**63 - 1 - MAX_ROWS  # row i samples from seed + i


@dataclass
class ApiError(Exception):
    """An HTTP error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class CompletionFields:
    """One checked request: what to decode and how to answer."""

    chat: bool
    prompts: list[Prompt]  # completions: text or ids, raw; chat: one prompt holding the messages
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    stream_mode: str = "final"
    include_usage: bool = False
    n: int = 1
    decoder: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    block_length: int | None = None

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says why not."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {len(raw)} bytes, over the limit of {MAX_BODY_BYTES}",
                       code="body_too_large")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise bad("request body is not UTF-8", None, "invalid_json") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise bad(f"request body is not valid JSON ({exc})", None, "invalid_json") from None
    except RecursionError:
        raise bad("request body is nested too deeply", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, not {_kind(body)}", None, "invalid_json")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("text holds a lone surrogate (not valid Unicode)", param) from None
    return value


class Fields:
    """Typed reads of a JSON object's fields; `finish()` refuses the fields nobody read."""

    def __init__(self, body: dict[str, Any], prefix: str = ""):
        self.body, self.prefix, self.seen = body, prefix, set()

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.body.get(key)

    def integer(self, key: str, lo: int, hi: int) -> int | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"{key} must be an integer, not {_kind(value)}", self.prefix + key, "invalid_type")
        if not lo <= value <= hi:
            raise bad(f"{key} must be between {lo} and {hi}, got {value}", self.prefix + key)
        return value

    def number(self, key: str, lo: float, hi: float) -> float | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad(f"{key} must be a number, not {_kind(value)}", self.prefix + key, "invalid_type")
        if not math.isfinite(value) or not lo <= value <= hi:
            raise bad(f"{key} must be a finite number between {lo:g} and {hi:g}, got {value}", self.prefix + key)
        return float(value)

    def boolean(self, key: str) -> bool | None:
        value = self.raw(key)
        if value is not None and not isinstance(value, bool):
            raise bad(f"{key} must be true or false, not {_kind(value)}", self.prefix + key, "invalid_type")
        return value

    def string(self, key: str) -> str | None:
        value = self.raw(key)
        if value is not None and not isinstance(value, str):
            raise bad(f"{key} must be a string, not {_kind(value)}", self.prefix + key, "invalid_type")
        return None if value is None else _text(value, self.prefix + key)

    def neutral(self, key: str, allowed: tuple[Any, ...], what: str) -> None:
        """An OpenAI field evotok does not implement: accepted only at the value that changes nothing."""
        value = self.raw(key)
        if value is not None and not any(value == a and type(value) is type(a) or
                                         (isinstance(a, float) and _number_equal(value, a)) for a in allowed):
            raise bad(f"{key} is not supported by evotok serve ({what})", self.prefix + key, "unsupported")

    def finish(self) -> None:
        unknown = sorted(k for k in self.body if k not in self.seen)
        if unknown:
            raise bad(f"unknown field {unknown[0]!r}", self.prefix + unknown[0], "unknown_field")


def _number_equal(value: Any, target: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == target


def parse_completion(body: dict[str, Any]) -> CompletionFields:
    """/v1/completions: `prompt` is raw text (no chat template, no prefill) or token ids."""
    f = Fields(body)
    prompts = _prompts(f.raw("prompt"))
    f.neutral("echo", (False,), "only echo: false")
    f.neutral("suffix", ("",), "no suffix")
    f.neutral("best_of", (1,), "only best_of: 1")
    f.neutral("logprobs", (0, False), "no logprobs")
    return _common(f, CompletionFields(chat=False, prompts=prompts))


def parse_chat(body: dict[str, Any]) -> CompletionFields:
    """/v1/chat/completions: `messages` go through the model's chat template, then its prefill."""
    f = Fields(body)
    messages = _messages(f.raw("messages"))
    out = CompletionFields(chat=True, prompts=[Prompt(None, messages=messages)])
    alias = f.integer("max_completion_tokens", 1, 1 << 20)
    f.neutral("logprobs", (False,), "no logprobs")
    f.neutral("top_logprobs", (0,), "no logprobs")
    response_format = f.raw("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad("response_format is not supported by evotok serve (only {\"type\": \"text\"})", "response_format",
                  "unsupported")
    out = _common(f, out)
    if alias is not None:
        if out.max_tokens is not None and out.max_tokens != alias:
            raise bad("max_tokens and max_completion_tokens differ", "max_completion_tokens")
        out.max_tokens = alias
    return out


def _common(f: Fields, out: CompletionFields) -> CompletionFields:
    """The fields both endpoints share, then the refusal of any other."""
    out.model = f.string("model")
    out.max_tokens = f.integer("max_tokens", 1, 1 << 20)
    out.temperature = f.number("temperature", 0.0, 100.0)
    out.seed = f.integer("seed", 0, SEED_MAX)
    out.n = f.integer("n", 1, MAX_N) or 1
    out.stop = _stops(f.raw("stop"))
    out.stream = bool(f.boolean("stream"))
    out.stream_mode = _stream_mode(f.string("stream_mode"), out.stream)
    out.include_usage = _stream_options(f.raw("stream_options"), out.stream)
    out.decoder = f.string("decoder")
    out.options = _options(f.raw("options"))
    out.steps = f.integer("steps", 1, 1 << 20)
    out.block_length = f.integer("block_length", 1, 1 << 20)
    f.string("user")  # accepted, not used
    f.neutral("top_p", (1.0,), "only top_p: 1")
    f.neutral("frequency_penalty", (0.0,), "only 0")
    f.neutral("presence_penalty", (0.0,), "only 0")
    f.neutral("logit_bias", ({},), "no logit_bias")
    f.finish()
    if out.rows > MAX_ROWS:
        raise bad(f"{len(out.prompts)} prompts x n={out.n} is {out.rows} rows, over the limit of {MAX_ROWS}", "n")
    return out


def _prompts(value: Any) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if value is None:
        raise bad("prompt is required", "prompt", "missing_field")
    if isinstance(value, str):
        return [Prompt(_text(value, "prompt"))]
    if not isinstance(value, list):
        raise bad(f"prompt must be a string or an array, not {_kind(value)}", "prompt", "invalid_type")
    if not value:
        raise bad("prompt is an empty array", "prompt")
    if all(_is_id(v) for v in value):
        return [Prompt(None, ids=list(value))]
    if len(value) > MAX_PROMPTS:
        raise bad(f"{len(value)} prompts, over the limit of {MAX_PROMPTS}", "prompt")
    prompts = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            prompts.append(Prompt(_text(item, f"prompt[{i}]")))
        elif isinstance(item, list) and item and all(_is_id(v) for v in item):
            prompts.append(Prompt(None, ids=list(item)))
        else:
            raise bad(f"prompt[{i}] must be a string or a non-empty array of token ids (integers >= 0)",
                      f"prompt[{i}]", "invalid_type")
    return prompts


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _messages(value: Any) -> list[dict[str, str]]:
    if value is None:
        raise bad("messages is required", "messages", "missing_field")
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty array of {role, content} objects", "messages", "invalid_type")
    out = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object, not {_kind(item)}", where, "invalid_type")
        f = Fields(item, prefix=where + ".")
        role = f.string("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", where + ".role")
        content = _content(f.raw("content"), where + ".content")
        f.string("name")  # accepted, not used
        f.finish()
        out.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "user" for m in out):
        raise bad("messages hold no user message", "messages")
    return out


def _content(value: Any, where: str) -> str:
    """A string, or text parts [{"type": "text", "text": ...}] joined by newlines."""
    if isinstance(value, str):
        return _text(value, where)
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    and set(part) == {"type", "text"}):
                raise bad(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                          "(evotok serve reads text only)", f"{where}[{j}]", "invalid_type")
            texts.append(_text(part["text"], f"{where}[{j}]"))
        return "\n".join(texts)
    raise bad(f"{where} must be a string or an array of text parts, not {_kind(value)}", where, "invalid_type")


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise bad(f"stop must hold 1 to {MAX_STOPS} non-empty strings", "stop")
    return [_text(s, "stop") for s in stops]


def _stream_mode(value: str | None, stream: bool) -> str:
    if value is None:
        return "final"
    if value not in STREAM_MODES:
        raise bad(f"stream_mode must be one of {', '.join(STREAM_MODES)}, got {value!r}", "stream_mode")
    if not stream:
        raise bad("stream_mode needs stream: true", "stream_mode")
    return value


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise bad("stream_options needs stream: true", "stream_options")
    if not isinstance(value, dict):
        raise bad(f"stream_options must be an object, not {_kind(value)}", "stream_options", "invalid_type")
    f = Fields(value, prefix="stream_options.")
    include = f.boolean("include_usage")
    f.finish()
    return bool(include)


def _options(value: Any) -> dict[str, Any]:
    """Decoder options, as `--opt key=value`: scalar values only (the decoder checks names and ranges)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"options must be an object, not {_kind(value)}", "options", "invalid_type")
    for key, item in value.items():
        if item is not None and not isinstance(item, (str, int, float, bool)):
            raise bad(f"options.{key} must be a string, number or boolean, not {_kind(item)}", f"options.{key}",
                      "invalid_type")
        if isinstance(item, float) and not math.isfinite(item):
            raise bad(f"options.{key} is not a finite number", f"options.{key}")
        if isinstance(item, str):
            _text(item, f"options.{key}")
    return {str(k).replace("-", "_"): v for k, v in value.items()}
