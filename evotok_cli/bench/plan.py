"""What `evotok bench` is asked to do, checked and expanded before any model loads: the request, the
`--data` entries mapped to tasks, and every run (task x decoder x swept value) with its validated decoder,
settings and the setup a resumed run must match."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import ConfigError
from evotok_cli.bench import samples
from evotok_cli.bench.config import DEFAULT_DECODER, BenchOptions
from evotok_cli.bench.sweep import parse_sweeps
from evotok_cli.bench.tasks.base import Task
from evotok_cli.decoding.api import GENERATION_SETTINGS as GEN_KEYS


@dataclass
class BenchRequest:
    """What to run; the defaults are the command's (`BenchOptions`)."""

    tasks: list[str]
    decoders: list[str] = field(default_factory=lambda: [DEFAULT_DECODER])
    model: str | Path | None = None  # None: the bundled model
    adapter: str | None = None
    data: list[str] = field(default_factory=list)  # "PATH" or "TASK=PATH" entries
    limit: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # user-set gen_length/block_length/steps/temperature
    seed: int = BenchOptions.seed
    batch_size: int | None = BenchOptions.batch_size  # None: bench/batching.py's default, set when the model loads
    options: dict[str, Any] = field(default_factory=dict)  # decoder options for every decoder that has them
    sweeps: list[str] = field(default_factory=list)  # "key=v1,v2,..."
    out: Path = Path(BenchOptions.out)
    device: str = BenchOptions.device
    dtype: str = BenchOptions.dtype
    compile: bool = BenchOptions.compile  # run the forward under torch.compile
    lora_mode: str = BenchOptions.lora_mode  # how an adapter is applied: merged | unmerged | auto
    padded_attention: str = BenchOptions.padded_attention  # auto | masked | rowwise (runtime/attention.py)
    quantize: str = BenchOptions.quantize  # none | int8 | int4 (runtime/quantize.py)
    threads: int | None = None  # CPU threads (evotok_cli/base/threads.py); None: the default rule
    on_batch: Callable[[Run, int, int], None] | None = None  # (run, items done, items to do) per batch
    on_note: Callable[[str], None] | None = None  # one-line remarks (protocol quirks hit, resumed counts)
    on_pass: Callable[[Run, int, int, int, int], None] | None = None  # (run, pass, batch rows, items done, to do)
    batch_auto: bool = False  # batch_size was chosen by default_batch_size (batches then split evenly)
    endpoint: str | None = None  # a running OpenAI-compatible server to ask instead of a local model (remote.py)
    api_key: str | None = None  # the endpoint's key
    concurrency: int = BenchOptions.concurrency  # requests in flight at once against the endpoint


@dataclass
class Run:
    """One task x decoder x swept value: one sample file (per process), one results row."""

    task: Task
    decoder_name: str
    decoder: Any
    sweep: dict[str, Any]  # swept key -> value, {} when nothing swept applies
    settings: dict[str, Any]  # gen_length, block_length, steps, temperature
    setup: dict[str, Any]  # everything that decides a sample's content; a resume must match it
    label: str
    name: str  # the sample files' stem


# -- parsing the request -----------------------------------------------------------------------------
def gen_value(key: str, raw: Any, where: str) -> int | float:
    kind = float if key == "temperature" else int
    try:
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return kind(raw) if not isinstance(raw, str) else kind(raw.strip())
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {kind.__name__}", where=where,
                          fix=f"give {key} a {kind.__name__}") from None


def resolve_data(entries: list[str], tasks: list[Task]) -> dict[str, Path]:
    """Map "TASK=PATH" and plain "PATH" entries to the tasks that read data."""
    names = {t.name for t in tasks}
    explicit: dict[str, Path] = {}
    shared: list[Path] = []
    for entry in entries:
        key, sep, rest = entry.partition("=")
        if sep and key in names:
            explicit[key] = Path(rest).expanduser()
        elif sep and key and "/" not in key and not Path(entry).exists():
            raise ConfigError(f"--data names task {key!r}, which is not being run", where="--data",
                              fix=f"run it too, or use one of: {', '.join(sorted(names))}")
        else:
            shared.append(Path(entry).expanduser())
    if len(shared) > 1:
        raise ConfigError("more than one --data PATH without a task name", where="--data",
                          fix="give one folder for all tasks, or write --data TASK=PATH for each")
    readers = [t for t in tasks if t.uses_data and t.name not in explicit]
    mapping = dict(explicit)
    if shared:
        path = shared[0]
        if not any(t.uses_data for t in tasks):
            raise ConfigError("none of the tasks reads data", where=f"--data {path}", fix="drop --data")
        if path.is_dir():
            mapping.update({t.name: path for t in readers})
        elif len(readers) == 1:
            mapping[readers[0].name] = path
        elif readers:
            raise ConfigError(f"one data file for {len(readers)} tasks ({', '.join(t.name for t in readers)})",
                              where=f"--data {path}", fix="write --data TASK=FILE for each task, or pass a folder")
    return mapping


