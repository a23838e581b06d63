"""Decoder discovery through the `evotok.decoders` entry-point group.

Built-in decoders are found exactly like third-party ones. A plugin that fails to import is recorded with
its error (shown by `evotok decoders`) and never breaks a command that uses another decoder.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from evotok_cli.errors import ConfigError

GROUP = "evotok.decoders"


@dataclass
class PluginEntry:
    name: str
    value: str  # module:attribute
    package: str
    version: str
    loaded: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)


def discover(group: str = GROUP, *, load: bool = True) -> dict[str, PluginEntry]:
    entries: dict[str, PluginEntry] = {}
    for ep in _entry_points(group):
        dist = getattr(ep, "dist", None)
        entry = PluginEntry(ep.name, ep.value, dist.metadata["Name"] if dist else "?", dist.version if dist else "?")
        if load:
            try:
                entry.loaded = ep.load()
                check_decoder_class(entry.loaded)
            except Exception as exc:  # a broken plugin is reported, never fatal
                entry.error = f"{type(exc).__name__}: {exc}"
        entries.setdefault(ep.name, entry)
    return entries


def check_decoder_class(cls: Any) -> None:
    for attr in ("name", "Config", "generate"):
        if not hasattr(cls, attr):
            raise TypeError(f"{getattr(cls, '__name__', cls)!r} has no {attr!r}: not a decoder class")


def get(name: str, group: str = GROUP, kind: str = "decoder") -> Any:
    """The plugin class registered as `name`, with a one-line error naming the closest ones."""
    entries = {n: e for n, e in discover(group, load=False).items()}
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.4)
        hint = f"did you mean {' or '.join(close)}?" if close else f"installed: {', '.join(entries) or 'none'}"
        raise ConfigError(f"unknown {kind} {name!r}", where=f"--{kind}", fix=hint)
    entry = entries[name]
    try:
        cls = next(ep for ep in _entry_points(group) if ep.name == name).load()
        if kind == "decoder":
            check_decoder_class(cls)
    except Exception as exc:
        raise ConfigError(f"{kind} {name!r} failed to load ({type(exc).__name__}: {exc})",
                          where=f"{entry.package} {entry.version}",
                          fix=f"reinstall or fix the plugin; `evotok {kind}s` lists what loads") from None
    return cls
