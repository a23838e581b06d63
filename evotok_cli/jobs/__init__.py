"""What several commands share: `generate` as a library call (`generation`: prompts in, results out, the
seeds of sampled rows), settings precedence and the checkpoint folder a `--model` names (`config`), and
the canvas a `max_tokens` cap decodes with the cut that keeps an answer within it (`canvas_plan`).

Layer 4, jobs: may import decoding, runtime and base; decoders are found by name, never imported.
"""
