"""Answer extraction and correctness rules of the EvoToken / d1 evaluation (spec 3.3), in our words.

The paper's numbers come out of these exact rules, so the reference behaviour is reproduced quirks
included; each quirk is named where it happens. The MATH string normalisation lives in `mathnorm`.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any

from evotok_cli.bench.mathnorm import is_equiv

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# -- GSM8K and SVAMP -----------------------------------------------------------------------------
# Non-greedy and without DOTALL: the content runs to the first "}" and never crosses a line break.
_BOX_TO_FIRST_BRACE = re.compile(r"\\boxed{(.*?)}")
_NUMBER = re.compile(r"-?\d+\.?\d*")
_ONLY_DOTS = re.compile(r"\.+")
# The reference answer after "####": digits, commas and decimals, an optional "$"; no minus sign, so a
# negative reference parses to None and that item can never be scored correct (kept on purpose).
_GSM8K_REFERENCE = re.compile(r"####\s*\$?([\d,]+(?:\.\d+)?)")


def _python_float(text: str) -> float | None:
    """Python's float(): "1,000" fails (the rule then takes the first number, 1), while "1e3", "inf"
    and "1_000" parse, exactly as in the reference."""
    try:
        return float(text)
    except ValueError:
        return None


def _first_or_last_number(text: str, last: bool) -> float | None:
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return float(numbers[-1] if last else numbers[0])


def parse_number_answer(generation: str) -> float | None:
    """GSM8K / SVAMP: the first usable \\boxed{} (float of it, else its first number), else the first
    <answer> block (float of it, else its last number)."""
    for raw in _BOX_TO_FIRST_BRACE.findall(generation):
        content = raw.strip()
        if not content or _ONLY_DOTS.fullmatch(content):
            continue  # "\boxed{}" and "\boxed{...}" are the prompt's placeholders, not answers
        value = _python_float(content)
        if value is None:
            value = _first_or_last_number(content, last=False)
        if value is not None:
            return value
    tag = ANSWER_TAG.search(generation)
    if tag is None:
        return None
    content = tag.group(1).strip()
    if not content:
        return None
    value = _python_float(content)
    return value if value is not None else _first_or_last_number(content, last=True)


def number_correct(value: float | None, target: float | None) -> bool:
    """Exact float equality, no tolerance (a missing reference is never matched)."""
    return value is not None and target is not None and value == target


def gsm8k_reference(answer: str) -> float | None:
    """The float after '####' in a GSM8K answer, commas dropped; None when absent or negative."""
    found = _GSM8K_REFERENCE.search(answer)
    if found is None:
        return None
    return _python_float(found.group(1).replace(",", ""))


# -- boxes (Hendrycks' helpers, used by MATH500 and Countdown) ------------------------------------
def last_boxed_only(text: str) -> str | None:
    """The last box *with* its wrapper, as the Hendrycks helper finds it.

    - If "\\boxed " (with a space) occurs anywhere it wins, even over a later \\boxed{...}: the answer is
      what follows the last "\\boxed " up to the next "$".
    - Else the last "\\boxed" (or, without one, the last "\\fbox") up to its balancing "}".
    - No box at all: the whole text comes back (the same object). An unbalanced box: None.
    """
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
    if start < 0:
        return text
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def unbox(boxed: str) -> str:
    """Strip the wrapper found by `last_boxed_only`.

    "\\boxed X" -> "X" and "\\boxed{X}" -> "X". Anything else comes back unchanged, which includes
    "\\fbox{X}" (the reference finds \\fbox boxes but never unwraps them, so they cannot match) and a
    text without a box. Raises ValueError where the reference's assertion fails (a "\\boxed " inside a
    box that does not start with it)."""
    if "\\boxed " in boxed:
        if not boxed.startswith("\\boxed "):
            raise ValueError(f"box does not start with '\\boxed ': {boxed[:40]!r}")
        return boxed[len("\\boxed "):]
    if boxed.startswith("\\boxed{") and boxed.endswith("}"):
        return boxed[len("\\boxed{"):-1]
    return boxed


def last_boxed(text: str) -> str | None:
    """Content of the last box; the text itself (same object) when it has no box; None when the box is
    unbalanced or malformed."""
    found = last_boxed_only(text)
    if found is None:
        return None
    try:
        return unbox(found)
    except ValueError:
        return None


def first_answer_block(text: str) -> str | None:
    tag = ANSWER_TAG.search(text)
    return tag.group(1).strip() if tag else None


# -- MATH500 ---------------------------------------------------------------------------------------
def math_candidate(generation: str) -> str | None:
    """The last box's content; when it is unbalanced, malformed or empty, the first <answer> block.
    Without any box the whole generation is the candidate (it then almost never matches)."""
    candidate = last_boxed(generation)
    if not candidate:
        block = first_answer_block(generation)
        if block is not None:
            candidate = block
    return candidate


def math_correct(candidate: str | None, answer: str) -> bool:
    return candidate is not None and is_equiv(candidate, answer)


# -- Countdown -------------------------------------------------------------------------------------
# "<expr>=<number>": keep the left side. The right side may hold digits, dots and spaces only.
_EQUATION = re.compile(r"([0-9+\-*/() ]+)=[0-9. ]+")
_INTEGER = re.compile(r"\d+")
# Characters an expression may hold before it is evaluated ("$" also matches before a final newline).
_ARITHMETIC_CHARS = re.compile(r"^[\d+\-*/().\s]+$")


def countdown_expression(generation: str) -> str:
    """The expression a Countdown answer proposes.

    The last box's content (no box: the whole generation; an unbalanced or malformed box: the first
    <answer> block, else the whole generation; an empty box stays empty), LaTeX operators made Python
    ones, and of "<expr>=<number>" only the left side."""
    found = last_boxed_only(generation)
    try:
        if found is None:
            raise ValueError("unbalanced box")
        expression = unbox(found)
    except ValueError:
        block = first_answer_block(generation)
        expression = block if block is not None else generation
    expression = expression.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
    equation = _EQUATION.search(expression)
    if equation:
        expression = equation.group(1).strip()
    return expression


def uses_exactly(expression: str, numbers: list[int]) -> bool:
    """Every integer literal of the expression, as a multiset, equals the given numbers: each one used
    exactly once and nothing else (a decimal such as 2.5 counts as the integers 2 and 5)."""
    used = sorted(int(n) for n in _INTEGER.findall(expression))
    return used == sorted(int(n) for n in numbers)


class _NotArithmetic(Exception):
    pass


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_HUGE_EXPONENT = 10_000


def _power(base: Any, exponent: Any) -> Any:
    # Python would compute a huge integer power exactly (and could run for ever on 99**99**99); in
    # floating point the result is the same for 0, +-1 and overflows otherwise, which can never match.
    if isinstance(base, int) and isinstance(exponent, int) and abs(exponent) > _HUGE_EXPONENT:
        return float(base) ** float(exponent)
    return base ** exponent


def _evaluate_node(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate_node(node.left), _evaluate_node(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate_node(node.operand))
    raise _NotArithmetic(type(node).__name__)


def evaluate_arithmetic(expression: str) -> Any:
    """The value Python's arithmetic gives the expression, or infinity for anything that is not plain
    arithmetic over numbers (other characters, syntax errors, division by zero, calls such as "2(3)")."""
    if not _ARITHMETIC_CHARS.match(expression):
        return math.inf
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        return _evaluate_node(tree.body)
    except (SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, _NotArithmetic):
        return math.inf


def countdown_correct(expression: str, numbers: list[int], target: float | None) -> bool:
    """Valid iff the numbers are used exactly once each; correct iff the value is within 1e-5 of target."""
    if target is None or not uses_exactly(expression, numbers):
        return False
    try:
        return bool(abs(evaluate_arithmetic(expression) - target) < 1e-5)
    except (TypeError, ValueError, OverflowError):
        return False
