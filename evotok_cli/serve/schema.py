"""Request bodies of /v1/completions and /v1/chat/completions, checked field by field.

Every client mistake becomes an `ApiError`: HTTP 400 with an OpenAI error object naming the field
(`param`), never a 500. Checks here need no model; `plan.py` does the ones that do (decoder options,
settings the decoder reads, token ids in the vocabulary, the context length).

What SDKs send is sorted into four kinds (docs/serve.md, "Differences from OpenAI"): fields evotok
implements; inert fields that cannot change a diffusion decode (accepted, ignored); fields that would change
the output but are not implemented (400 `unsupported` unless at the value that changes nothing); and unknown
fields, ignored and listed in `CompletionFields.ignored` (the server sends a warning header and logs them),
or refused with 400 `unknown_field` under `--strict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from evotok_cli.runtime.prompts import Prompt
from evotok_cli.serve.body import (  # noqa: F401 (ApiError, bad, MAX_BODY_BYTES: re-exported)
    MAX_BODY_BYTES,
    ApiError,
    Fields,
    bad,
    checked_text,
    kind_of,
    parse_json,
)

MAX_PROMPTS = 64  # prompts in one completions request
MAX_MESSAGES = 1000  # messages in one chat: refused before any is read (100,000 took seconds of template)
MAX_N = 64  # choices per prompt
MAX_ROWS = 256  # prompts x n: rows one request may put into the engine
MAX_STOPS = 4  # as OpenAI
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's limit for top_logprobs)
# OpenAI fields that cannot change what a diffusion decode returns: accepted with any value, ignored
INERT = ("user", "store", "metadata", "service_tier", "parallel_tool_calls", "prediction", "reasoning_effort",
         "safety_identifier", "prompt_cache_key", "stream_options")
STREAM_MODES = ("final", "evolve")
SEED_MAX = 2**63 - 1  # as every command's seeds; choice i samples from derive_seed(seed, i), below 2**63 too


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
    gen_length: int | None = None  # evotok's canvas length, exactly (max_tokens is only an upper bound)
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    ignored: list[str] = field(default_factory=list)  # unknown fields, ignored (dotted paths)

    @property
    def sampling_filters(self) -> dict[str, Any]:
        """top_p / top_k / min_p as the decoders take them, only those that filter something."""
        out: dict[str, Any] = {}
        if self.top_p < 1.0:
            out["top_p"] = self.top_p
        if self.top_k > 0:
            out["top_k"] = self.top_k
        if self.min_p > 0.0:
            out["min_p"] = self.min_p
        return out

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


def parse_completion(body: dict[str, Any], *, strict: bool = False) -> CompletionFields:
    """/v1/completions: `prompt` is raw text (no chat template, no prefill) or token ids."""
    f = Fields(body, strict=strict)
    out = CompletionFields(chat=False, prompts=_prompts(f.raw("prompt")))
    f.neutral("echo", (False,), "only echo: false")
    f.neutral("suffix", ("",), "no suffix")
    f.neutral("best_of", (1,), "only best_of: 1")
    logprobs = f.integer("logprobs", 0, MAX_LOGPROBS)
    if logprobs is not None:
        out.logprobs, out.top_logprobs = True, logprobs
    return _common(f, out)


def parse_chat(body: dict[str, Any], *, strict: bool = False) -> CompletionFields:
    """/v1/chat/completions: `messages` go through the model's chat template, then its prefill."""
    f = Fields(body, strict=strict)
    out = CompletionFields(chat=True, prompts=[Prompt(None, messages=messages_of(f.raw("messages"), f))])
    alias = f.integer("max_completion_tokens", 1, 1 << 20)
    out.logprobs = bool(f.boolean("logprobs"))
    out.top_logprobs = f.integer("top_logprobs", 0, MAX_LOGPROBS) or 0
    if out.top_logprobs and not out.logprobs:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    f.refused("response_format", lambda v: v == {"type": "text"}, 'only {"type": "text"}')
    f.refused("tools", lambda v: v == [], "no tools: the model answers in text only")
    f.refused("functions", lambda v: v == [], "no functions: the model answers in text only")
    f.refused("tool_choice", lambda v: v in ("none", "auto"), 'only "none" or "auto", with no tools')
    f.refused("function_call", lambda v: v in ("none", "auto"), 'only "none" or "auto", with no functions')
    f.refused("modalities", lambda v: v == ["text"], 'only ["text"]')
    f.refused("audio", lambda v: False, "text answers only")
    f.refused("web_search_options", lambda v: False, "no web search")
    out = _common(f, out)
    if alias is not None:
        if out.max_tokens is not None and out.max_tokens != alias:
            raise bad("max_tokens and max_completion_tokens differ", "max_completion_tokens")
        out.max_tokens = alias
    return out


