"""`evotok bench`: run benchmarks (the default form), `score` existing generations, `report` results.

Typer groups cannot have a default command, so `BenchGroup` routes any first argument that is not a
subcommand to `run`: `evotok bench gsm8k ...` is `evotok bench run gsm8k ...`. Only typer is imported at
module level; torch, transformers and datasets load inside the commands.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from evotok_cli.base.console import stderr
from evotok_cli.base.errors import ConfigError, EvotokError
from evotok_cli.base.options import with_options
from evotok_cli.bench.config import BenchOptions

SUBCOMMANDS = ("run", "score", "report")


class BenchGroup(TyperGroup):
    """A group whose first argument, when it is not a subcommand (nor --help), starts the `run` command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing:  # help on stdout, exit 0 (not a usage error)
            typer.echo(ctx.get_help())
            ctx.exit(0)
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        if args and args[0] == "run" and "--compile" in args:
            from evotok_cli.bench.tasks.registry import available

            args = ["run", *compile_before_task(args[1:], set(available()))]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: Any, formatter: Any) -> None:
        formatter.write_usage(ctx.command_path, "TASK [TASK ...] [OPTIONS] | score FILE ... | report DIR ...")

    def format_options(self, ctx: Any, formatter: Any) -> None:
        """The group's own options, then every option of the run form (`evotok bench TASK ...`), which is
        what `evotok bench --help` is asked for; score's and report's are under their own --help."""
        super().format_options(ctx, formatter)
        run_command = self.commands.get("run")
        if run_command is None:
            return
        sub = type(ctx)(run_command, info_name="run", parent=ctx)
        rows = [r for r in (p.get_help_record(sub) for p in run_command.get_params(sub)) if r]
        with formatter.section("Options of `evotok bench TASK ...` (= `bench run`)"):
            formatter.write_dl(rows)


def compile_before_task(args: list[str], tasks: set[str]) -> list[str]:
    """`bench run`'s arguments with `--compile TASK` read as a bare --compile before the task.

    Why: `--compile` takes an optional level, and the run form takes tasks as its positional arguments, so
    in `evotok bench --compile sudoku4` the word after the flag could be either. The grammar: a level word
    (on | max | off, or what EVOTOK_COMPILE accepts) is the flag's value, a task name is a task (the flag
    bare, i.e. on); a word that is both or neither cannot be read, and is one ConfigError saying how to
    write it. `--compile=VALUE` and a bare flag before an option or at the end (runtime/compile.py:
    `bare_flags`) are left as they are; nothing after `--` is touched."""
    from evotok_cli.runtime.compile import compile_level

    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        following = args[i + 1] if i + 1 < len(args) else None
        if arg != "--compile" or following is None or following.startswith("-"):
            out.append(arg)
            continue
        try:
            compile_level(following)
            level = True
        except EvotokError:
            level = False
        if level and following in tasks:
            raise ConfigError(f"{following!r} after --compile is both a level and a task", where="--compile",
                              fix=f"write --compile={following} for the level, or --compile=on {following} "
                                  "for the task")
        if not level and following not in tasks:
            close = difflib.get_close_matches(following, sorted(tasks), n=1, cutoff=0.6)
            where = "tasks go before --compile, or after --compile=on; a level is --compile=on|max|off"
            raise ConfigError(f"expected bool or a level on | max | off, got {following!r}, which is no task "
                              "either", where="--compile",
                              fix=(f"did you mean the task {close[0]}? " if close else "") + where)
        out.append(arg if level else "--compile=on")
    return out


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


@bench_app.command("run")
@with_options(BenchOptions)  # --decoder ... --compile, from BenchOptions' fields; they arrive in **options
def run(
    tasks: list[str] = typer.Argument(
        None, metavar="TASK", show_default=False,
        help="tasks to run: gsm8k math500 svamp countdown sudoku4 arith-small arith countdown3 ...",
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", envvar="EVOTOK_CONFIG", show_default=False,
        help="YAML with defaults for these options (tasks:, decoders:, sweep:, data:, ...) and a `decoder:` options "
        "section",
    ),
    as_json: bool | None = typer.Option(
        None, "--json", help="print the results document (schema evotok.bench/1) on stdout", show_default=False
    ),
    **options: Any,
) -> None:
    """Run TASKs with each --decoder (x each --sweep value): per-sample logs, results.json, a table on stderr.

    Prompts, parsers and scoring follow the EvoToken / d1 protocol for gsm8k, math500, svamp and countdown
    (zero-shot, system prompt in the user message, chat template, <reasoning> prefill). A run killed at
    any moment resumes when started again with the same --out. Under torchrun each process takes every
    world-th item and rank 0 merges the results.

    \b
    Example: evotok bench arith sudoku4 -d hard-mask -d evotoken --sweep alpha=0.5,0.7 --limit 50
    """
    from evotok_cli.bench import command

    command.run({"tasks": tasks or None, **options}, config=config, as_json=as_json)


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
    err = stderr()
    for line in document["notes"]:
        err.print(f"[yellow]note:[/yellow] {line}")
    if as_json:
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        from evotok_cli.base.console import console

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
        "auto", "--x", help="x axis: auto (the swept option if any, else the one training setting the runs' "
        "adapters differ in, else NFE) | nfe | a swept option | an adapter training setting (e.g. trajectory_steps)"
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
