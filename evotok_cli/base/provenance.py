"""What a result records about how it was made: the installed versions that decide the numbers, and the
settings as JSON values. `generate --json`, bench results and bench samples all write them; nothing heavy
is imported here."""

from __future__ import annotations

import math
import platform
from typing import Any


def versions() -> dict[str, str | None]:
    """Installed versions of what decides the numbers (read from package metadata, nothing imported)."""
    from importlib import metadata

    from evotok_cli import __version__

    found: dict[str, str | None] = {"evotok": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "numpy", "datasets", "math-verify"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def jsonable(value: Any) -> Any:
    """JSON-safe copy: tuples become lists, non-finite floats strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
