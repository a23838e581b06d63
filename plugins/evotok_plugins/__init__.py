"""evotok's built-in decoders, each in its own package with its code in `decoder.py`; each registers
through the `evotok.decoders` entry-point group (pyproject.toml), exactly as a third-party package does.

Layer 3, plugins: may import decoding, runtime and base; never jobs, training or the apps. A plugin that
uses another imports it relatively (`from ..evotoken import decoder`), so the code reads the same in the
folder and installed.
"""
