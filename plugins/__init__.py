"""evotok's built-in decoders; each registers through the `evotok.decoders` entry-point group."""
