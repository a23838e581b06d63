"""Task discovery through the `evotok.tasks` entry-point group.

The built-in tasks are registered there by our own pyproject.toml, exactly like a third-party task (and
like the decoders): an install whose metadata predates a built-in task finds it after `pip install -e .`.
"""

from __future__ import annotations

import difflib
import importlib
from importlib import metadata
from typing import Any

from evotok_cli.base.errors import ConfigError

GROUP = "evotok.tasks"
_REQUIRED = ("name", "load", "render", "score", "defaults")


def available() -> dict[str, str]:
    """Task name -> "module:attribute", from the entry points."""
    return {ep.name: ep.value for ep in sorted(metadata.entry_points(group=GROUP), key=lambda ep: ep.name)}


def _load(value: str) -> Any:
    module, _, attribute = value.partition(":")
    obj = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def get(name: str) -> Any:
    """An instance of the task registered as `name`, with a one-line error naming the closest ones."""
    names = available()
    if name not in names:
        close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"installed: {', '.join(names)}"
        raise ConfigError(f"unknown task {name!r}", where="evotok bench", fix=hint)
    try:
        cls = _load(names[name])
        missing = [a for a in _REQUIRED if not hasattr(cls, a)]
        if missing:
            raise TypeError(f"{names[name]} has no {missing[0]!r}: not a task class")
        return cls()
    except Exception as exc:  # a broken plugin is reported, never a traceback
        raise ConfigError(f"task {name!r} failed to load ({type(exc).__name__}: {exc})", where=names[name],
                          fix="reinstall or fix the package that provides it") from None
