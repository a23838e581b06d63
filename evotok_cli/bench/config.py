"""Every `evotok bench` (run) option, declared once: its default, help, flag and --config key (see
`options.option`). The command's flags, its --config keys and its --help text are derived from these fields,
and `BenchRequest` takes its defaults from them. Light on purpose (no torch): the CLI imports it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.options import option, seed_option
from evotok_cli.bench.batching import SHOWN as BATCH_SHOWN
from evotok_cli.jobs.config import loads_model

DEFAULT_DECODER = "hard-mask"
PER_TASK = "per task: "  # a default that the task's protocol decides


def _names(key: str) -> Any:
    """The reader of an option that is a name, a list of names, or repeated flags."""
    def read(value: Any, where: str | None) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
        raise ConfigError(f"{key}: expected a name or a list of names, got {value!r}", where=where,
                          fix=f"write e.g. `{key}: [a, b]`")
    return read


def _sweep(value: Any, where: str | None) -> list[str]:
    """`sweep: {alpha: [0.5, 0.7]}` or `sweep: ["alpha=0.5,0.7"]`."""
    if isinstance(value, dict):
        return [f"{key}=" + ",".join(str(v) for v in (values if isinstance(values, list) else [values]))
                for key, values in value.items()]
    return _names("sweep")(value, where)


def _data(value: Any, where: str | None) -> list[str]:
    """`data: PATH`, `data: [PATH, TASK=PATH]` or `data: {TASK: PATH}`."""
    if isinstance(value, dict):
        return [f"{task}={path}" for task, path in value.items()]
    return _names("data")(value, where)


@dataclass
@loads_model()
class BenchOptions:
    """The options of `evotok bench TASK ...` but --config and --json, in --help's order; the model-loading
    ones, last, are `evotok generate`'s (`loads_model`)."""

    tasks: list[str] = option([], cli=False, read=_names("tasks"))  # the command's TASK arguments
    decoders: list[str] = option([DEFAULT_DECODER], "decoder to compare (repeatable)", flags=("--decoder", "-d"),
                                 cli_type=list[str], read=_names("decoders"))
    model: str | None = option(None, "checkpoint folder; default: the bundled model", flags=("--model", "-m"),
                               envvar="EVOTOK_MODEL")
    adapter: str | None = option(None, "PEFT LoRA adapter folder, applied at load", envvar="EVOTOK_ADAPTER")
    data: list[str] = option([], "data file or folder (PATH for all tasks, or TASK=PATH; repeatable); default: the "
                             "task's Hugging Face dataset", cli_type=list[str], read=_data)
    limit: int | None = option(None, "first N items of each task (bundled tasks: N test problems)",
                               shown="all; 200 for bundled tasks")
    gen_length: int | None = option(None, "tokens to generate", shown=PER_TASK + "256 paper tasks, 48 bundled tasks",
                                    envvar="EVOTOK_GEN_LENGTH")
    block_length: int | None = option(None, "block size", shown=PER_TASK + "32 paper tasks, 16 bundled tasks",
                                      envvar="EVOTOK_BLOCK_LENGTH")
    steps: int | None = option(None, "forward-pass budget", shown=PER_TASK + "128 paper tasks, 48 bundled tasks",
                               envvar="EVOTOK_STEPS")
    temperature: float | None = option(None, "sampling temperature",
                                       shown=PER_TASK + "0.5 paper tasks (EvoToken's script), 0 bundled tasks",
                                       envvar="EVOTOK_TEMPERATURE")
    seed: int = seed_option(0, "base seed; each item samples from seed + its doc_id, whatever the batch size",
                            envvar="EVOTOK_SEED")
    batch_size: int | None = option(None, "items decoded together", shown=BATCH_SHOWN,
                                    envvar="EVOTOK_BATCH_SIZE")
    opt: list[str] | None = option(None, "decoder option key=value for every decoder that has it (repeatable)",
                                   flags=("--opt", "-o"), cli_type=list[str], yaml=False)
    sweep: list[str] = option([], "key=v1,v2,...: one run per value, for each decoder that has the option (or for "
                              "every decoder: gen_length, block_length, steps, temperature); repeat for a grid",
                              cli_type=list[str], read=_sweep)
    out: str = option("bench-results", "folder for sample logs and results.json; rerunning with it resumes",
                      cli_type=Path)
    endpoint: str | None = option(None, "ask a running OpenAI-compatible server (e.g. `evotok serve`'s "
                                  "http://127.0.0.1:8000/v1) instead of loading the model; -m gives the tokenizer",
                                  envvar="EVOTOK_ENDPOINT")
    api_key: str | None = option(None, "the --endpoint server's API key", envvar="EVOTOK_API_KEY", yaml=False,
                                 shown=None)
    concurrency: int = option(8, "requests in flight at once against --endpoint", min=1, max=1024,
                              what="--concurrency", example=8)


COMMAND_ONLY = {"json": False}  # --config keys that are the command's, not the run's
