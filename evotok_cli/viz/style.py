"""One palette and one vocabulary for every picture, so the HTML page, the PNG and the terminal agree."""

from __future__ import annotations

# the four input states of docs/trace.md, in the order a position moves through them
STATES = ("mask", "soft_mask", "soft", "decoded")

PAPER_NAMES = {
    "mask": "[MASK]",
    "soft_mask": "Soft([MASK]+V)",
    "soft": "Soft(V)",
    "decoded": "[Decode]",
}

# background per state: dark for [MASK], two soft tints, green once decoded (readable black text on the last three)
STATE_COLOURS = {
    "mask": "#4a4a4a",
    "soft_mask": "#c5b3e6",
    "soft": "#8fd3f4",
    "decoded": "#a8dba8",
}
TEXT_COLOURS = {"mask": "#ffffff", "soft_mask": "#000000", "soft": "#000000", "decoded": "#000000"}

REVISED_COLOUR = "#d62728"

# d2f pipeline: how a block's state is drawn under its positions
BLOCK_COLOURS = {
    "full": "#111111",  # active, fully activated
    "semi": "#111111",  # active, semi-activated (drawn dashed)
    "to_cache": "#ff8c00",
    "in_cache": "#9e9e9e",
}
BLOCK_LABELS = {
    "full": "active, fully activated",
    "semi": "active, semi-activated",
    "to_cache": "finished, to cache",
    "in_cache": "in KV cache",
}


def block_kind(state: str, fully_activated: bool) -> str:
    """full | semi | to_cache | in_cache: the four looks of a d2f block."""
    if state == "active":
        return "full" if fully_activated else "semi"
    return state
