"""hard-mask: LLaDA's low-confidence remasking decoder; the class is in decoder.py."""

from .. import moved_to_decoder

__getattr__ = moved_to_decoder(__name__, "HardMaskDecoder")
