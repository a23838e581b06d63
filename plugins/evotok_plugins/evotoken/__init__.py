"""evotoken: progressive token evolution (EvoToken-DLM); the class is in decoder.py."""

from .. import moved_to_decoder

__getattr__ = moved_to_decoder(__name__, "EvoTokenDecoder")
