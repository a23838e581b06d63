"""evotok's built-in decoders, each in its own package with its code in `decoder.py`; each registers
through the `evotok.decoders` entry-point group (pyproject.toml), exactly as a third-party package does.

Layer 3, plugins: may import decoding, runtime and base; never jobs, training or the apps. A plugin that
uses another imports it relatively (`from ..evotoken import decoder`), so the code reads the same in the
folder and installed.
"""

import importlib
from collections.abc import Callable
from typing import Any


def moved_to_decoder(package: str, cls: str) -> Callable[[str], Any]:
    """A plugin package's module `__getattr__` answering `package:cls`, the entry point that installs made before
    the class moved into `decoder.py` still name (until reinstalled); any other name imports as a submodule."""
    def lookup(name: str) -> Any:
        if name != cls:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.decoder"), cls)
    return lookup
