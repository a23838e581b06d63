"""`--sweep key=v1,v2,...` entries, parsed once for planning the runs (runner) and for the request that
results.json records (results)."""

from __future__ import annotations

from evotok_cli.base.errors import ConfigError


def parse_sweeps(entries: list[str]) -> list[tuple[str, list[str]]]:
    sweeps: list[tuple[str, list[str]]] = []
    for entry in entries:
        key, sep, values = entry.partition("=")
        key = key.strip().replace("-", "_")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise ConfigError(f"{entry!r} is not key=v1,v2,...", where="--sweep",
                              fix="write e.g. --sweep alpha=0.5,0.7")
        _refuse_repeats(key, items)
        if key in (k for k, _ in sweeps):
            raise ConfigError(f"{key!r} is swept twice", where="--sweep",
                              fix=f"give all values in one --sweep {key}=...")
        sweeps.append((key, items))
    return sweeps


def _same(value: str) -> object:
    """What a swept value means: 0.5 and 0.50 are one run."""
    try:
        return float(value)
    except ValueError:
        return value


def _refuse_repeats(key: str, items: list[str]) -> None:
    """A value given twice would run twice under one label, or be dropped without a word: refused."""
    seen: dict[object, str] = {}
    for item in items:
        earlier = seen.setdefault(_same(item), item)
        if earlier is not item:
            what = f"{earlier!r} and {item!r} are one value" if earlier != item else f"{item!r} is given twice"
            raise ConfigError(f"{key}: {what}", where="--sweep",
                              fix=f"give each value of {key} once")
