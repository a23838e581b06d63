"""`evotok bench`: run benchmarks (the default form), `score` existing generations, `report` results.

Typer groups cannot have a default command, so `BenchGroup` routes any first argument that is not a
subcommand to `run`: `evotok bench gsm8k ...` is `evotok bench run gsm8k ...`. Only typer is imported at
module level; torch, transformers and datasets load inside the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from evotok_cli.errors import ConfigError

BENCH_DEFAULTS: dict[str, Any] = {
    "tasks": None,
    "decoders": None,
    "model": None,
    "adapter": None,
    "data": None,
    "limit": None,
    "gen_length": None,
    "block_length": None,
    "steps": None,
    "temperature": None,
    "seed": 0,
    "batch_size": 1,
    "sweep": None,
    "out": "bench-results",
    "device": "auto",
    "dtype": "auto",
    "json": False,
}
BENCH_TYPES = {"model": str, "adapter": str, "limit": int, "gen_length": int, "block_length": int, "steps": int,
               "temperature": float}
SUBCOMMANDS = ("run", "score", "report")


class BenchGroup(TyperGroup):
    """A group whose first argument, when it is not a subcommand (nor --help), starts the `run` command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing:  # help on stdout, exit 0 (not a usage error)
            typer.echo(ctx.get_help())
            ctx.exit(0)
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: Any, formatter: Any) -> None:
        formatter.write_usage(ctx.command_path, "TASK [TASK ...] [OPTIONS] | score FILE ... | report DIR ...")


bench_app = typer.Typer(
    cls=BenchGroup,
    add_completion=False,
    rich_markup_mode=None,
    help="""Benchmark decoders on the paper's tasks (EvoToken / d1 protocol) or the bundled model's tasks.

    \b
    Three forms:
      evotok bench TASK [TASK ...] [OPTIONS]   run tasks with one or more decoders (same as `bench run`)
      evotok bench score FILE|DIR ...          score existing generations without a model
      evotok bench report DIR ...              Markdown table + PNG plot from results.json files

    \b
    Tasks: gsm8k, math500, svamp, countdown (the paper's), sudoku4, arith-small, arith, countdown3 (bundled model),
    and any task a package registers under the `evotok.tasks` entry points.

    \b
    Examples:
      evotok bench sudoku4 arith --decoder hard-mask --decoder evotoken
      evotok bench gsm8k --data ./data/gsm8k/test.jsonl -m ./LLaDA-8B-Instruct --adapter ./EvoToken-LoRA \\
          -d evotoken --sweep alpha=0.5,0.6,0.7,0.8,0.9 --gen-length 256 --steps 128 --out runs/gsm8k
      torchrun --nproc_per_node 4 -m evotok_cli bench gsm8k ... --out runs/gsm8k
      evotok bench score outputs/eval_results_kSoft_3_alphaSoftMask_0.7
      evotok bench report runs/gsm8k
    """,
)


def _stderr() -> Any:
    from evotok_cli.console import stderr

    return stderr()


