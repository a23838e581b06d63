"""`evotok bench` (run, score, report): bad tasks, flags, data, outputs and stored files."""

from __future__ import annotations

import json
import os

from tests.hostile import BAD_BYTES, Case, Ctx, both, write

SMALL = ["-m", "{model}", "--limit", "1", "--gen-length", "8", "--block-length", "4", "--steps", "4"]
RUN = ["bench", "sudoku4", *SMALL, "--out", "{tmp}/runs"]


def _run(extra: list[str], expect: str, id: str, setup=None, env=None) -> Case:
    return Case(f"bench-{id}", RUN + extra, expect, setup, env or {})


def _file(rel: str):
    return write(rel, "a file\n")


def _loop(rel: str):
    def setup(ctx: Ctx) -> None:
        os.symlink(ctx.tmp / rel, ctx.tmp / rel)
    return setup


def _finished_run(ctx: Ctx) -> None:
    """A real one-item run in {tmp}/runs (what score, report and resume cases start from)."""
    args = [a.format(**ctx.vars()) for a in RUN]
    assert ctx.cli(*args).returncode == 0


def _samples(ctx: Ctx) -> list:
    return sorted((ctx.tmp / "runs").glob("samples_*.jsonl"))


def _edit_samples(fn):
    def setup(ctx: Ctx) -> None:
        _finished_run(ctx)
        path = _samples(ctx)[0]
        path.write_bytes(fn(path.read_bytes()))
    return setup


def _edit_results(fn):
    def setup(ctx: Ctx) -> None:
        _finished_run(ctx)
        path = ctx.tmp / "runs" / "results.json"
        path.write_bytes(fn(path.read_bytes()))
    return setup


def _no_doc_id(data: bytes) -> bytes:
    record = json.loads(data.decode().splitlines()[0])
    record.pop("doc_id")
    return (json.dumps(record) + "\n").encode()


OFFICIAL = "{tmp}/gsm8k_256_128_0_generations.json"

