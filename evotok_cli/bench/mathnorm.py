"""MATH answer equivalence as the protocol scores it: the Hendrycks-MATH string normalisation applied to
both sides, then plain string equality (spec 3.3), in our words.

The steps run in the reference's order, because their order changes results (spaces are removed only
after the "x =" prefix rule has looked at them). A step that fails (a bare "\\sqrt" at the end, an
"a/b" whose parts are not integers, two unit markers) makes `is_equiv` fall back to comparing the raw
strings, as the reference's catch-all does; those failures are raised, not hidden, on purpose.
"""

from __future__ import annotations

from collections.abc import Callable


def drop_line_breaks(s: str) -> str:
    return s.replace("\n", "")


def drop_negative_spaces(s: str) -> str:
    """`\\!` is a thin negative space in LaTeX."""
    return s.replace("\\!", "")


def single_backslashes(s: str) -> str:
    return s.replace("\\\\", "\\")


def plain_fracs(s: str) -> str:
    """`\\tfrac` and `\\dfrac` are typographic variants of `\\frac`."""
    return s.replace("tfrac", "frac").replace("dfrac", "frac")


def drop_left_right(s: str) -> str:
    return s.replace("\\left", "").replace("\\right", "")


def drop_degrees(s: str) -> str:
    return s.replace("^{\\circ}", "").replace("^\\circ", "")


def drop_dollars(s: str) -> str:
    return s.replace("\\$", "")


def drop_units(s: str) -> str:
    """Whatever follows `\\text{ ` is a unit in MATH's answers; more than one such marker is an error."""
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise ValueError("more than one '\\text{ ' unit marker")
    return parts[0]


def drop_percent(s: str) -> str:
    return s.replace("\\%", "")


def leading_zeros(s: str) -> str:
    """" .5" and "{.5" get their 0, and so does a string starting with "."."""
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    return "0" + s if s.startswith(".") else s


def drop_short_assignment(s: str) -> str:
    """"x = 5" -> " 5": with exactly one "=", a left side of at most two characters is a variable name."""
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0]) <= 2:
        return parts[1]
    return s


def brace_sqrt(s: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}` (one character); a `\\sqrt` with nothing after it is an error."""
    pieces = s.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        if piece[0] == "{":  # IndexError on a bare trailing \sqrt, like the reference
            out += "\\sqrt" + piece
        else:
            out += "\\sqrt{" + piece[0] + "}" + piece[1:]
    return out


def drop_spaces(s: str) -> str:
    return s.replace(" ", "")


def brace_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`; braced fractions stay. A `\\frac`
    followed by a single character leaves the whole string unchanged; one at the very end is an error."""
    pieces = s.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if piece[0] == "{":  # IndexError on a bare trailing \frac, like the reference
            out += piece
            continue
        if len(piece) < 2:
            return s
        numerator, second, rest = piece[0], piece[1], piece[2:]
        if second == "{":
            out += "{" + numerator + "}" + second + rest
        else:
            out += "{" + numerator + "}{" + second + "}" + rest
    return out


def half_as_frac(s: str) -> str:
    return "\\frac{1}{2}" if s == "0.5" else s


def slash_as_frac(s: str) -> str:
    """"3/4" -> `\\frac{3}{4}` when both sides are plain integers. With exactly one "/" around parts that
    are not integers ("x/2") the reference's int() raises, and the whole comparison falls back to the raw
    strings; we raise too."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    numerator, denominator = int(parts[0]), int(parts[1])  # ValueError for non-integers, on purpose
    if s != f"{numerator}/{denominator}":  # " 3/4", "03/4", "+3/4" stay as written
        return s
    return "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"


STEPS: tuple[Callable[[str], str], ...] = (
    drop_line_breaks, drop_negative_spaces, single_backslashes, plain_fracs, drop_left_right, drop_degrees,
    drop_dollars, drop_units, drop_percent, leading_zeros, drop_short_assignment, brace_sqrt, drop_spaces,
    brace_fracs, half_as_frac, slash_as_frac,
)


def normalize(answer: str) -> str:
    """Hendrycks' `strip_string`: every step in order; an empty string stops after the leading-zero step."""
    s = answer
    for step in STEPS:
        s = step(s)
        if step is leading_zeros and not s:
            return s
    return s


def is_equiv(candidate: str | float | None, reference: str | float | None) -> bool:
    """Equal after normalisation; raw string equality when normalising either side fails."""
    if isinstance(candidate, float) or isinstance(reference, float):
        try:
            return abs(float(candidate) - float(reference)) < 1e-6  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
    if candidate is None or reference is None:
        return candidate is None and reference is None
    try:
        return normalize(candidate) == normalize(reference)
    except Exception:  # the reference's catch-all: any failing step means raw equality
        return candidate == reference
