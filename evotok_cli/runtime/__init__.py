"""The model side: checkpoints and adapters, quantized weights, tokenizers and prompt encoding
(`prompts`), the architectures (one model definition in `architectures/family.py`), attention, the KV
cache, devices and distributed groups. Nothing here knows what a decoder is.

Layer 1, runtime: may import base.
"""
