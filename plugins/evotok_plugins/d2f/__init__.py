"""d2f: pipelined blockwise decoding with an exact KV cache (code: decoder.py, blocks.py)."""

from .. import moved_to_decoder

__getattr__ = moved_to_decoder(__name__, "D2FDecoder")
