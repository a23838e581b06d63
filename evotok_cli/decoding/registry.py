"""Decoder discovery through the `evotok.decoders` entry-point group.

Built-in decoders are found exactly like third-party ones. A plugin that fails to import is recorded with
its error (shown by `evotok decoders`) and never breaks a command that uses another decoder.

Two packages may register the same name. Then evotok's own decoder wins (its faithfulness is what the
tests check; a plugin cannot silently replace it), and between third-party packages the one whose
distribution name sorts first: a rule that does not depend on install order. The losers are listed as
shadowed, and using the name warns once.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from evotok_cli.base.errors import ConfigError

GROUP = "evotok.decoders"


OWN_DISTRIBUTION = "evotok"


@dataclass
class PluginEntry:
    name: str
    value: str  # module:attribute
    package: str
    version: str
    loaded: Any = None
    error: str | None = None
    shadowed: list[str] = field(default_factory=list)  # "package version" of the losers of a name clash

    @property
    def ok(self) -> bool:
        return self.error is None


def _package(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"], dist.version) if dist else ("?", "?")


def _precedence(ep: metadata.EntryPoint) -> tuple[bool, str]:
    package = _package(ep)[0]
    return (package.lower() != OWN_DISTRIBUTION, package.lower())


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    """Sorted by name, and within a name by precedence: the first of each name wins."""
    return sorted(metadata.entry_points(group=group), key=lambda ep: (ep.name, _precedence(ep)))


def discover(group: str = GROUP, *, load: bool = True) -> dict[str, PluginEntry]:
    entries: dict[str, PluginEntry] = {}
    for ep in _entry_points(group):
        package, version = _package(ep)
        if ep.name in entries:
            entries[ep.name].shadowed.append(f"{package} {version}")
            continue
        entry = PluginEntry(ep.name, ep.value, package, version)
        if load:
            try:
                entry.loaded = ep.load()
                check_decoder_class(entry.loaded)
            except Exception as exc:  # a broken plugin is reported, never fatal
                entry.error = f"{type(exc).__name__}: {exc}"
        entries[ep.name] = entry
    return entries


def check_decoder_class(cls: Any) -> None:
    for attr in ("name", "Config", "generate"):
        if not hasattr(cls, attr):
            raise TypeError(f"{getattr(cls, '__name__', cls)!r} has no {attr!r}: not a decoder class")


_warned: set[tuple[str, str]] = set()


def get(name: str, group: str = GROUP, kind: str = "decoder", where: str | None = None) -> Any:
    """The plugin class registered as `name`, with a one-line error naming the closest ones."""
    entries = discover(group, load=False)
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.4)
        hint = f"did you mean {' or '.join(close)}?" if close else f"installed: {', '.join(entries) or 'none'}"
        raise ConfigError(f"unknown {kind} {name!r}", where=where or f"--{kind}", fix=hint)
    entry = entries[name]
    if entry.shadowed and (group, name) not in _warned:
        _warned.add((group, name))
        rule = "evotok's own win" if entry.package.lower() == OWN_DISTRIBUTION else "the first package by name wins"
        warnings.warn(f"{kind} {name!r} is registered by {entry.package} and by {', '.join(entry.shadowed)}; "
                      f"using {entry.package}'s ({rule}; rename the other entry point to use it)", stacklevel=2)
    try:
        cls = next(ep for ep in _entry_points(group) if ep.name == name).load()
        if kind == "decoder":
            check_decoder_class(cls)
    except Exception as exc:
        raise ConfigError(f"{kind} {name!r} failed to load ({type(exc).__name__}: {exc})",
                          where=f"{entry.package} {entry.version}",
                          fix=f"reinstall or fix the plugin; `evotok {kind}s` lists what loads") from None
    return cls