def _common(f: Fields, out: CompletionFields) -> CompletionFields:
    """The fields both endpoints share, then the unknown ones (ignored, or refused when strict)."""
    out.model = f.string("model")
    out.max_tokens = f.integer("max_tokens", 1, 1 << 20)
    out.temperature = f.number("temperature", 0.0, 100.0)
    out.seed = f.integer("seed", 0, SEED_MAX)
    out.n = f.integer("n", 1, MAX_N) or 1
    out.stop = _stops(f.raw("stop"))
    out.stream = bool(f.boolean("stream"))
    out.stream_mode = _stream_mode(f.string("stream_mode"), out.stream)
    out.include_usage = _stream_options(f.raw("stream_options"), out.stream, f)
    out.decoder = f.string("decoder")
    out.options = _options(f.raw("options"))
    out.steps = f.integer("steps", 1, 1 << 20)
    out.block_length = f.integer("block_length", 1, 1 << 20)
    out.gen_length = f.integer("gen_length", 1, 1 << 20)
    top_p = f.number("top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise bad("top_p must be above 0 (1 keeps every token)", "top_p")
    out.top_p = 1.0 if top_p is None else top_p
    top_k = f.integer("top_k", -1, 1 << 30)  # vLLM's -1 and 0 both mean off
    out.top_k = max(0, top_k or 0)
    out.min_p = f.number("min_p", 0.0, 1.0) or 0.0
    f.inert(*INERT)
    f.neutral("frequency_penalty", (0.0,), "only 0")
    f.neutral("presence_penalty", (0.0,), "only 0")
    f.neutral("repetition_penalty", (1.0,), "only 1: a penalty would change the answer")
    f.neutral("ignore_eos", (False,), "only false: the answer always ends at the first stop id")
    f.neutral("min_tokens", (0,), "only 0: the decoders do not hold a stop id back")
    f.refused("logit_bias", lambda v: v == {}, "no logit_bias")
    f.finish()
    out.ignored = f.ignored
    if out.rows > MAX_ROWS:
        raise bad(f"{len(out.prompts)} prompts x n={out.n} is {out.rows} rows, over the limit of {MAX_ROWS}", "n")
    return out


def check_model(name: str | None, served: str) -> None:
    """A request's `model`, when it names one, must be the served id (OpenAI's 404 otherwise)."""
    if name is not None and name != served:
        raise ApiError(404, f"model {name!r} is not served here (this server serves {served!r})", param="model",
                       code="model_not_found")


def text_prompt(value: Any) -> str:
    """A prompt that must be one string (/tokenize's)."""
    if not isinstance(value, str):
        raise bad(f"prompt must be a string, not {kind_of(value)}", "prompt", "invalid_type")
    return checked_text(value, "prompt")


def _prompts(value: Any) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if value is None:
        raise bad("prompt is required", "prompt", "missing_field")
    if isinstance(value, str):
        return [Prompt(checked_text(value, "prompt"))]
    if not isinstance(value, list):
        raise bad(f"prompt must be a string or an array, not {kind_of(value)}", "prompt", "invalid_type")
    if not value:
        raise bad("prompt is an empty array", "prompt")
    if all(_is_id(v) for v in value):
        return [Prompt(None, ids=list(value))]
    if len(value) > MAX_PROMPTS:
        raise bad(f"{len(value)} prompts, over the limit of {MAX_PROMPTS}", "prompt")
    prompts = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            prompts.append(Prompt(checked_text(item, f"prompt[{i}]")))
        elif isinstance(item, list) and item and all(_is_id(v) for v in item):
            prompts.append(Prompt(None, ids=list(item)))
        else:
            raise bad(f"prompt[{i}] must be a string or a non-empty array of token ids (integers >= 0)",
                      f"prompt[{i}]", "invalid_type")
    return prompts


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def messages_of(value: Any, parent: Fields) -> list[dict[str, str]]:
    """Messages that carry text only: assistant `content: null` (with no tool calls) is an empty turn,
    `tool` messages pass their text to the chat template under their own role."""
    if value is None:
        raise bad("messages is required", "messages", "missing_field")
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty array of {role, content} objects", "messages", "invalid_type")
    if len(value) > MAX_MESSAGES:
        raise bad(f"{len(value)} messages, over the limit of {MAX_MESSAGES}", "messages")
    out = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object, not {kind_of(item)}", where, "invalid_type")
        f = parent.nested(item, where + ".")
        role = f.string("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", where + ".role")
        raw = f.raw("content")
        content = "" if raw is None and role == "assistant" else _content(raw, where + ".content", f)
        f.string("name")  # accepted, not used
        f.inert("tool_call_id", "refusal")  # a tool answer's id; an assistant turn's refusal (null)
        f.refused("tool_calls", lambda v: v == [], "the model answers in text only; a turn with tool calls "
                  "carries no text it could read")
        f.refused("function_call", lambda v: False, "the model answers in text only")
        f.refused("audio", lambda v: False, "text only")
        f.finish()
        out.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "user" for m in out):
        raise bad("messages hold no user message", "messages")
    return out


