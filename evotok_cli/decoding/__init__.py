"""What every decoder shares: token states and soft inputs, the schedule, the EvoToken transition, the
canvas, the block loop (`blockwise`), the decoder protocol and options (`api`), the step engine
(`engine`, `passes`, `rows`, `stepper`, `background`, `jobs`, `merging`) and the registry that finds
decoders by entry point.

Layer 2, decoding: may import runtime and base.
"""
