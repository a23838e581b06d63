"""The `evotok` command line: `app` declares every command (one thin function each), `generate` is what
`generate` does with its flags, `inspect` holds info, download and decoders, and `chat` the terminal
conversation.

Layer 7, face: may import every layer.
"""