# -- planning ----------------------------------------------------------------------------------------
def plan(request: BenchRequest, tasks: list[Task], model: Path) -> list[Run]:
    """Every run to do (task x decoder x swept values), each with a validated decoder and settings."""
    from evotok_cli.decoding import registry
    from evotok_cli.jobs.generation import split_options

    decoders = list(dict.fromkeys(request.decoders))
    fields = {d: {f.name for f in dataclasses.fields(registry.get(d).Config)} for d in decoders}
    sweeps = parse_sweeps(request.sweeps)
    check_keys(sweeps, request.options, fields)
    overrides = {k: gen_value(k, v, f"--{k.replace('_', '-')}") for k, v in request.overrides.items() if v is not None}
    base_options = split_options(decoders, request.options, where="--opt")
    runs = []
    for task in tasks:
        for decoder_name in decoders:
            mine = [(k, values) for k, values in sweeps if k in GEN_KEYS or k in fields[decoder_name]]
            for combo in itertools.product(*(values for _, values in mine)):
                chosen = dict(zip((k for k, _ in mine), combo))
                runs.append(make_run(task, decoder_name, base_options[decoder_name], overrides, chosen, request, model))
    return runs


def check_keys(sweeps: list[tuple[str, list[str]]], options: dict[str, Any], fields: dict[str, set[str]]) -> None:
    """A swept key must be a generation setting or an option of some selected decoder; --opt holds no
    generation settings."""
    for key, _ in sweeps:
        if key not in GEN_KEYS and not any(key in names for names in fields.values()):
            close = difflib.get_close_matches(key, sorted(set(GEN_KEYS).union(*fields.values())), n=2)
            hint = f"did you mean {' or '.join(close)}?" if close else "see `evotok decoders --details NAME`"
            raise ConfigError(f"no selected decoder has an option {key!r} ({', '.join(fields)})", where="--sweep",
                              fix=hint)
    for key in options:
        if key in GEN_KEYS:
            raise ConfigError(f"{key} is a generation setting, not a decoder option", where="--opt",
                              fix=f"use --{key.replace('_', '-')}")


def make_run(task: Task, decoder_name: str, options: dict[str, Any], overrides: dict[str, Any],
             chosen: dict[str, str], request: BenchRequest, model: Path) -> Run:
    """One run: settings = task defaults < flags < swept values; decoder options = --opt < swept values."""
    from evotok_cli.jobs.generation import check_settings, make_decoder

    swept_options = {k: v for k, v in chosen.items() if k not in GEN_KEYS}
    decoder = make_decoder(decoder_name, {**options, **swept_options}, where="--sweep" if swept_options else "--opt")
    settings = {**dataclasses.asdict(task.defaults), **overrides,
                **{k: gen_value(k, v, "--sweep") for k, v in chosen.items() if k in GEN_KEYS}}
    check_settings(decoder, gen_length=settings["gen_length"], block_length=settings["block_length"],
                   steps=settings["steps"], temperature=settings["temperature"])
    sweep = {k: settings[k] if k in GEN_KEYS else getattr(decoder.config, k) for k in chosen}
    adapter = str(Path(request.adapter).expanduser().resolve()) if request.adapter else None
    setup = samples.jsonable({"task": task.name, "protocol": task.protocol, "decoder": decoder_name,
                              "options": vars(decoder.config), **settings, "seed": request.seed,
                              "model": str(model.resolve()), "adapter": adapter,
                              # quantized samples are another model's; unquantized setups keep their old id
                              **({"quantize": request.quantize} if request.quantize != "none" else {})})
    name = samples.stem(task.name, decoder_name, "_".join(f"{k}={v}" for k, v in sweep.items()))
    label = ",".join(f"{k}={v}" for k, v in sweep.items())
    return Run(task, decoder_name, decoder, sweep, settings, setup, label, name)
