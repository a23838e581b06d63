"""The bundled default model ships here, in the layout of a real checkpoint.

Layer 0, base: may import only base.
"""

from __future__ import annotations

from pathlib import Path

from evotok_cli.base.errors import CheckpointError

BUNDLED_NAME = "evotok-tiny"


def default_model_path() -> Path:
    path = Path(__file__).parent / BUNDLED_NAME
    if not (path / "config.json").is_file():
        raise CheckpointError("the bundled model is not installed", where=str(path),
                              fix="pass --model DIR (e.g. a folder written by `evotok init-model DIR`)")
    return path
