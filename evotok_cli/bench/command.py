"""What `evotok bench TASK ...` does with its flags: merge them over the --config file and `BenchOptions`'
declared defaults (flag > EVOTOK_* variable > YAML > default) into a `BenchRequest`, run it with a progress
bar, and report the table (and with --json the results document)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from evotok_cli.base.console import stderr
from evotok_cli.base.options import merged, yaml_defaults
from evotok_cli.bench.config import COMMAND_ONLY, BenchOptions


def bench_request(flags: dict[str, Any], config: Path | None) -> tuple[Any, Any]:
    """The run's BenchRequest (checked by `run_bench`) and the merged settings."""
    from evotok_cli.bench.plan import GEN_KEYS, BenchRequest
    from evotok_cli.jobs.config import Settings, parse_opts

    defaults, kinds = yaml_defaults(BenchOptions)
    settings = Settings({**defaults, **COMMAND_ONLY}, config, command="bench", types=kinds)
    values = merged(BenchOptions, settings, flags)
    request = BenchRequest(
        tasks=values["tasks"], decoders=values["decoders"], model=values["model"], adapter=values["adapter"],
        data=values["data"], limit=values["limit"], overrides={k: values[k] for k in GEN_KEYS},
        seed=values["seed"], batch_size=values["batch_size"],
        options={**settings.decoder_options, **parse_opts(flags["opt"])}, sweeps=values["sweep"],
        out=Path(values["out"]).expanduser(), device=values["device"], dtype=values["dtype"],
        compile=values["compile"], lora_mode=values["lora_mode"], padded_attention=values["padded_attention"],
        quantize=values["quantize"], threads=values["threads"], endpoint=values["endpoint"],
        api_key=flags.get("api_key"), concurrency=values["concurrency"])
    return request, settings


def run(flags: dict[str, Any], *, config: Path | None, as_json: bool | None) -> None:
    """Run the benchmark; rank 0 prints the progress, the table on stderr and with --json the document on
    stdout (under torchrun the other ranks stay quiet)."""
    from evotok_cli.bench.runner import run_bench

    request, settings = bench_request(flags, config)
    if request.endpoint:
        from evotok_cli.bench.remote import run_remote as run_bench  # the generations asked over HTTP
    err = stderr()
    request.on_note = lambda line: err.print(f"[yellow]note:[/yellow] {line}")
    with BenchProgress(err, enabled=_rank() == 0) as progress:
        request.on_batch, request.on_pass = progress.on_batch, progress.on_pass
        document = run_bench(request)
    if document is None:  # a non-zero rank: rank 0 reports
        return
    from evotok_cli.bench.table import render

    err.print(render(document))
    err.print(f"[dim]wrote {request.out / 'results.json'}[/dim]")
    if settings.get("json", as_json):
        import typer

        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


def _rank() -> int:
    """This process's rank under torchrun / accelerate (RANK), 0 alone."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA ?"
    seconds = int(seconds + 0.5)
    return f"ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"ETA {seconds // 60}:{seconds % 60:02d}"


class BenchProgress:
    """Each run's items done, and inside a batch its forward passes, rate and ETA: a transient bar per run
    on a terminal; in a log (stderr piped), a plain line per tenth of each run's items and at least every
    30 s while a batch decodes, so a long batch never looks like a hang."""

    def __init__(self, console: Any, enabled: bool = True, clock: Any = time.monotonic):
        self.console, self.enabled, self.clock = console, enabled, clock
        self.bar, self.tasks, self.plain = None, {}, {}
        self.started: dict[str, tuple[float, float]] = {}  # run -> (clock, share done) when first seen
        self.batch_started: dict[tuple[str, int], float] = {}  # (run, items before the batch) -> clock

    def __enter__(self) -> BenchProgress:
        if self.enabled and self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.fields[items]}"), TextColumn("{task.fields[detail]}"),
                                TimeElapsedColumn(), console=self.console, transient=True)
            self.bar.start()
        return self

    def _label(self, run: Any) -> str:
        return f"{run.task.name} {run.decoder_name} {run.label}".strip()

    def _show(self, run: Any, items: int, done: float, total: int, detail: str) -> None:
        """`items` finished, `done` the share of the run's work done counted in items (a batch's passes
        count as fractions of its items), for the bar and the ETA."""
        if not self.enabled:
            return
        self.started.setdefault(run.name, (self.clock(), done))
        t0, done0 = self.started[run.name]
        elapsed, gained = self.clock() - t0, done - done0
        left = elapsed / gained * (total - done) if gained > 0 else None
        detail = f"{detail}, {eta(left)}" if detail else eta(left)
        if self.bar is not None:
            if run.name not in self.tasks:
                self.tasks[run.name] = self.bar.add_task(self._label(run), total=total, items="", detail="")
            self.bar.update(self.tasks[run.name], completed=done, items=f"{items}/{total} items", detail=detail)
        else:
            from evotok_cli.base.console import PlainProgress

            if run.name not in self.plain:
                self.plain[run.name] = PlainProgress(self.console, self._label(run), total, clock=self.clock)
            self.plain[run.name].update(items, f"items, {detail}")

    def on_batch(self, run: Any, done: int, total: int) -> None:
        self._show(run, done, done, total, "")

    def on_pass(self, run: Any, passes: int, rows: int, before: int, total: int) -> None:
        """A forward pass of a batch of `rows` items after `before` items: the run's share done is counted
        in passes against the run's step budget (rows finish together at the budget)."""
        budget = max(1, int(run.settings.get("steps") or 1))
        t0 = self.batch_started.setdefault((run.name, before), self.clock())
        rate = passes / max(self.clock() - t0, 1e-9)
        self._show(run, before, before + rows * min(passes / budget, 1.0), total,
                   f"batch of {rows} at pass {passes}/{budget}, {rate:.1f} passes/s")

    def __exit__(self, *exc: Any) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False
