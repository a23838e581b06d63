"""Command options declared once, as dataclass fields: the command-line counterpart of `decoding.api.option`.

A field made by `option(...)` holds the option's default, help, flags, bounds and where it may be set. The
Typer parameters (`with_options`), the `--help` text with its default, the defaults a `--config` YAML file
is checked against (`yaml_defaults`), the flag > YAML > default merge (`merged`) and the one-line range
errors (`check_bounds`) are all derived from it, so that a default, a bound or a help line is written once.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, get_args, get_origin

from evotok_cli.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# Seeds: torch's generators take 64 bits, and a row (an item, an epoch) draws from seed + its index, so a
# seed stays in the lower half of that range: every derived seed then fits too.
SEED_MAX = 2**63 - 1


def check_seed(value: Any, where: str = "--seed") -> int:
    """A seed as an int inside [0, SEED_MAX], or one ConfigError naming the range (torch would raise an
    overflow mid-run for 2^64 and above)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"seed must be an integer, got {value!r}", where=where, fix="e.g. 0")
    if not 0 <= value <= SEED_MAX:
        raise ConfigError(f"seed must be in [0, {SEED_MAX}], got {value}", where=where, fix="e.g. 0")
    return value


def seed_option(default: int, help: str = "random seed", **kwargs: Any) -> Any:
    """A seed option: its range is declared here once for every command that has one."""
    return option(default, help, min=0, max=SEED_MAX, what="seed", example=default, **kwargs)


def option(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),
           envvar: str | None = None, shown: str | None = None, cli: bool = True, yaml: bool = True,
           cli_type: type | None = None, min: float | None = None, max: float | None = None,
           min_open: bool = False, max_open: bool = False, cli_range: bool = False, finite: bool = False,
           pair: bool = False, choices: tuple[str, ...] = (), what: str = "", unit: str = "", example: Any = None,
           unset: Callable[[dict[str, Any]], Any] | None = None,
           read: Callable[[Any, str | None], Any] | None = None) -> Any:
    """One option of a command.

    flags: its Typer declarations (default `--the-name`); cli / yaml: whether a flag / a --config key sets
    it; cli_type: the flag's type where it is not the field's (a list is always comma-separated text);
    shown: the default as --help writes it (derived from `default` when not given; None and False show
    none). min/max (open or not), finite, pair (a [lo, hi] list inside [min, max]) and choices are checked
    by `check_bounds`, whose error reads "{what} must be {range} {unit}, got {value} (e.g. {example})"
    (unit: words after the range, such as "minutes"). cli_range: Typer checks min/max as it parses the flag
    instead (its own error, the range in --help), for a command without --config.
    unset: the value when neither a flag nor the YAML file sets it, computed from the other values.
    read: for a value of several forms (a name or a list of names, a mapping): `read(value, config path)` makes
    the flag's or the YAML file's value the field's, with its own one-line errors (the file's is not
    type-checked); an empty one is the default.
    """
    meta = {"help": help, "flags": flags, "envvar": envvar, "shown": shown, "cli": cli, "yaml": yaml,
            "cli_type": cli_type, "min": min, "max": max, "min_open": min_open, "max_open": max_open,
            "cli_range": cli_range, "finite": finite, "pair": pair, "choices": choices, "what": what, "unit": unit,
            "example": example, "unset": unset, "read": read}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def like(cls: type, name: str, **changes: Any) -> Any:
    """The option `cls` declares as `name`, for another command that has it too; `changes` are `option`'s
    arguments that differ there (e.g. its own help)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return option(default_of(f), **{**f.metadata, **changes})


def flag(f: dataclasses.Field) -> str:
    """How messages name an option: its long flag, or its YAML key when no flag sets it."""
    if not f.metadata.get("cli"):
        return f.name
    longs = [d.split("/")[0] for d in f.metadata["flags"] if d.startswith("--")]
    return longs[0] if longs else "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def shown(f: dataclasses.Field) -> str | None:
    """The default as --help and the range errors' examples write it."""
    if f.metadata.get("shown") is not None:
        return f.metadata["shown"]
    default = default_of(f)
    if default is None or default is False:
        return None
    if isinstance(default, list):
        return ",".join(map(str, default))
    return f"{default:g}" if isinstance(default, float) else str(default)


# -- bounds ----------------------------------------------------------------------------------------------
def _span(meta: dict[str, Any]) -> str:
    lo, hi = meta["min"], meta["max"]
    if lo is not None and hi is not None:
        span = f"in {'(' if meta['min_open'] else '['}{lo}, {hi}{')' if meta['max_open'] else ']'}"
    elif lo is not None:
        span = f"{'>' if meta['min_open'] else '>='} {lo}"
    elif hi is not None:
        span = f"{'<' if meta['max_open'] else '<='} {hi}"
    else:
        span = ""
    parts = [" ".join(p for p in (span, meta["unit"]) if p), "finite" if meta["finite"] else ""]
    return " and ".join(p for p in parts if p)


def _within(value: Any, meta: dict[str, Any]) -> bool:
    """Whether one number is inside the declared range (nan never is)."""
    lo, hi = meta["min"], meta["max"]
    if lo is not None and not (value > lo if meta["min_open"] else value >= lo):
        return False
    if hi is not None and not (value < hi if meta["max_open"] else value <= hi):
        return False
    return not meta["finite"] or math.isfinite(value)


def _problem(value: Any, meta: dict[str, Any]) -> tuple[str, str | None] | None:
    """What is wrong with `value` under its declaration, and the fix when it is not "e.g. <default>"."""
    if value is None:
        return None
    if meta["choices"]:
        if value in meta["choices"]:
            return None
        return f"unknown {meta['what']} {value!r}", f"use one of {', '.join(meta['choices'])}"
    lo, hi = meta["min"], meta["max"]
    if meta["pair"]:
        if len(value) == 2 and lo <= value[0] <= value[1] <= hi:
            return None
        return f"need two values {lo} <= lo <= hi <= {hi}, got {value}", None
    items = value if isinstance(value, list) else [value]
    if not items and lo is None:
        return f"no {meta['what']} given", None
    if items and all(_within(v, meta) for v in items):
        return None
    if not _span(meta):
        return None
    what = f"{meta['what']} " if meta["what"] else ""
    return f"{what}must be {_span(meta)}, got {value}", None


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
    if meta["min"] is None and meta["max"] is None and not meta["finite"]:
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
        meta = f.metadata
        if not meta.get("cli"):
            continue
        default = shown(f)
        text = " ".join(t for t in (meta["help"], f"[default: {default}]" if default else "") if t)
        decls = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        bounds = {"min": meta["min"], "max": meta["max"]} if meta["cli_range"] else {}
        info = typer.Option(None, *decls, envvar=meta["envvar"], help=text, show_default=False, **bounds)
        kind = meta["cli_type"] or _bare(hints[f.name])
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
