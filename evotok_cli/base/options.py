"""Command options declared once, as dataclass fields: the command-line counterpart of `decoding.api.option`.

A field made by `option(...)` holds what the value is (default, help, bounds: `values.Bounds`, the range checker
and formatter decoder options use too) apart from how the command line shows it (`Cli`: flags, env var, panel),
and where it may be set. The Typer parameters (`with_options`), the `--help` text with its default, the
defaults a `--config` YAML file is checked against (`yaml_defaults`), the flag > YAML > default merge
(`merged`) and the one-line range errors (`check_bounds`) are all derived from it, so that a default, a bound
or a help line is written once.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, get_args, get_origin

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.values import Bounds, format_default

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# Seeds: torch's generators take 64 bits, and a row (an item, an epoch) draws from seed + its index, so a
# seed stays in the lower half of that range: every derived seed then fits too.
SEED_MAX = 2**63 - 1
SEEDS = Bounds(min=0, max=SEED_MAX)


def check_seed(value: Any, where: str = "--seed") -> int:
    """A seed as an int inside [0, SEED_MAX], or one ConfigError naming the range (torch would raise an
    overflow mid-run for 2^64 and above)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"seed must be an integer, got {value!r}", where=where, fix="e.g. 0")
    if not SEEDS.contains(value):
        raise ConfigError(f"seed must be {SEEDS.phrase()}, got {value}", where=where, fix="e.g. 0")
    return value


def seed_option(default: int, help: str = "random seed", **kwargs: Any) -> Any:
    """A seed option: its range is declared here once for every command that has one."""
    return option(default, help, min=SEEDS.min, max=SEEDS.max, what="seed", example=default, **kwargs)


@dataclasses.dataclass(frozen=True)
class Cli:
    """How the command line presents an option, apart from what its value is (`option`'s `cli=`).

    flags: its Typer declarations (default `--the-name`); env: an environment variable that sets it; panel:
    the --help panel it is listed under (None: the default one); shown: the default as --help writes it
    (derived from the default when None; "" shows none); type: the flag's type where it is not the field's
    (a list is always comma-separated text); checks_range: Typer checks min/max as it parses the flag
    instead (its own error, the range in --help), for a command without --config.
    """

    flags: tuple[str, ...] = ()
    env: str | None = None
    panel: str | None = None
    shown: str | None = None
    type: Any = None
    checks_range: bool = False


# option()'s keywords from before `Cli` existed, still accepted (-> the Cli field they set)
LEGACY_CLI = {"flags": "flags", "envvar": "env", "shown": "shown", "cli_type": "type", "cli_range": "checks_range"}


