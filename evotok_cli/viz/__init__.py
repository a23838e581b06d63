"""Pictures of decoding: read a `generate --trace` file (trace), draw it as a self-contained HTML page
(html) or a static PNG (png), or watch it live in the terminal (live). Only `trace`, `style` and `tokens`
are imported by the others; matplotlib and rich load inside the modules that need them.

Layer 6, apps: may import training, jobs, decoding, runtime, base and the other apps (never round a loop).
"""
