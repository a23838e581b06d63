"""evotok: masked diffusion language models with progressive token evolution.

The package's folders are its layers (docs/architecture.md): base, runtime, decoding, the plugins
(plugins/evotok_plugins), jobs, training, the apps (bench, viz, serve, lmeval) and cli. Each folder's
`__init__` says what it may import; tests/test_architecture.py reads those lines and enforces them.

Layer 0, base: this module imports nothing.
"""

__version__ = "0.1.0"