def option(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
           max: float | str | None = None, min_open: bool = False, max_open: bool = False, finite: bool = False,
           pair: bool = False, choices: tuple[str, ...] = (), what: str = "", unit: str = "", example: Any = None,
           yaml: bool = True, unset: Callable[[dict[str, Any]], Any] | None = None,
           read: Callable[[Any, str | None], Any] | None = None, cli: Cli | bool | None = True,
           **legacy: Any) -> Any:
    """One option: what its value is, and (`cli`) how the command line shows it.

    The value: its default and one line of help; min/max (open or not, see `values.Bounds`), finite, pair
    (a [lo, hi] list inside [min, max]) and choices, checked by `check_value`, whose error reads
    "{what} must be {range} {unit}, got {value} (e.g. {example})" (unit: words after the range, such as
    "minutes"); yaml: whether a --config key sets it; unset: the value when neither a flag nor the YAML file
    sets it, computed from the other values; read: for a value of several forms (a name or a list of names, a
    mapping), `read(value, config path)` makes the flag's or the YAML file's value the field's, with its own
    one-line errors (the file's is not type-checked); an empty one is the default.

    cli: a `Cli` (flags, env, panel, ...), True for a flag with the defaults, or False/None for no flag. The
    keywords from before `Cli` (flags=, envvar=, shown=, cli_type=, cli_range=) still work and set the Cli.
    """
    unknown = set(legacy) - set(LEGACY_CLI)
    if unknown:
        raise TypeError(f"option() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if cli is True:
        cli = Cli()
    if cli and legacy:
        cli = dataclasses.replace(cli, **{LEGACY_CLI[k]: v for k, v in legacy.items()})
    meta = {"help": help, "bounds": Bounds(min, max, min_open, max_open, finite), "pair": pair,
            "choices": choices, "what": what, "unit": unit, "example": example, "yaml": yaml, "unset": unset,
            "read": read, "cli": cli or None}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def like(cls: type, name: str, **changes: Any) -> Any:
    """The option `cls` declares as `name`, for another command that has it too; `changes` are `option`'s
    arguments that differ there (e.g. its own help)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = dict(f.metadata)
    bounds: Bounds = meta.pop("bounds")
    declared = {**meta, **dataclasses.asdict(bounds), "cli": meta["cli"] or False}
    return option(default_of(f), **{**declared, **changes})


def cli_of(f: dataclasses.Field) -> Cli | None:
    """How the command line shows this option; None when no flag sets it."""
    return f.metadata.get("cli") or None


def flag(f: dataclasses.Field) -> str:
    """How messages name an option: its long flag, or its YAML key when no flag sets it."""
    cli = cli_of(f)
    if cli is None:
        return f.name
    longs = [d.split("/")[0] for d in cli.flags if d.startswith("--")]
    return longs[0] if longs else "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def shown(f: dataclasses.Field) -> str | None:
    """The default as --help and the range errors' examples write it."""
    cli = cli_of(f)
    if cli is not None and cli.shown is not None:
        return cli.shown
    return format_default(default_of(f))


# -- bounds ----------------------------------------------------------------------------------------------
def _problem(value: Any, meta: dict[str, Any]) -> tuple[str, str | None] | None:
    """What is wrong with `value` under its declaration, and the fix when it is not "e.g. <default>"."""
    if value is None:
        return None
    if meta["choices"]:
        if value in meta["choices"]:
            return None
        return f"unknown {meta['what']} {value!r}", f"use one of {', '.join(meta['choices'])}"
    bounds = Bounds.of(meta)
    if meta["pair"]:
        if len(value) == 2 and bounds.contains(value[0]) and bounds.contains(value[1]) and value[0] <= value[1]:
            return None
        return f"need two values {bounds.min} <= lo <= hi <= {bounds.max}, got {value}", None
    items = value if isinstance(value, list) else [value]
    if not items and bounds.min is None:
        return f"no {meta['what']} given", None
    if items and all(bounds.contains(v) for v in items):
        return None
    if not bounds.phrase(meta["unit"]):
        return None
    what = f"{meta['what']} " if meta["what"] else ""
    return f"{what}must be {bounds.phrase(meta['unit'])}, got {value}", None


def check_bounds(obj: Any) -> None:
    """A one-line ConfigError for the first field of `obj` outside its declared range or choices."""
    for f in dataclasses.fields(obj):
        if "choices" in f.metadata:
            check_value(f, getattr(obj, f.name))


def check_value(f: dataclasses.Field, value: Any) -> None:
    """One option's value against its declared range or choices (a one-line ConfigError)."""
    problem = _problem(value, dict(f.metadata))
    if problem:
        example = f.metadata["example"] if f.metadata["example"] is not None else shown(f)
        raise ConfigError(problem[0], where=flag(f), fix=problem[1] or f"e.g. {example}")


def _comparable(value: Any, meta: dict[str, Any]) -> bool:
    """Whether `value` has the kind its declared bounds compare (a wrong type is the type check's to report)."""
    if meta["choices"]:
        return isinstance(value, str)
    if not Bounds.of(meta).declared:
        return False  # nothing declared to compare with
    items = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)