def _content(value: Any, where: str, parent: Fields) -> str:
    """A string, or text parts [{"type": "text", "text": ...}] joined by newlines (other keys of a text part,
    such as a cache hint, are unknown fields)."""
    if isinstance(value, str):
        return checked_text(value, where)
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                          "(evotok serve reads text only)", f"{where}[{j}]", "invalid_type")
            p = parent.nested(part, f"{where}[{j}].")
            texts.append(checked_text(p.string("text") or "", f"{where}[{j}]"))
            p.raw("type")
            p.finish()
        return "\n".join(texts)
    raise bad(f"{where} must be a string or an array of text parts, not {kind_of(value)}", where, "invalid_type")


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise bad(f"stop must hold 1 to {MAX_STOPS} non-empty strings", "stop")
    return [checked_text(s, "stop") for s in stops]


def _stream_mode(value: str | None, stream: bool) -> str:
    if value is None:
        return "final"
    if value not in STREAM_MODES:
        raise bad(f"stream_mode must be one of {', '.join(STREAM_MODES)}, got {value!r}", "stream_mode")
    if not stream:
        raise bad("stream_mode needs stream: true", "stream_mode")
    return value


def _stream_options(value: Any, stream: bool, parent: Fields) -> bool:
    """`include_usage` when streaming; without `stream` the object is inert (some clients always send it)."""
    if value is None or not stream:
        return False
    if not isinstance(value, dict):
        raise bad(f"stream_options must be an object, not {kind_of(value)}", "stream_options", "invalid_type")
    f = parent.nested(value, "stream_options.")
    include = f.boolean("include_usage")
    f.inert("continuous_usage_stats")  # vLLM's: usage on every chunk; evotok sends it once, at the end
    f.finish()
    return bool(include)


def _options(value: Any) -> dict[str, Any]:
    """Decoder options, as `--opt key=value`: scalar values only (the decoder checks names and ranges)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"options must be an object, not {kind_of(value)}", "options", "invalid_type")
    for key, item in value.items():
        if item is not None and not isinstance(item, (str, int, float, bool)):
            raise bad(f"options.{key} must be a string, number or boolean, not {kind_of(item)}", f"options.{key}",
                      "invalid_type")
        if isinstance(item, float) and not math.isfinite(item):
            raise bad(f"options.{key} is not a finite number", f"options.{key}")
        if isinstance(item, str):
            checked_text(item, f"options.{key}")
    return {str(k).replace("-", "_"): v for k, v in value.items()}
