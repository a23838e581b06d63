"""What `evotok bench TASK ...` does with its flags: merge them over the --config file and `BenchOptions`'
declared defaults (flag > EVOTOK_* variable > YAML > default) into a `BenchRequest`, run it with a progress
bar, and report the table (and with --json the results document)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evotok_cli.bench.config import COMMAND_ONLY, BenchOptions
from evotok_cli.console import stderr
from evotok_cli.options import merged, yaml_defaults


def bench_request(flags: dict[str, Any], config: Path | None) -> tuple[Any, Any]:
    """The run's BenchRequest (checked by `run_bench`) and the merged settings."""
    from evotok_cli.bench.runner import GEN_KEYS, BenchRequest
    from evotok_cli.config import Settings, parse_opts

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
        quantize=values["quantize"], threads=values["threads"])
    return request, settings


def run(flags: dict[str, Any], *, config: Path | None, as_json: bool | None) -> None:
    """Run the benchmark; rank 0 prints the table on stderr and with --json the document on stdout."""
    from evotok_cli.bench.runner import run_bench

    request, settings = bench_request(flags, config)
    err = stderr()
    request.on_note = lambda line: err.print(f"[yellow]note:[/yellow] {line}")
    with BenchProgress(err) as on_batch:
        request.on_batch = on_batch
        document = run_bench(request)
    if document is None:  # a non-zero rank: rank 0 reports
        return
    from evotok_cli.bench.table import render

    err.print(render(document))
    err.print(f"[dim]wrote {request.out / 'results.json'}[/dim]")
    if settings.get("json", as_json):
        import typer

        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


class BenchProgress:
    """A transient per-run progress bar on a terminal; in a log (stderr piped), a plain line per tenth of
    each run's items and at least every 30 s."""

    def __init__(self, console: Any):
        self.console, self.bar, self.tasks = console, None, {}

    def __enter__(self) -> Any:
        if not self.console.is_terminal:
            from evotok_cli.console import PlainProgress

            def plain(run: Any, done: int, total: int) -> None:
                if run.name not in self.tasks:
                    self.tasks[run.name] = PlainProgress(self.console, f"{run.task.name} {run.decoder_name} "
                                                         f"{run.label}".strip(), total)
                self.tasks[run.name].update(done, "items")

            return plain
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=self.console, transient=True)
        self.bar.start()

        def update(run: Any, done: int, total: int) -> None:
            if run.name not in self.tasks:
                self.tasks[run.name] = self.bar.add_task(f"{run.task.name} {run.decoder_name} {run.label}".strip(),
                                                         total=total)
            self.bar.update(self.tasks[run.name], completed=done)

        return update

    def __exit__(self, *exc: Any) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False