# -- JSON settings files -----------------------------------------------------------------------------------
class DuplicateKey(ValueError):
    """A JSON object that names one key twice (json keeps the last one without a word)."""

    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads(..., object_pairs_hook=unique_keys)`: an object, or DuplicateKey for its first repeat."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def line_of_repeat(text: str, key: str) -> int | None:
    """The line of the second `"key":` in a JSON text (where a DuplicateKey most likely is), or None."""
    import json
    import re

    found = list(re.finditer(re.escape(json.dumps(key)) + r"\s*:", text))
    return text.count("\n", 0, found[1].start()) + 1 if len(found) > 1 else None


# -- Typer -----------------------------------------------------------------------------------------------
def _bare(hint: Any) -> Any:
    """`int | None` -> int; a list -> str (lists are comma-separated on the command line)."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    return str if get_origin(hint) is list else hint


def typer_parameters(cls: type) -> list[inspect.Parameter]:
    """One Typer option per field that a flag sets. Every flag defaults to None (unset), so that the
    --config file and the declared default can fill it in; --help shows the declared default instead."""
    import typer

    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        cli = cli_of(f)
        if cli is None:
            continue
        default = shown(f)
        text = " ".join(t for t in (f.metadata["help"], f"[default: {default}]" if default else "") if t)
        decls = cli.flags or ("--" + f.name.replace("_", "-"),)
        extra: dict[str, Any] = {"rich_help_panel": cli.panel} if cli.panel else {}
        if cli.checks_range:
            bounds = f.metadata["bounds"]
            extra.update(min=bounds.min, max=bounds.max)
        info = typer.Option(None, *decls, envvar=cli.env, help=text, show_default=False, **extra)
        kind = cli.type or _bare(hints[f.name])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=kind | None))
    return params


def with_options(cls: type) -> Callable[[F], F]:
    """Give a Typer command the options `cls` declares. They reach the command in its `**kwargs`, and
    --help lists them after its arguments and before its own options."""
    def wrap(func: F) -> F:
        import typer

        hints = typing.get_type_hints(func)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(func).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        args = [p for p in own if isinstance(p.default, typer.models.ArgumentInfo)]
        rest = [p for p in own if not isinstance(p.default, typer.models.ArgumentInfo)]
        func.__signature__ = inspect.Signature([*args, *typer_parameters(cls), *rest])  # type: ignore[attr-defined]
        return func
    return wrap


def from_flags(cls: type[T], flags: dict[str, Any]) -> T:
    """`cls` from the flags of a command without --config: a flag left unset is the declared default."""
    return cls(**{f.name: default_of(f) if flags.get(f.name) is None else flags[f.name]
                  for f in dataclasses.fields(cls)})


# -- YAML ------------------------------------------------------------------------------------------------
def yaml_defaults(cls: type) -> tuple[dict[str, Any], dict[str, type]]:
    """The defaults and value types (for None defaults; `list` for a list) that `config.Settings` checks a
    --config file against: lists as comma-separated text (the file may write either), None where `unset`
    decides."""
    hints = typing.get_type_hints(cls)
    defaults: dict[str, Any] = {}
    kinds: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("yaml"):
            continue
        value = None if f.metadata["unset"] or f.metadata["read"] else default_of(f)
        defaults[f.name] = ",".join(map(str, value)) if isinstance(value, list) else value
        if f.metadata["read"]:
            continue
        if get_origin(hints[f.name]) is list:
            kinds[f.name] = list  # comma-separated text, a number, or a list of them
        elif defaults[f.name] is None:
            kinds[f.name] = _bare(hints[f.name])
    return defaults, kinds


def split_list(text: Any, kind: type, where: str) -> list:
    """A comma-separated option (or a YAML list) as a list of `kind`."""
    items = list(text) if isinstance(text, (list, tuple)) else [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        return [kind(t) for t in items]
    except (ValueError, TypeError):
        raise ConfigError(f"{text!r} is not a comma-separated list of {kind.__name__}", where=where,
                          fix="write e.g. 1,2,4,8" if kind is int else "write e.g. 0.5,1.0") from None


def merged(cls: type, settings: Any, flags: dict[str, Any]) -> dict[str, Any]:
    """Every option a flag or the --config file may set, as its field's type: the flag if given, else the
    YAML value, else the declared default (`settings.get` decides, as `config.Settings` does)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("yaml"):
            continue
        value = settings.get(f.name, flags.get(f.name))
        hint = hints[f.name]
        if f.metadata["read"]:
            value = (f.metadata["read"](value, settings.path) if value is not None else None) or default_of(f)
        elif value is not None and get_origin(hint) is list:
            value = split_list(value, get_args(hint)[0], flag(f))
        elif _bare(hint) is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[f.name] = value
    for f in dataclasses.fields(cls):
        if f.metadata.get("unset") and values.get(f.name) is None:
            values[f.name] = f.metadata["unset"](values)
    for f in dataclasses.fields(cls):  # declared ranges, wherever the value came from (flag, variable, YAML)
        if f.name in values and _comparable(values[f.name], dict(f.metadata)):
            check_value(f, values[f.name])
    return values
