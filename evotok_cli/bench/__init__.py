"""`evotok bench`: tasks (found by entry point), the runner (batched, sharded, resumable), scoring,
results and the report.

Layer 6, apps: may import training, jobs, decoding, runtime, base and the other apps (never round a loop).
"""
