"""evotok: masked diffusion language models with progressive token evolution."""

__version__ = "0.1.0"
