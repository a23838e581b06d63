"""d2f: Discrete Diffusion Forcing's pipelined blockwise decoding (spec 6.4), with an exact KV cache.

The decoder class is in `decoder.py` (the entry point names it); this package holds no code.
"""
