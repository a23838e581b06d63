"""Token ids as short, visible text: whitespace drawn as symbols so a cell never looks empty by accident."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

MASK_LABEL = "[MASK]"
# other control characters in caret notation (^V), which every font can draw
_VISIBLE = str.maketrans({**{chr(c): f"^{chr(c + 64)}" for c in range(32)}, "\x7f": "^?",
                          " ": "␣", "\n": "⏎", "\t": "⇥"})


class TokenText:
    """`label(id)`: the token's text when a tokenizer is given, else its id; [MASK] for the mask id."""

    def __init__(self, tokenizer: Any | None, mask_id: int):
        self.tokenizer, self.mask_id = tokenizer, mask_id
        self.size = len(tokenizer) if tokenizer is not None else 0
        self.label = lru_cache(maxsize=None)(self._label)

    @property
    def has_text(self) -> bool:
        return self.tokenizer is not None

    def _label(self, token: int) -> str:
        if token == self.mask_id:
            return MASK_LABEL
        if self.tokenizer is None or not 0 <= token < self.size:
            return str(token)
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        return text.translate(_VISIBLE) if text else f"#{token}"