def _as_list(value: Any, key: str, where: str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise ConfigError(
        f"{key}: expected a name or a list of names, got {value!r}", where=where, fix=f"write e.g. `{key}: [a, b]`"
    )


def _yaml_sweep(value: Any, where: str | None) -> list[str]:
    """`sweep: {alpha: [0.5, 0.7]}` or `sweep: ["alpha=0.5,0.7"]`."""
    if isinstance(value, dict):
        out = []
        for key, values in value.items():
            items = values if isinstance(values, list) else [values]
            out.append(f"{key}=" + ",".join(str(v) for v in items))
        return out
    return _as_list(value, "sweep", where)


def _yaml_data(value: Any, where: str | None) -> list[str]:
    """`data: PATH`, `data: [PATH, TASK=PATH]` or `data: {TASK: PATH}`."""
    if isinstance(value, dict):
        return [f"{task}={path}" for task, path in value.items()]
    return _as_list(value, "data", where)


@bench_app.command("run")
def run(
    tasks: list[str] = typer.Argument(
        None, metavar="TASK", show_default=False,
        help="tasks to run: gsm8k math500 svamp countdown sudoku4 arith-small arith countdown3 ...",
    ),
    decoder: list[str] = typer.Option(
        None, "--decoder", "-d", help="decoder to compare (repeatable) [default: hard-mask]", show_default=False
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        envvar="EVOTOK_MODEL",
        help="checkpoint folder; default: the bundled model",
        show_default=False,
    ),
    adapter: str | None = typer.Option(
        None, "--adapter", envvar="EVOTOK_ADAPTER", help="PEFT LoRA adapter folder, merged at load", show_default=False
    ),
    data: list[str] = typer.Option(
        None,
        "--data",
        help="data file or folder (PATH for all tasks, or TASK=PATH; repeatable); "
        "default: the task's Hugging Face dataset",
        show_default=False,
    ),
    limit: int | None = typer.Option(
        None,
        "--limit",
        help="first N items of each task (bundled tasks: N test problems) [default: all; 200 for bundled tasks]",
        show_default=False,
    ),
    gen_length: int | None = typer.Option(
        None,
        "--gen-length",
        envvar="EVOTOK_GEN_LENGTH",
        help="tokens to generate [default: per task: 256 paper tasks, 48 bundled tasks]",
        show_default=False,
    ),
    block_length: int | None = typer.Option(
        None,
        "--block-length",
        envvar="EVOTOK_BLOCK_LENGTH",
        help="block size [default: per task: 32 paper tasks, 16 bundled tasks]",
        show_default=False,
    ),
    steps: int | None = typer.Option(
        None,
        "--steps",
        envvar="EVOTOK_STEPS",
        help="forward-pass budget [default: per task: 128 paper tasks, 48 bundled tasks]",
        show_default=False,
    ),
    temperature: float | None = typer.Option(
        None,
        "--temperature",
        envvar="EVOTOK_TEMPERATURE",
        help="sampling temperature [default: per task: 0.5 paper tasks (EvoToken's script), 0 bundled tasks]",
        show_default=False,
    ),
    seed: int | None = typer.Option(
        None,
        "--seed",
        envvar="EVOTOK_SEED",
        help="base seed; each item samples from seed + its doc_id, whatever the batch size [default: 0]",
        show_default=False,
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        envvar="EVOTOK_BATCH_SIZE",
        help="items decoded together [default: 1, the protocol's]",
        show_default=False,
    ),
    opt: list[str] = typer.Option(
        None,
        "--opt",
        "-o",
        help="decoder option key=value for every decoder that has it (repeatable)",
        show_default=False,
    ),
    sweep: list[str] = typer.Option(
        None,
        "--sweep",
        help="key=v1,v2,...: one run per value, for each decoder that has the option (or for every decoder: "
        "gen_length, block_length, steps, temperature); repeat for a grid",
        show_default=False,
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        envvar="EVOTOK_CONFIG",
        help="YAML with defaults for these options (tasks:, decoders:, sweep:, data:, ...) "
        "and a `decoder:` options section",
        show_default=False,
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="folder for sample logs and results.json; rerunning with it resumes [default: bench-results]",
        show_default=False,
    ),
    device: str | None = typer.Option(
        None, "--device", envvar="EVOTOK_DEVICE", help="auto | cpu | cuda | cuda:N [default: auto]", show_default=False
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", envvar="EVOTOK_DTYPE", help="auto | float32 | bfloat16 [default: auto]", show_default=False
    ),
    as_json: bool | None = typer.Option(
        None, "--json", help="print the results document (schema evotok.bench/1) on stdout", show_default=False
    ),
) -> None:
    """Run TASKs with each --decoder (x each --sweep value): per-sample logs, results.json, a table on stderr.

    Prompts, parsers and scoring follow the EvoToken / d1 protocol for gsm8k, math500, svamp and countdown
    (zero-shot, system prompt in the user message, chat template, <reasoning> prefill). A run killed at
    any moment resumes when started again with the same --out. Under torchrun each process takes every
    world-th item and rank 0 merges the results.

    \b
    Example: evotok bench arith sudoku4 -d hard-mask -d evotoken --sweep alpha=0.5,0.7 --limit 50
    """
    from evotok_cli.config import Settings, parse_opts

    s = Settings(BENCH_DEFAULTS, config, command="bench", types=BENCH_TYPES)
    where = s.path
    task_names = list(tasks or []) or _as_list(s.get("tasks", None), "tasks", where)
    decoders = list(decoder or []) or _as_list(s.get("decoders", None), "decoders", where) or None
    options = dict(s.decoder_options)
    options.update(parse_opts(opt))
    from evotok_cli.bench.runner import DEFAULT_DECODER, BenchRequest, run_bench

    request = BenchRequest(
        tasks=task_names,
        decoders=decoders or [DEFAULT_DECODER],
        model=s.get("model", model),
        adapter=s.get("adapter", adapter),
        data=list(data or []) or _yaml_data(s.get("data", None), where),
        limit=s.get("limit", limit),
        overrides={
            k: s.get(k, v)
            for k, v in (
                ("gen_length", gen_length),
                ("block_length", block_length),
                ("steps", steps),
                ("temperature", temperature),
            )
        },
        seed=s.get("seed", seed),
        batch_size=s.get("batch_size", batch_size),
        options=options,
        sweeps=list(sweep or []) or _yaml_sweep(s.get("sweep", None), where),
        out=Path(s.get("out", out)).expanduser(),
        device=s.get("device", device),
        dtype=s.get("dtype", dtype),
    )
    err = _stderr()
    request.on_note = lambda line: err.print(f"[yellow]note:[/yellow] {line}")
    with _Progress(err) as on_batch:
        request.on_batch = on_batch
        document = run_bench(request)
    if document is None:  # a non-zero rank: rank 0 reports
        return
    from evotok_cli.bench.table import render

    err.print(render(document))
    err.print(f"[dim]wrote {request.out / 'results.json'}[/dim]")
    if s.get("json", as_json):
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


class _Progress:
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

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.bar.start()

        def update(run: Any, done: int, total: int) -> None:
            key = run.name
            if key not in self.tasks:
                self.tasks[key] = self.bar.add_task(
                    f"{run.task.name} {run.decoder_name} {run.label}".strip(), total=total
                )
            self.bar.update(self.tasks[key], completed=done)

        return update

    def __exit__(self, *exc: Any) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False


@bench_app.command("score")
def score(
    paths: list[Path] = typer.Argument(
        ...,
        metavar="PATH",
        help="sample logs (samples_*.jsonl), official *_generations.json files, or folders of them",
        show_default=False,
    ),
    task: str | None = typer.Option(
        None,
        "--task",
        "-t",
        help="the task of every file (default: from each line, or from the file name, "
        "e.g. gsm8k_256_128_0_generations.json)",
        show_default=False,
    ),
    as_json: bool = typer.Option(
        False, "--json", help="print one JSON document (schema evotok.bench.score/1) on stdout"
    ),
) -> None:
    """Score existing generations with the protocol's parsers, without a model.

    Reads our sample logs and the JSON files written by the official EvoToken / d1 evaluation
    ({"generations": [{"question", "generations", "ground_truth"}, ...]}). Files of one setup (rank files
    of one run) are summed, as get_acc.py does; with several folders holding the same setup (one per
    alpha), the best folder is listed too, labelled as chosen on the test set.

    \b
    Example: evotok bench score outputs/eval_results_kSoft_3_alphaSoftMask_0.7/gsm8k_256_128_0_generations.json
    """
    from evotok_cli.bench.score import score_paths, table

    document = score_paths(paths, task)
    err = _stderr()
    for line in document["notes"]:
        err.print(f"[yellow]note:[/yellow] {line}")
    if as_json:
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        from evotok_cli.console import console

        console().print(table(document))


@bench_app.command("report")
def report(
    paths: list[Path] = typer.Argument(
        ..., metavar="DIR", help="bench output folders or results.json files", show_default=False
    ),
    out: Path | None = typer.Option(
        None, "--out", help="write PREFIX.md and PREFIX.png [default: FIRST_DIR/report]", show_default=False
    ),
    x: str = typer.Option(
        "auto", "--x", help="x axis: auto (the swept option if any, else NFE) | nfe | the name of a swept option"
    ),
) -> None:
    """Render one or more runs as a Markdown table (stdout and PREFIX.md) and a PNG plot of accuracy per
    decoder against the NFE budget or the swept option (PREFIX.png).

    \b
    Example: evotok bench report runs/steps32 runs/steps64 runs/steps128 --out runs/report
    """
    from evotok_cli.bench.report import write_report

    markdown, files = write_report(paths, out, x)
    typer.echo(markdown)
    for f in files:
        print(f"wrote {f}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Attach `evotok bench` to the main app."""
    app.add_typer(bench_app, name="bench")
