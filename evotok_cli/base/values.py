"""What an option's value may be, checked and written in one place, for command options (`options.option`) and
decoder options (`decoding.api.option`) alike.

Why: both kinds of option declare a numeric range (closed or open at either end, maybe "finite") and both
write it in messages and tables. Before this module the range test was written three times and the range
text four; a bound that reads "(0, 1]" in one error and "> 0" in another, or a check that lets 1.0 through
in one place only, is the kind of drift that a single `Bounds` makes impossible.

`Bounds.contains` is the one range checker; `Bounds.interval` (always "[lo, hi)", with -inf/inf for a
missing end: decoder errors and `evotok decoders --details`) and `Bounds.phrase` ("in [lo, hi]", ">= lo",
"<= hi" or "": command errors) are the one formatter, in its two registers. `format_default` writes a
default as --help shows it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Bounds:
    """A declared numeric range. `max` may name a property of the model instead of a number ("vocab_size"):
    it is then unknown until the model loads (`resolved`), and no upper bound before that."""

    min: float | None = None
    max: float | str | None = None
    min_open: bool = False
    max_open: bool = False
    finite: bool = False

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> Bounds:
        """The bounds a field's metadata declares: `option(...)` stores them under "bounds"; a field made by
        hand with the old flat keys ("min", "max", "min_open", "max_open", "finite") still reads the same."""
        found = meta.get("bounds")
        if isinstance(found, Bounds):
            return found
        return cls(meta.get("min"), meta.get("max"), bool(meta.get("min_open")), bool(meta.get("max_open")),
                   bool(meta.get("finite")))

    @property
    def declared(self) -> bool:
        """Whether there is anything to check at all."""
        return self.min is not None or self.max is not None or self.finite

    @property
    def model_bound(self) -> str | None:
        """The model property that is the upper bound (`max="vocab_size"`), or None."""
        return self.max if isinstance(self.max, str) else None

    def resolved(self, model: Any = None) -> Bounds:
        """These bounds with a model-property `max` replaced by its value on `model` (dropped when there is
        no model yet or it has no such number)."""
        if self.model_bound is None:
            return self
        limit = getattr(model, self.model_bound, None)
        return replace(self, max=limit if isinstance(limit, (int, float)) and not isinstance(limit, bool) else None)

    def below(self, value: float) -> bool:
        """Whether `value` breaks the lower bound (nan breaks every declared bound)."""
        if self.min is None:
            return False
        return not (value > self.min if self.min_open else value >= self.min)

    def above(self, value: float) -> bool:
        """Whether `value` breaks the upper bound (a model-property bound not yet resolved is no bound)."""
        if self.max is None or isinstance(self.max, str):
            return False
        return not (value < self.max if self.max_open else value <= self.max)

    def contains(self, value: float) -> bool:
        """The range check: inside both ends, and finite where declared so."""
        if self.below(value) or self.above(value):
            return False
        return not self.finite or math.isfinite(value)

    def interval(self) -> str:
        """The range as an interval, "[0.0, 1.0)"; a missing end is -inf or inf; "" when nothing is declared."""
        if self.min is None and self.max is None:
            return ""
        lo = "-inf" if self.min is None else self.min
        hi = "inf" if self.max is None else self.max
        return f"{'(' if self.min_open else '['}{lo}, {hi}{')' if self.max_open else ']'}"

    def phrase(self, unit: str = "") -> str:
        """The range as words after "must be": "in [1, 8] minutes", ">= 1", "< 2 and finite", or ""."""
        if self.min is not None and self.max is not None:
            span = f"in {self.interval()}"
        elif self.min is not None:
            span = f"{'>' if self.min_open else '>='} {self.min}"
        elif self.max is not None:
            span = f"{'<' if self.max_open else '<='} {self.max}"
        else:
            span = ""
        parts = [" ".join(p for p in (span, unit) if p), "finite" if self.finite else ""]
        return " and ".join(p for p in parts if p)


def format_default(default: Any) -> str | None:
    """A default as --help and the range errors' examples write it: none for None and False, a list
    comma-separated, a float in its shortest form (0.7, 1e-05)."""
    if default is None or default is False:
        return None
    if isinstance(default, list):
        return ",".join(map(str, default))
    return f"{default:g}" if isinstance(default, float) else str(default)
