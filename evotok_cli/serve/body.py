"""Reading a request body as OpenAI's servers do: the bytes as one JSON object (size-capped, no NaN or
Infinity, no deep nesting) and its fields with their types checked, every mistake an `ApiError` (an HTTP
status and an OpenAI error object naming the field), never a 500. `schema.py` builds on these reads."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_BODY_BYTES = 4 * 1024 * 1024


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
        raise bad(f"request body must be a JSON object, not {kind_of(body)}", None, "invalid_json")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def kind_of(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def checked_text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("text holds a lone surrogate (not valid Unicode)", param) from None
    return value


class Fields:
    """Typed reads of a JSON object's fields; `finish()` lists the fields nobody read in `ignored`, or refuses
    them when strict."""

    def __init__(self, body: dict[str, Any], prefix: str = "", *, strict: bool = False,
                 ignored: list[str] | None = None):
        self.body, self.prefix, self.seen, self.strict = body, prefix, set(), strict
        self.ignored: list[str] = [] if ignored is None else ignored

    def nested(self, body: dict[str, Any], prefix: str) -> Fields:
        """The fields of an object inside this one, sharing its strictness and its list of ignored fields."""
        return Fields(body, prefix, strict=self.strict, ignored=self.ignored)

    def inert(self, *keys: str) -> None:
        """Fields accepted with any value and ignored: they cannot change the answer."""
        self.seen.update(keys)

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.body.get(key)

    def integer(self, key: str, lo: int, hi: int) -> int | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"{key} must be an integer, not {kind_of(value)}", self.prefix + key, "invalid_type")
        if not lo <= value <= hi:
            raise bad(f"{key} must be between {lo} and {hi}, got {value}", self.prefix + key)
        return value

    def number(self, key: str, lo: float, hi: float) -> float | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad(f"{key} must be a number, not {kind_of(value)}", self.prefix + key, "invalid_type")
        if not math.isfinite(value) or not lo <= value <= hi:
            raise bad(f"{key} must be a finite number between {lo:g} and {hi:g}, got {value}", self.prefix + key)
        return float(value)

    def boolean(self, key: str) -> bool | None:
        value = self.raw(key)
        if value is not None and not isinstance(value, bool):
            raise bad(f"{key} must be true or false, not {kind_of(value)}", self.prefix + key, "invalid_type")
        return value

    def string(self, key: str) -> str | None:
        value = self.raw(key)
        if value is not None and not isinstance(value, str):
            raise bad(f"{key} must be a string, not {kind_of(value)}", self.prefix + key, "invalid_type")
        return None if value is None else checked_text(value, self.prefix + key)

    def neutral(self, key: str, allowed: tuple[Any, ...], what: str) -> None:
        """An OpenAI field evotok does not implement: accepted only at the value that changes nothing."""
        value = self.raw(key)
        if value is not None and not any(value == a and type(value) is type(a) or
                                         (isinstance(a, float) and _number_equal(value, a)) for a in allowed):
            raise bad(f"{key} is not supported by evotok serve ({what})", self.prefix + key, "unsupported")

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self.body if k not in self.seen)
        if unknown and self.strict:
            raise bad(f"unknown field {unknown[0]!r} (the server runs with --strict)", self.prefix + unknown[0],
                      "unknown_field")
        self.ignored.extend(self.prefix + k for k in unknown)

    def refused(self, key: str, accepted: Any, what: str) -> None:
        """A field that would change the output and is not implemented: 400 unless `accepted(value)`."""
        value = self.raw(key)
        if value is not None and not accepted(value):
            raise bad(f"{key} is not supported by evotok serve ({what})", self.prefix + key, "unsupported")


def _number_equal(value: Any, target: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == target
