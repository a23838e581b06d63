"""The `evotok` command line. Each command is a thin function over the library; heavy imports (torch,
transformers) happen inside the commands so that `evotok --help` is instant."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from evotok_cli import __version__
from evotok_cli.base import stopping
from evotok_cli.base.console import stderr
from evotok_cli.base.errors import EvotokError
from evotok_cli.base.options import with_options
from evotok_cli.base.stopping import Terminated
from evotok_cli.cli.chat import ChatOptions
from evotok_cli.jobs.config import GenerateOptions
from evotok_cli.training.config import TrainConfig  # every finetune option, declared once (light: no torch)

app = typer.Typer(
    name="evotok",
    help="Run, fine-tune and benchmark masked diffusion language models with progressive token evolution.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"evotok {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    """evotok: masked diffusion LMs (LLaDA, Dream, D2F) with EvoToken progressive token evolution.

    Start with `evotok generate --prompt "..."` (uses the bundled model), then `evotok bench`.
    """


from evotok_cli.cli.inspect import register as _register_inspect  # noqa: E402 (info, download, decoders)

_register_inspect(app)


# -- generate ------------------------------------------------------------------------------------
@app.command()
@with_options(GenerateOptions)  # --prompt ... --show, from GenerateOptions' fields; they arrive in **options
def generate(
    config: Path | None = typer.Option(None, "--config", "-c", envvar="EVOTOK_CONFIG", help="YAML file with defaults for any option above, and a `decoder:` section", show_default=False),
    as_json: bool | None = typer.Option(None, "--json", help="print one JSON document (schema evotok.generate/1)", show_default=False),
    **options: Any,
) -> None:
    """Generate with a diffusion LM. The answer goes to stdout, a summary (NFE, tokens/s) to stderr.

    Precedence: flags > EVOTOK_* environment variables > --config YAML > the model folder's
    generation_config.json ("evotok": {gen_length, block_length, steps, prefill}) > built-in defaults.

    Examples:

      evotok generate --prompt $'Sudoku 4x4 (0 = blank):\\n0012|0230|4320|0103'

      evotok generate -p "..." --decoder evotoken --opt alpha=0.7 --opt k_soft=3 --steps 128 --gen-length 128

      evotok generate --model ./LLaDA-8B-Instruct --adapter ./EvoToken-LoRA -d evotoken -p "..." --json
    """
    from evotok_cli.cli import generate as generate_command

    generate_command.run(options, config=config, as_json=as_json)


# -- chat ----------------------------------------------------------------------------------------
@app.command()
@with_options(ChatOptions)  # --model ... --log, generate's options and the transcript; they arrive in **options
def chat(**options: Any) -> None:
    """Chat with a model in the terminal: each line you type is a turn, the whole conversation goes through
    the model's chat template, and the answer prints on stdout. Lines starting with / are commands:
    /decoder NAME, /opt KEY=VALUE (a decoder option or gen_length, block_length, steps, temperature, seed),
    /clear, /save FILE, /help, /quit. Reads lines from a pipe too (then a failed turn makes the exit code 2).

    Examples:

      evotok chat --show

      evotok chat -m ./LLaDA-8B-Instruct --adapter ./EvoToken-LoRA -d evotoken --log chat.jsonl

      evotok generate --prompts-file chat.jsonl   # replays a --log transcript, turn by turn
    """
    from evotok_cli.cli.chat import run

    code = run(options, out=typer.echo)
    if code:
        raise typer.Exit(code)


# -- init-model ----------------------------------------------------------------------------------
@app.command("init-model")
def init_model(
    out: Path = typer.Argument(..., help="folder to create"),
    layers: int = typer.Option(2, "--layers", help="transformer blocks"),
    hidden: int = typer.Option(64, "--hidden", help="d_model"),
    heads: int = typer.Option(4, "--heads", help="attention heads"),
    kv_heads: int | None = typer.Option(None, "--kv-heads", help="key/value heads (default: = heads)"),
    mlp: int | None = typer.Option(None, "--mlp", help="MLP hidden size (default: 8/3 * hidden, rounded)"),
    max_length: int = typer.Option(1024, "--max-length", help="max_sequence_length"),
    vocab_size: int = typer.Option(512, "--vocab-size", help="BPE vocabulary to train on the built-in corpus"),
    real_vocab: bool = typer.Option(False, "--real-vocab", help="LLaDA's 126464-token vocabulary and special ids, no tokenizer (for speed benchmarks; prompt with --prompt-ids)"),
    tokenizer_from: Path | None = typer.Option(None, "--tokenizer-from", help="copy the tokenizer (and special ids) of this checkpoint"),
    corpus: Path | None = typer.Option(None, "--corpus", help="train the BPE tokenizer on this .jsonl/.txt (default: a built-in sample)"),
    shard_mb: float | None = typer.Option(None, "--shard-mb", help="split the weights into shards of this size"),
    seed: int = typer.Option(0, "--seed"),
    std: float = typer.Option(0.02, "--std", help="init standard deviation"),
) -> None:
    """Write a randomly initialised LLaDA-layout checkpoint (config.json, safetensors, tokenizer): the
    starting point of pretraining from scratch, and a stand-in for tests and speed benchmarks.

    Example: evotok init-model /tmp/tiny-llada --layers 2 --hidden 64 && evotok generate -m /tmp/tiny-llada -p "hi"
    """
    from evotok_cli.runtime.init import create_model

    folder = create_model(out, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, mlp=mlp,
                          max_length=max_length, vocab_size=vocab_size, real_vocab=real_vocab,
                          tokenizer_from=tokenizer_from, corpus=corpus, shard_mb=shard_mb, seed=seed, std=std)
    stderr().print(f"wrote {folder}")


# -- finetune ------------------------------------------------------------------------------------
@app.command()
@with_options(TrainConfig)  # --model ... --pg-timeout, from TrainConfig's fields; they arrive in **options
def finetune(
    data: Path = typer.Argument(..., help='JSONL: {"prompt","response"}, {"messages":[...]} or {"question","answer"}'),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in --out"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with defaults for any option above", show_default=False),
    as_json: bool | None = typer.Option(None, "--json", help="print a JSON summary (schema evotok.finetune/1)", show_default=False),
    **options: Any,
) -> None:
    """Fine-tune a diffusion LM: continuous trajectory supervision (CTS, EvoToken's recipe), LLaDA's
    masked SFT (the paper's FT-baseline, also used to pretrain from scratch), or D2F distillation.

    Writes a PEFT adapter (or with --full a Hugging Face checkpoint), training_args.json, loss_log.jsonl
    and loss.png into --out, which must not hold another run. Interrupt at any time: a checkpoint is
    saved (exit code 130 for Ctrl-C, 143 for SIGTERM); continue the same run with --resume.

    Examples:

      evotok data sudoku4 --n 200 --out train.jsonl && evotok finetune train.jsonl --out runs/cts --max-steps 50

      evotok finetune s1k.jsonl -m ./LLaDA-8B-Instruct --out runs/evotoken-lora --epochs 60 --min-response 32
    """
    from evotok_cli.training import command

    command.run(data, options, resume=resume, config=config, as_json=as_json)


# -- data ----------------------------------------------------------------------------------------
@app.command()
def data(
    tasks: list[str] = typer.Argument(..., help="synthetic task names (sudoku4, arith-small, arith, countdown3)"),
    split: str = typer.Option("train", "--split", help="train | test (disjoint by construction)"),
    n: int = typer.Option(1000, "--n", help="problems per task"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", help="JSONL file to write"),
    cuts: bool = typer.Option(False, "--cuts", help="also write each problem cut after every '=' of its "
                              "reasoning, the text before the cut as prefill (see the description)"),
) -> None:
    """Write problems of the bundled model's synthetic tasks as training JSONL
    ({"prompt", "response", "prefill"}), interleaved across tasks, deterministic in the seed.

    With --cuts, a problem whose reasoning has calculation steps ("10-5=5. 5*2=10.") is written once whole
    and once more per "=", with the reasoning up to that "=" moved into the prefill, which masked-diffusion
    training never masks. A result is then learnt from operands that are certainly visible; in whole
    answers its copies (the next step's operand, the boxed answer) are usually visible too, and the model
    learns to copy them instead of computing.

    Example: evotok data sudoku4 arith countdown3 --n 1000 --out train.jsonl
    """
    from evotok_cli.base.files import output_file
    from evotok_cli.base.locks import hold_file
    from evotok_cli.base.options import check_seed
    from evotok_cli.training.synthetic import write_training_data

    check_seed(seed)
    output_file(out, "--out")  # before the lock makes anything
    with hold_file(out, "--out"):  # one writer per file: a second `evotok data --out` here waits its turn
        count = write_training_data(tasks, split=split, n=n, seed=seed, out=out, cuts=cuts)
    stderr().print(f"wrote {count} examples to {out}")


from evotok_cli.bench.cli import register as _register_bench  # noqa: E402 (bench, score, report)

_register_bench(app)

from evotok_cli.viz.cli import register as _register_viz  # noqa: E402 (trace)

_register_viz(app)

from evotok_cli.serve.cli import register as _register_serve  # noqa: E402 (serve)

_register_serve(app)


def _on_sigterm(signum: int, frame: Any) -> None:
    stopping.note(signum)  # also remembered: code that swallows the exception does not swallow the stop
    raise Terminated(128 + signum)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    stopping.reset()
    try:
        previous, installed = signal.signal(signal.SIGTERM, _on_sigterm), True  # finetune and serve swap in their own
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        previous, installed = None, False
    try:
        try:
            _run()
        except SystemExit as exc:  # a command that failed after a swallowed SIGTERM was still terminated
            if not (installed and stopping.pending()) or isinstance(exc, Terminated):
                raise
        if installed and stopping.pending():  # the exception was swallowed on the way (see base/stopping.py)
            print("terminated", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        stopping.reset()  # this command's signal: a Trainer or server used next in this process must not inherit it


def _run() -> None:
    try:
        from evotok_cli.runtime.compile import bare_flags  # `--compile [LEVEL]`: an optional value

        code = app(args=bare_flags(sys.argv[1:]), standalone_mode=False)  # click returns typer.Exit's code here
    except EvotokError as exc:
        print(f"error: {exc.line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Terminated:
        print("terminated", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # a full disk or read-only remount in a writer without its own handling
        from evotok_cli.base.files import disk_error

        error = disk_error(exc)
        if error is None:
            raise
        print(f"error: {error.line()}", file=sys.stderr)
        sys.exit(error.exit_code)
    except Exception as exc:  # click's own errors (typer vendors click in newer versions: match by shape)
        if not hasattr(exc, "exit_code"):
            raise
        _handle_click(exc)
    if isinstance(code, int) and code:
        sys.exit(code)


def _handle_click(exc: Exception) -> None:
    name = type(exc).__name__
    if name == "Exit":
        sys.exit(exc.exit_code)
    if name == "Abort":
        print("aborted", file=sys.stderr)
        sys.exit(130)
    if not hasattr(exc, "format_message"):
        raise exc
    if name == "NoArgsIsHelpError":  # `evotok` or `evotok bench` alone: show the help, as asked
        print(exc.format_message())
        sys.exit(0)
    ctx = getattr(exc, "ctx", None)
    command = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
    hint = f" (see `{ctx.command_path if ctx is not None else ('evotok ' + command).strip()} --help`)"
    message = exc.format_message()
    envvar = getattr(getattr(exc, "param", None), "envvar", None)
    if isinstance(envvar, str) and not _value_came_from_env(exc.param, envvar):
        message = message.replace(f" (env var: '{envvar}')", "")  # name the variable only when it was used
    print("error: " + " ".join(message.split()) + hint, file=sys.stderr)
    sys.exit(exc.exit_code)


def _value_came_from_env(param: Any, envvar: str) -> bool:
    """True when the bad value was read from `envvar`: it is set and no flag of `param` was given."""
    if envvar not in os.environ:
        return False
    flags = [o for o in getattr(param, "opts", []) + getattr(param, "secondary_opts", []) if o.startswith("-")]
    given = any(arg == f or (f.startswith("--") and arg.startswith(f + "=")) or
                (not f.startswith("--") and arg.startswith(f) and len(arg) > len(f)) for arg in sys.argv[1:] for f in flags)
    return not given
