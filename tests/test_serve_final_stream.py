"""A streamed request with stream_mode "final" (the default) builds no per-pass trace: the decoder sends a
FinalPrefix per block boundary instead of a StepEvent per pass and row, and the chunks are those the
traced stream sends."""

from __future__ import annotations

import json

import pytest

import evotok_plugins.d2f.decoder as d2f
from evotok_cli.decoding import blockwise
from evotok_cli.decoding.api import StepEvent

BODY = {"prompt": "Tom has 12 apples and", "stream": True, "n": 2, "temperature": 0.9, "seed": 3,
        "gen_length": 16, "block_length": 4, "steps": 8}


def _stream(tiny_model, monkeypatch, body: dict, *, final_events: bool) -> tuple[list[dict], int]:
    """The stream's chunks (without their per-request id and time) and how many StepEvents were built."""
    from starlette.testclient import TestClient

    from evotok_cli.jobs.config import GENERATE_DEFAULTS
    from evotok_cli.serve.app import create_app
    from evotok_cli.serve.plan import Served
    from evotok_cli.serve.sessions import Service

    built = [0]

    class Counted(StepEvent):
        def __init__(self, *args, **kwargs) -> None:
            built[0] += 1
            super().__init__(*args, **kwargs)

    for module, decoder in ((blockwise, blockwise.BlockwiseDecoder), (d2f, d2f.D2FDecoder)):
        monkeypatch.setattr(module, "StepEvent", Counted)
        monkeypatch.setattr(decoder, "final_events", final_events)
    service = Service(Served(tiny_model, "tiny", None, "hard-mask", dict(GENERATE_DEFAULTS)), max_rows=4,
                      max_queue=4, timeout=60)
    with TestClient(create_app(service, api_key=None, decoders=["hard-mask", "evotoken", "d2f"])) as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    chunks = []
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[len("data: "):])
            chunk.pop("id"), chunk.pop("created")
            chunks.append(chunk)
    return chunks, built[0]


@pytest.mark.parametrize("decoder, options", [("hard-mask", {}), ("evotoken", {}), ("d2f", {"block_size": 4})])
def test_a_final_stream_builds_no_step_event_and_sends_the_traced_chunks(tiny_model, monkeypatch, decoder, options):
    body = {**BODY, "decoder": decoder, "options": options}
    final, built = _stream(tiny_model, monkeypatch, body, final_events=True)
    assert built == 0
    traced, built = _stream(tiny_model, monkeypatch, body, final_events=False)
    assert built > 0  # the counter counts: the traced stream builds one per pass and row
    assert final == traced
    texts = [c["choices"][0]["text"] for c in final if c["choices"]]
    assert sum(1 for t in texts if t) >= 2, "the answer should arrive in more than one chunk"


def test_an_evolve_stream_still_gets_every_pass(tiny_model, monkeypatch):
    chunks, built = _stream(tiny_model, monkeypatch, {**BODY, "n": 1, "stream_mode": "evolve"}, final_events=True)
    assert built == len([c for c in chunks if "evotok" in c]) == 8
