"""`evotok finetune` and `evotok data`: training data, the objectives (CTS, SFT, D2F), the trainer, its
checkpoints and resumption, and the bundled model's problem generators (`synthetic`).

Layer 5, training: may import jobs, decoding, runtime and base.
"""
