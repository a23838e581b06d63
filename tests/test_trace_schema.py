"""One trace schema (issue 29, item 5): `decoding.api.StepEvent` declares it, the trace writer writes its fields
and `viz.trace` reads them back as `Step`, a subclass of it, so the two cannot drift apart."""

from __future__ import annotations

import dataclasses
import io
import json

from evotok_cli.decoding.api import TRACE_BLOCK_KEYS, TRACE_SCHEMA, StepEvent
from evotok_cli.jobs.generation import TraceWriter
from evotok_cli.viz.trace import SCHEMA, Step, TracedBlock, read_trace


class Model:
    mask_id, path = 2, "/models/tiny"


def events() -> list[StepEvent]:
    blocks = [{"start": 0, "end": 2, "state": "in_cache", "fully_activated": True, "progress": 1.0},
              {"start": 2, "end": 3, "state": "active", "fully_activated": False, "progress": 0.5}]
    return [
        StepEvent(step=1, row=0, block=(0, 3), states=["mask", "soft_mask", "decoded"], tokens=[2, 7, 9],
                  confidence=[None, 0.25, 0.75], committed=[2], revised=[], candidates=[[], [(7, 0.6), (8, 0.4)],
                                                                                        []], blocks=blocks),
        StepEvent(step=2, row=0, block=(0, 3), states=["soft", "decoded", "decoded"], tokens=[5, 7, 9],
                  confidence=[0.5, 0.25, 0.75], committed=[1], revised=[2], candidates=None, blocks=None),
        StepEvent(step=1, row=1, block=(0, 3), states=["decoded", "mask", "mask"], tokens=[4, 2, 2],
                  confidence=[0.9, None, None], committed=[0], revised=[]),
    ]


def test_the_schema_is_declared_once():
    assert SCHEMA is TRACE_SCHEMA
    assert issubclass(Step, StepEvent)
    assert [f.name for f in dataclasses.fields(Step)] == [f.name for f in dataclasses.fields(StepEvent)]
    assert tuple(f.name for f in dataclasses.fields(TracedBlock)) == TRACE_BLOCK_KEYS


def test_what_the_writer_writes_reads_back_as_the_same_event(tmp_path):
    buffer = io.StringIO()
    writer = TraceWriter(buffer, "evotoken", Model(), offset=3)
    for event in events():
        writer(event)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert list(lines[0]) == ["schema", "decoder", "prompt_index", "mask_id", "model",
                              *(f.name for f in dataclasses.fields(StepEvent) if f.name != "row")]
    path = tmp_path / "trace.jsonl"
    path.write_text(buffer.getvalue())
    trace = read_trace(path)
    read = [step for prompt in trace.prompts for step in prompt.steps]
    for event, step in zip(events(), read, strict=True):
        expected = dataclasses.asdict(event)
        got = dataclasses.asdict(step)  # the typed blocks become the event's dicts again
        assert got == {**expected, "row": event.row + 3}
        assert step.blocks is None or all(isinstance(b, TracedBlock) for b in step.blocks)
    assert (trace.decoder, trace.mask_id, trace.model) == ("evotoken", 2, "/models/tiny")
