"""Answer extraction and correctness rules of the EvoToken / d1 evaluation (spec 3.3), in our words."""

from __future__ import annotations

import re

_BOXED_FIRST = re.compile(r"\\boxed\{(.*?)\}", re.DOTALL)
_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _to_float(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def parse_number_answer(generation: str) -> float | None:
    """GSM8K / SVAMP rule: the first non-empty, non-dots \\boxed{} content (float, else its first number);
    else the first <answer>...</answer> (float of the whole, else its last number)."""
    for content in _BOXED_FIRST.findall(generation):
        content = content.strip()
        if not content or set(content) <= {"."}:
            continue
        value = _to_float(content)
        if value is not None:
            return value
        numbers = _NUMBER.findall(content)
        if numbers:
            return _to_float(numbers[0])
    tag = _ANSWER_TAG.search(generation)
    if tag:
        content = tag.group(1).strip()
        value = _to_float(content)
        if value is not None:
            return value
        numbers = _NUMBER.findall(content)
        if numbers:
            return _to_float(numbers[-1])
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\boxed ... / \\fbox{...}, brace-balanced (Hendrycks' helper).

    Returns the whole text when there is no box at all (the reference helper's behaviour), and None when
    the last box is unbalanced."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return text
    if text.startswith("\\boxed ", idx):
        rest = text[idx + len("\\boxed "):]
        return rest.split("$")[0].strip()
    depth, start = 0, None
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
            if start is None:
                start = i
        elif text[i] == "}":
            depth -= 1
            if depth == 0 and start is not None:
                return text[start + 1:i]
    return None


def boxed_or_answer(generation: str) -> str:
    """The last box; if it is unbalanced or empty, the first <answer> content; else the whole text."""
    found = last_boxed(generation)
    if found is None or not found.strip():
        tag = _ANSWER_TAG.search(generation)
        if tag:
            return tag.group(1).strip()
        return generation if found is None else found
    return found


_CD_EQUATION = re.compile(r"([0-9+\-*/() ]+)=\s*[0-9.]+")


def countdown_expression(generation: str) -> str:
    expr = boxed_or_answer(generation)
    expr = expr.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
    m = _CD_EQUATION.search(expr)
    if m:
        expr = m.group(1)
    return expr.strip()


def countdown_correct(expression: str, numbers: list[int], target: float) -> bool:
    """Valid iff the expression uses exactly the given numbers (as a multiset) and evaluates to target."""
    used = sorted(int(n) for n in re.findall(r"\d+", expression))
    if used != sorted(int(n) for n in numbers):
        return False
    if not re.fullmatch(r"[\d+\-*/().\s]+", expression):
        return False
    try:
        value = eval(expression, {"__builtins__": None}, {})  # noqa: S307 - only digits/operators pass the check
    except Exception:
        return False
    return abs(float(value) - float(target)) < 1e-5