CASES = [
    # tasks and flags
    Case("bench-no-task", ["bench", "-m", "{model}", "--limit", "1"], "no task given"),
    Case("bench-unknown-task", ["bench", "sudoku5", *SMALL], "did you mean sudoku4"),
    _run(["--limit", "0"], "--limit: limit must be a whole number >= 1", "limit-zero"),
    _run(["--limit", "-3"], "limit must be a whole number >= 1", "limit-negative"),
    _run(["--limit", "many"], "--limit", "limit-text"),
    _run(["--batch-size", "0"], "batch size must be >= 1", "batch-zero"),
    _run(["--steps", "0"], "steps must be positive", "steps-zero"),
    _run(["--block-length", "0"], "block length must be positive", "block-zero"),
    _run(["--gen-length", "10"], "not divisible by block length", "gen-not-divisible"),
    _run(["--temperature", "-1"], "temperature must be a finite number >= 0", "temperature-negative"),
    _run(["--temperature", "nan"], "got nan", "temperature-nan"),
    _run(["--decoder", "nosuch"], "unknown decoder 'nosuch'", "decoder-unknown"),
    _run(["--opt", "nonsense=1"], "has no option 'nonsense'", "opt-unknown"),
    _run(["--opt", "gen_length=8"], "is a generation setting", "opt-generation-setting"),
    _run(["--opt", "threshold=nan"], "not a finite number", "opt-nan"),
    _run(["--sweep", "alpha=0.5,0.7"], "no selected decoder has an option 'alpha'", "sweep-unknown"),
    _run(["--sweep", "steps=a,b"], "--sweep", "sweep-text"),
    _run(["--sweep", "alpha"], "--sweep", "sweep-no-values"),
    _run(["-d", "d2f", "--opt", "block_size=3"], "not a multiple of block_size 3", "d2f-budget"),
    _run(["--sweep", "revise=true,maybe", "-d", "evotoken"], "not a valid bool", "sweep-bool"),
    _run(["--opt", "rng=reference", "--opt", "cache=prefix"], "rng=reference reproduces the release",
         "rng-reference-cache"),
    _run(["--device", "cuda"], "CUDA was asked for but is not available", "device-cuda"),
    _run(["--lora-mode", "bogus"], "--lora-mode: unknown LoRA mode 'bogus'", "lora-mode-unknown"),
    _run(["--padded-attention", "Masked"], "--padded-attention: unknown padded attention mode 'Masked'",
         "padded-attention-unknown"),
    _run(["--compile"], "--compile: torch.compile needs a C++ compiler", "compile-no-compiler",
         env={"CXX": "/nonexistent/c++"}),
    _run(["--compile", "--device", "cuda"], "CUDA was asked for but is not available", "compile-and-cuda"),
    _run(["--dtype", "float8"], "unknown dtype", "dtype-unknown"),
    Case("bench-model-missing", ["bench", "sudoku4", "-m", "{tmp}/nope", "--out", "{tmp}/runs"], "does not exist"),
    _run(["--adapter", "{tmp}/nope"], "nope", "adapter-missing"),
    # output folder: checked before any data or model is loaded
    Case("bench-out-file", ["bench", "sudoku4", *SMALL, "--out", "{tmp}/f.txt"], "is a file, not a folder",
         _file("f.txt")),
    Case("bench-out-proc", ["bench", "sudoku4", *SMALL, "--out", "/proc/evotok/runs"], "--out: cannot write into"),
    Case("bench-out-under-file", ["bench", "sudoku4", *SMALL, "--out", "{tmp}/f.txt/runs"], "is a file, so",
         _file("f.txt")),
    Case("bench-out-loop", ["bench", "sudoku4", *SMALL, "--out", "{tmp}/loop"], "symbolic link loop", _loop("loop")),
    # data
    Case("bench-data-missing", ["bench", "gsm8k", *SMALL, "--data", "{tmp}/none.jsonl"], "none.jsonl"),
    Case("bench-data-bad-bytes", ["bench", "gsm8k", *SMALL, "--data", "{tmp}/d.jsonl"], "d.jsonl",
         write("d.jsonl", BAD_BYTES)),
    Case("bench-data-suffix", ["bench", "gsm8k", *SMALL, "--data", "{tmp}/d.txt"], "unknown data format",
         write("d.txt", "{}\n")),
    Case("bench-data-unknown-task", ["bench", "gsm8k", *SMALL, "--data", "svamp={tmp}/d.jsonl"], "svamp",
         write("d.jsonl", '{"question": "q", "answer": "#### 1"}\n')),
    Case("bench-hub-unreachable", ["bench", "gsm8k", *SMALL], "the hub is not reachable",
         env={"HF_ENDPOINT": "https://hub.invalid", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}),
    # config
    Case("bench-config-bad-yaml", RUN + ["--config", "{tmp}/c.yaml"], "invalid YAML", write("c.yaml", "a: [\n")),
    Case("bench-config-tasks-mapping", ["bench", *SMALL, "--config", "{tmp}/c.yaml"], "tasks: expected a name",
         write("c.yaml", "tasks: {a: 1}\n")),
    Case("bench-config-limit-text", ["bench", "sudoku4", "--config", "{tmp}/c.yaml"], "limit: expected int",
         write("c.yaml", "limit: lots\n")),
    Case("bench-config-unknown", RUN + ["--config", "{tmp}/c.yaml"], "unknown option 'limt'",
         write("c.yaml", "limt: 3\n")),
    Case("bench-config-bad-bytes", RUN + ["--config", "{tmp}/c.yaml"], "not UTF-8", write("c.yaml", BAD_BYTES)),
    # resume into a folder that holds another setup's samples
    _run(["--temperature", "0.5"], "holds samples of another setup (differs in temperature)", "resume-other-setup",
         _finished_run),
    _run([], "corrupt line in the samples file", "resume-corrupt-samples",
         _edit_samples(lambda d: b"{oops\n" + d)),

    # bench score
    Case("bench-score-missing", ["bench", "score", "{tmp}/none.jsonl"], "generations file does not exist"),
    Case("bench-score-loop", ["bench", "score", "{tmp}/loop"], "symbolic link loop", _loop("loop")),
    Case("bench-score-empty-folder", ["bench", "score", "{tmp}"], "no *_generations.json or samples_*.jsonl"),
    Case("bench-score-bad-bytes", ["bench", "score", "{tmp}/runs"], "not UTF-8 text",
         _edit_samples(lambda d: BAD_BYTES + d)),
    Case("bench-score-corrupt-line", ["bench", "score", "{tmp}/runs"], "corrupt line in the samples file",
         _edit_samples(lambda d: d + b"{oops\n" + d)),
    Case("bench-score-no-doc-id", ["bench", "score", "{tmp}/runs"], "not a sample line (no doc_id)",
         _edit_samples(_no_doc_id)),
    Case("bench-score-unknown-task", ["bench", "score", "{tmp}/runs", "--task", "nosuch"], "nosuch", _finished_run),
    Case("bench-score-official-not-json", ["bench", "score", OFFICIAL], "generations file is not JSON",
         write("gsm8k_256_128_0_generations.json", "{oops")),
    Case("bench-score-official-bad-bytes", ["bench", "score", OFFICIAL], "not UTF-8 text",
         write("gsm8k_256_128_0_generations.json", BAD_BYTES)),
    Case("bench-score-official-shape", ["bench", "score", OFFICIAL], 'no "generations" list',
         write("gsm8k_256_128_0_generations.json", '{"results": []}')),
    Case("bench-score-official-item", ["bench", "score", OFFICIAL], "generation 0 is not an object",
         write("gsm8k_256_128_0_generations.json", '{"generations": [3]}')),
    Case("bench-score-official-task", ["bench", "score", "{tmp}/x_0_generations.json"], "cannot tell the task",
         write("x_0_generations.json", '{"generations": []}')),

    # bench report
    Case("bench-report-missing", ["bench", "report", "{tmp}/none"], "results file does not exist"),
    Case("bench-report-no-results", ["bench", "report", "{tmp}"], "no results.json in the folder"),
    Case("bench-report-not-json", ["bench", "report", "{tmp}/runs"], "results file is not JSON",
         _edit_results(lambda d: d[: len(d) // 2])),
    Case("bench-report-bad-bytes", ["bench", "report", "{tmp}/runs"], "not UTF-8 text",
         _edit_results(lambda d: BAD_BYTES + d)),
    Case("bench-report-schema", ["bench", "report", "{tmp}/r.json"], "not a results file",
         write("r.json", '{"schema": "other/1"}')),
    Case("bench-report-out-proc", ["bench", "report", "{tmp}/runs", "--out", "/proc/evotok/report"],
         "--out: cannot write into", _finished_run),
    Case("bench-report-out-folder", ["bench", "report", "{tmp}/runs", "--out", "{tmp}/rep"],
         "rep.md is a folder, not a file", both(_finished_run, lambda ctx: (ctx.tmp / "rep.md").mkdir())),
    Case("bench-report-x-unknown", ["bench", "report", "{tmp}/runs", "--x", "nosuch"], "nosuch", _finished_run),
]
