"""evotoken: progressive token evolution (EvoToken-DLM), faithful to the release's `generate_soft_token`.

The decoder class is in `decoder.py` (the entry point names it); this package holds no code.
"""
