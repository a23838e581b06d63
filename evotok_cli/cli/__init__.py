"""The `evotok` command line: `app` declares every command (one thin function each), `generate` is what
`generate` does with its flags, `inspect` holds info, download and decoders, and `chat` the terminal
conversation.

Layer 7, face: may import every layer.
"""

import importlib


def __getattr__(name: str):  # `evotok_cli.cli:main`, the console script of installs from before cli/app.py
    if name != "main":  # only that name: `from evotok_cli.cli import generate` must still import the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module("evotok_cli.cli.app").main
