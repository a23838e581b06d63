"""`evotok trace`, `evotok data` and `evotok decoders`: bad files, outputs and names."""

from __future__ import annotations

import json
import os

from tests.hostile import BAD_BYTES, Case, Ctx, write

TRACE = "{tmp}/run.jsonl"


def _trace(ctx: Ctx) -> None:
    """A real trace of the tiny model."""
    proc = ctx.cli("generate", "-m", str(ctx.model), "-p", "hi", "--gen-length", "8", "--block-length", "4",
                   "--steps", "4", "-d", "evotoken", "--trace", str(ctx.tmp / "run.jsonl"))
    assert proc.returncode == 0, proc.stderr


def _edit_trace(fn):
    def setup(ctx: Ctx) -> None:
        _trace(ctx)
        path = ctx.tmp / "run.jsonl"
        path.write_bytes(fn(path.read_bytes()))
    return setup


def _first_line(fn):
    def edit(data: bytes) -> bytes:
        lines = data.decode().splitlines()
        record = json.loads(lines[0])
        fn(record)
        return "\n".join([json.dumps(record), *lines[1:]]).encode() + b"\n"
    return edit


def _loop(ctx: Ctx) -> None:
    os.symlink(ctx.tmp / "loop", ctx.tmp / "loop")


def _file(ctx: Ctx) -> None:
    (ctx.tmp / "f.txt").write_text("a file\n")


CASES = [
    # trace
    Case("trace-nothing-to-draw", ["trace", TRACE], "nothing to draw", _trace),
    Case("trace-missing", ["trace", "{tmp}/none.jsonl", "--html", "{tmp}/o.html"], "trace file does not exist"),
    Case("trace-folder", ["trace", "{tmp}", "--html", "{tmp}/o.html"], "is a folder, not a file"),
    Case("trace-loop", ["trace", "{tmp}/loop", "--html", "{tmp}/o.html"], "symbolic link loop", _loop),
    Case("trace-bad-bytes", ["trace", TRACE, "--html", "{tmp}/o.html"], "not UTF-8 text", write("run.jsonl", BAD_BYTES)),
    Case("trace-empty", ["trace", TRACE, "--html", "{tmp}/o.html"], "run.jsonl", write("run.jsonl", "")),
    Case("trace-not-json", ["trace", TRACE, "--html", "{tmp}/o.html"], "not JSON", _edit_trace(lambda d: b"{x\n" + d)),
    Case("trace-schema", ["trace", TRACE, "--html", "{tmp}/o.html"], "schema is 'other/1'",
         _edit_trace(_first_line(lambda r: r.update(schema="other/1")))),
    Case("trace-states-type", ["trace", TRACE, "--html", "{tmp}/o.html"], "states",
         _edit_trace(_first_line(lambda r: r.update(states="mask")))),
    Case("trace-torn", ["trace", TRACE, "--html", "{tmp}/o.html"], "run.jsonl",
         _edit_trace(lambda d: d[: len(d) // 2])),
    Case("trace-html-folder", ["trace", TRACE, "--html", "{tmp}"], "--html: ", _trace),
    Case("trace-html-proc", ["trace", TRACE, "--html", "/proc/evotok/o.html"], "--html: cannot write into", _trace),
    Case("trace-png-proc", ["trace", TRACE, "--png", "/proc/evotok/o.png"], "--png: cannot write into", _trace),
    Case("trace-html-under-file", ["trace", TRACE, "--html", "{tmp}/f.txt/o.html"], "is a file, so",
         lambda ctx: (_trace(ctx), _file(ctx))),
    Case("trace-prompt-index", ["trace", TRACE, "--html", "{tmp}/o.html", "--prompt-index", "5"], "5", _trace),
    Case("trace-model-missing", ["trace", TRACE, "--html", "{tmp}/o.html", "-m", "{tmp}/nope"], "nope", _trace),
    # data
    Case("data-unknown-task", ["data", "sudoku5", "--out", "{tmp}/d.jsonl"], "unknown synthetic task 'sudoku5'"),
    Case("data-no-task", ["data", "--out", "{tmp}/d.jsonl"], "Missing argument"),
    Case("data-no-out", ["data", "sudoku4"], "Missing option '--out'"),
    Case("data-split", ["data", "sudoku4", "--split", "dev", "--out", "{tmp}/d.jsonl"], "unknown split 'dev'"),
    Case("data-n-zero", ["data", "sudoku4", "--n", "0", "--out", "{tmp}/d.jsonl"], "--n must be >= 1"),
    Case("data-n-text", ["data", "sudoku4", "--n", "many", "--out", "{tmp}/d.jsonl"], "--n"),
    Case("data-out-folder", ["data", "sudoku4", "--out", "{tmp}"], "is a folder, not a file"),
    Case("data-out-proc", ["data", "sudoku4", "--out", "/proc/evotok/d.jsonl"], "--out: cannot write into"),
    Case("data-out-under-file", ["data", "sudoku4", "--out", "{tmp}/f.txt/d.jsonl"], "is a file, so", _file),
    Case("data-seed-text", ["data", "sudoku4", "--seed", "x", "--out", "{tmp}/d.jsonl"], "--seed"),
    # decoders
    Case("decoders-unknown-name", ["decoders", "nosuch"], "unknown decoder 'nosuch'"),
    Case("decoders-details-unknown", ["decoders", "--details", "evotokn"], "--details: unknown decoder 'evotokn'"),
    Case("decoders-two-names", ["decoders", "evotoken", "--details", "d2f"], "two decoders asked for"),
    Case("decoders-extra-argument", ["decoders", "evotoken", "d2f"], "unexpected extra argument"),
    Case("decoders-unknown-flag", ["decoders", "--nope"], "No such option"),
]
