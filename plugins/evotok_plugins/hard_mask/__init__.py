"""hard-mask: LLaDA's low-confidence remasking decoder (the MDLM baseline of every table).

The decoder class is in `decoder.py` (the entry point names it); this package holds no code.
"""
