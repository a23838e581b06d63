"""Read a `generate --trace` file (docs/trace.md) into per-prompt step lists, checking every line.

Pictures trust what this returns, so each rule of the schema is checked here once, and the first broken
line stops the read with a one-line error naming the line and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import DataError
from evotok_cli.base.files import read_text
from evotok_cli.base.values import Bounds
from evotok_cli.decoding.api import TRACE_BLOCK_KEYS, TRACE_BLOCK_STATES, TRACE_SCHEMA, StepEvent
from evotok_cli.viz.style import STATES

SCHEMA = TRACE_SCHEMA  # the schema is declared once, beside StepEvent: decoding/api.py
BLOCK_STATES = TRACE_BLOCK_STATES


@dataclass(frozen=True)
class TracedBlock:
    """One d2f block after a pass, as the trace records it (`TRACE_BLOCK_KEYS`, in that order): positions
    [start, end) of the generated span."""

    start: int
    end: int
    state: str
    fully_activated: bool
    progress: float


@dataclass
class Step(StepEvent):
    """One forward pass of one prompt (one trace line), read back: the `StepEvent` the decoder emitted, whose
    fields are the schema (so a field added there is a field here), `row` being the prompt index, and d2f's
    blocks typed."""

    blocks: list[TracedBlock] | None = None  # type: ignore[assignment]  # the event's dicts, checked and typed


@dataclass
class PromptTrace:
    index: int
    steps: list[Step]

    @property
    def positions(self) -> int:
        return len(self.steps[0].states)

    @property
    def revisions(self) -> int:
        return sum(len(s.revised) for s in self.steps)


@dataclass
class Trace:
    path: str
    decoder: str
    mask_id: int
    prompts: list[PromptTrace]  # by prompt_index
    model: str | None = None  # the checkpoint folder the trace was made with, when it recorded one

    def select(self, index: int | None) -> list[PromptTrace]:
        """All prompts, or the one asked for (a one-line error when the file has no such prompt)."""
        if index is None:
            return self.prompts
        found = [p for p in self.prompts if p.index == index]
        if not found:
            held = ", ".join(str(p.index) for p in self.prompts)
            raise DataError(f"no prompt {index} in this trace (it holds prompt {held})", where=self.path,
                            fix="pick one of those with --prompt-index")
        return found


class _Line:
    """Checks one record; `fail` raises the one-line error that names the file and line."""

    def __init__(self, path: str, lineno: int, record: Any):
        self.path, self.lineno, self.record = path, lineno, record

    def fail(self, what: str) -> DataError:
        return DataError(f"line {self.lineno}: {what}", where=self.path,
                         fix="write traces with `evotok generate --trace FILE.jsonl`; schema in docs/trace.md")

    def field(self, key: str) -> Any:
        if key not in self.record:
            raise self.fail(f"missing field {key!r}")
        return self.record[key]

    def integer(self, value: Any, name: str, lo: int = 0, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{name} is {value!r}, not an integer")
        bounds = Bounds(lo, hi)
        if not bounds.contains(value):
            raise self.fail(f"{name} is {value}, outside {bounds.interval() if hi is not None else bounds.phrase()}")
        return value

    def number(self, value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{name} is {value!r}, not a number")
        return float(value)

    def array(self, key: str, length: int | None = None, why: str = "one per position") -> list:
        value = self.field(key)
        if not isinstance(value, list):
            raise self.fail(f"{key} is {type(value).__name__}, not a list")
        if length is not None and len(value) != length:
            raise self.fail(f"{key} has {len(value)} entries, not {length} ({why})")
        return value


def read_trace(path: str | Path) -> Trace:
    """The trace at `path`, grouped by prompt (ascending index) with steps in file order."""
    where = str(path)
    text = read_text(path, what="trace file", fix="write one with `evotok generate --trace FILE.jsonl`")
    decoder: str | None = None
    mask_id: int | None = None
    model: str | None = None
    prompts: dict[int, PromptTrace] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _Line(where, number, None).fail(f"not JSON ({exc.msg} at column {exc.colno})") from None
        line = _Line(where, number, record)
        if not isinstance(record, dict):
            raise line.fail(f"a JSON {type(record).__name__}, not an object")
        if line.field("schema") != SCHEMA:
            raise line.fail(f"schema is {record['schema']!r}, this version reads {SCHEMA!r}")
        decoder = _same(line, "decoder", decoder, str)
        mask_id = _same(line, "mask_id", mask_id, int)
        if isinstance(record.get("model"), str):
            model = record["model"]
        index = line.integer(line.field("prompt_index"), "prompt_index")
        step = parse_step(line, index)
        prompt = prompts.setdefault(index, PromptTrace(index, []))
        if prompt.steps:
            before = prompt.steps[-1]
            if step.step <= before.step:
                raise line.fail(f"step {step.step} of prompt {index} follows step {before.step} (steps must increase)")
            if len(step.states) != len(before.states):
                raise line.fail(f"{len(step.states)} positions, earlier lines of prompt {index} have "
                                f"{len(before.states)}")
        prompt.steps.append(step)
    if not prompts:
        raise DataError("no trace records (the file is empty)", where=where,
                        fix="write one with `evotok generate --trace FILE.jsonl`")
    return Trace(where, decoder or "", mask_id if mask_id is not None else -1,
                 [prompts[i] for i in sorted(prompts)], model)


def _same(line: _Line, key: str, seen: Any, kind: type) -> Any:
    value = line.field(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise line.fail(f"{key} is {value!r}, not a {kind.__name__}")
    if seen is not None and value != seen:
        raise line.fail(f"{key} is {value!r}, earlier lines have {seen!r} (one run per trace file)")
    return value


def parse_step(line: _Line, index: int = 0) -> Step:
    """One record's pass (of prompt `index`); every position refers to the generated span of `len(states)`
    tokens. Every field of `StepEvent` but `row` is read from the record (`row` is the prompt index)."""
    states = line.array("states")
    if not states:
        raise line.fail("states is empty")
    n = len(states)
    for i, s in enumerate(states):
        if s not in STATES:
            raise line.fail(f"states[{i}] is {s!r}, not one of {', '.join(STATES)}")
    tokens = [line.integer(t, f"tokens[{i}]") for i, t in enumerate(line.array("tokens", n))]
    confidence = [None if c is None else line.number(c, f"confidence[{i}]")
                  for i, c in enumerate(line.array("confidence", n))]
    block = line.array("block", 2, "[start, end]")
    start = line.integer(block[0], "block[0]", 0, n)
    end = line.integer(block[1], "block[1]", start, n)
    return Step(
        step=line.integer(line.field("step"), "step", 1),
        row=index,
        block=(start, end),
        states=states,
        tokens=tokens,
        confidence=confidence,
        committed=_positions(line, "committed", n),
        revised=_positions(line, "revised", n),
        candidates=_candidates(line, n),
        blocks=_blocks(line, n),
    )


def _positions(line: _Line, key: str, n: int) -> list[int]:
    return [line.integer(p, f"{key}[{i}]", 0, n - 1) for i, p in enumerate(line.array(key))]


def _candidates(line: _Line, n: int) -> list[list[tuple[int, float]]] | None:
    if line.field("candidates") is None:
        return None
    out = []
    for i, pairs in enumerate(line.array("candidates", n)):
        if not isinstance(pairs, list):
            raise line.fail(f"candidates[{i}] is {pairs!r}, not a list of [token, weight] pairs")
        row = []
        for j, pair in enumerate(pairs):
            name = f"candidates[{i}][{j}]"
            if not isinstance(pair, list) or len(pair) != 2:
                raise line.fail(f"{name} is {pair!r}, not a [token, weight] pair")
            weight = line.number(pair[1], f"{name} weight")
            if not math.isfinite(weight) or weight < 0:
                raise line.fail(f"{name} weight is {weight}, not a finite weight >= 0")
            row.append((line.integer(pair[0], f"{name} token"), weight))
        out.append(row)
    return out


def _blocks(line: _Line, n: int) -> list[TracedBlock] | None:
    if line.field("blocks") is None:
        return None
    out = []
    for i, b in enumerate(line.array("blocks")):
        name = f"blocks[{i}]"
        if not isinstance(b, dict):
            raise line.fail(f"{name} is {b!r}, not an object")
        missing = [k for k in TRACE_BLOCK_KEYS if k not in b]
        if missing:
            raise line.fail(f"{name} has no {missing[0]!r}")
        if b["state"] not in BLOCK_STATES:
            raise line.fail(f"{name}.state is {b['state']!r}, not one of {', '.join(BLOCK_STATES)}")
        if not isinstance(b["fully_activated"], bool):
            raise line.fail(f"{name}.fully_activated is {b['fully_activated']!r}, not true/false")
        start = line.integer(b["start"], f"{name}.start", 0, n)
        out.append(TracedBlock(start=start, end=line.integer(b["end"], f"{name}.end", start, n), state=b["state"],
                                 fully_activated=b["fully_activated"],
                                 progress=line.number(b["progress"], f"{name}.progress")))
    return out
