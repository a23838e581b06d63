"""Benchmark tasks: the paper's four (protocol.py) and the bundled model's synthetic ones (bundled.py)."""
