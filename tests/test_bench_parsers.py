"""The protocol's answer rules (spec 3.3) on hand-written generations: one test per rule, quirks included."""

from __future__ import annotations

import math
import time

import pytest

from evotok_cli.bench import mathnorm as m
from evotok_cli.bench.parsers import (
    countdown_correct,
    countdown_expression,
    evaluate_arithmetic,
    gsm8k_reference,
    last_boxed,
    last_boxed_only,
    math_candidate,
    math_correct,
    number_correct,
    parse_number_answer,
    uses_exactly,
)


# -- GSM8K / SVAMP -------------------------------------------------------------------------------
@pytest.mark.parametrize("generation, expected", [
    ("so \\boxed{12} and later \\boxed{13}", 12.0),  # the FIRST box, not the last
    ("\\boxed{} \\boxed{...} \\boxed{ .. } \\boxed{7}", 7.0),  # empty and dots-only boxes are skipped
    ("\\boxed{x = 42 apples}", 42.0),  # not a float: its first number
    ("\\boxed{-3.5 m}", -3.5),
    ("\\boxed{abc} then \\boxed{5}", 5.0),  # a box without a number is skipped
    ("\\boxed{1,000}", 1.0),  # "1,000" is not a Python float: first number, 1
    ("\\boxed{1e1}", 10.0),  # but Python's float() syntax is accepted
    ("\\boxed{\\frac{1}{2}}", 1.0),  # content stops at the first "}": "\frac{1"
    ("\\boxed{ 18 }", 18.0),
])
def test_number_first_box(generation, expected):
    assert parse_number_answer(generation) == expected


def test_number_box_does_not_cross_lines():
    assert parse_number_answer("\\boxed{12\n} <answer>9</answer>") == 9.0


@pytest.mark.parametrize("generation, expected", [
    ("<answer> 17 </answer>", 17.0),  # float of the whole block
    ("<answer>The total is 5, then 8 left</answer>", 8.0),  # else its LAST number
    ("<answer>\n-4\n</answer>", -4.0),  # the block spans lines
    ("<answer>3</answer> <answer>4</answer>", 3.0),  # the first block
    ("<answer>no number</answer>", None),
    ("<answer>   </answer>", None),
    ("plain text 42", None),  # no box, no block: nothing
    ("\\boxed{...} <answer>6</answer>", 6.0),  # only placeholder boxes: fall back to the block
])
def test_number_answer_block_fallback(generation, expected):
    assert parse_number_answer(generation) == expected


def test_number_equality_is_exact():
    assert number_correct(18.0, 18.0)
    assert not number_correct(18.000001, 18.0)
    assert not number_correct(None, 18.0)
    assert not number_correct(None, None)
    assert not number_correct(float("nan"), float("nan"))
    assert not number_correct(parse_number_answer("\\boxed{1,000}"), 1000.0)


@pytest.mark.parametrize("answer, expected", [
    ("He has 6 + 12 = 18.\n#### 18", 18.0),
    ("#### $1,000", 1000.0),
    ("####2.50", 2.5),
    ("#### 2,125", 2125.0),
    ("The temperature is 2 - 5 = -3\n#### -3", None),  # no minus sign in the reference regex
    ("no marker 18", None),
])
def test_gsm8k_reference(answer, expected):
    assert gsm8k_reference(answer) == expected


# -- boxes ----------------------------------------------------------------------------------------
def test_last_box_brace_balanced():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"


def test_box_with_space_wins_even_before_a_later_brace_box():
    assert last_boxed("so \\boxed 5$ done") == "5"
    assert last_boxed("\\boxed{3} and \\boxed 7") == "7"
    assert last_boxed("\\boxed 7 and \\boxed{9}") == "7 and \\boxed{9}"


def test_fbox_is_found_but_not_unwrapped():
    assert last_boxed_only("answer \\fbox{4}") == "\\fbox{4}"
    assert last_boxed("answer \\fbox{4}") == "\\fbox{4}"
    assert not math_correct(math_candidate("answer \\fbox{4}"), "4")


def test_no_box_returns_the_text_itself_and_unbalanced_none():
    text = "no box here"
    assert last_boxed(text) is text
    assert last_boxed("\\boxed{1 + (2") is None


def test_synthetic_scorers_keep_their_contract():
    from evotok_cli.bench.tasks.bundled import Arith, Countdown3, Sudoku4

    assert Sudoku4().score("no box", "1234|3412|2143|4321") == (None, False)
    grid = "1234|3412|2143|4321"
    assert Sudoku4().score(f"\\boxed{{{grid}}}", grid) == (grid, True)
    assert Arith().score("<answer>\\boxed{17}</answer>", 17.0) == (17.0, True)
    assert Countdown3().score("\\boxed{(3+5)*2}", [[3, 5, 2], 16]) == ("(3+5)*2", True)


# -- MATH500 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("generation, expected", [
    ("\\boxed{1} ... \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the LAST box
    ("The answer is 5.", "The answer is 5."),  # no box: the whole generation
    ("\\boxed{1 + <answer>2</answer>", "2"),  # unbalanced: the first <answer> block
    ("\\boxed{1 + (2", None),  # unbalanced, no block: nothing
    ("\\boxed{} <answer> 3 </answer>", "3"),  # empty: the block
    ("text \\boxed{}", ""),  # empty, no block: the empty candidate
])
def test_math_candidate(generation, expected):
    assert math_candidate(generation) == expected


def test_math_correct_uses_normalised_equality():
    assert math_correct(math_candidate("so \\boxed{\\dfrac12}"), "\\frac{1}{2}")
    assert math_correct(math_candidate("\\boxed{x = 0.5}"), "\\frac{1}{2}")
    assert not math_correct(math_candidate("\\boxed{3}"), "4")
    assert not math_correct(None, "4")


# -- MATH normalisation, one step at a time ----------------------------------------------------------
@pytest.mark.parametrize("step, given, expected", [
    (m.drop_line_breaks, "1\n2", "12"),
    (m.drop_negative_spaces, "3\\!000", "3000"),
    (m.single_backslashes, "\\\\frac", "\\frac"),
    (m.plain_fracs, "\\dfrac{1}{2}+\\tfrac{3}{4}", "\\frac{1}{2}+\\frac{3}{4}"),
    (m.drop_left_right, "\\left(1,2\\right)", "(1,2)"),
    (m.drop_degrees, "90^\\circ", "90"),
    (m.drop_degrees, "90^{\\circ}", "90"),
    (m.drop_dollars, "\\$5", "5"),
    (m.drop_units, "5\\text{ cm}", "5"),
    (m.drop_units, "5\\text{cm}", "5\\text{cm}"),  # only "\text{ " (with a space) marks a unit
    (m.drop_percent, "50\\%", "50"),
    (m.leading_zeros, ".5", "0.5"),
    (m.leading_zeros, "x .5", "x 0.5"),
    (m.leading_zeros, "{.5}", "{0.5}"),
    (m.drop_short_assignment, "x = 5", " 5"),
    (m.drop_short_assignment, "ab=5", "5"),
    (m.drop_short_assignment, "abc = 5", "abc = 5"),  # left side longer than two characters
    (m.drop_short_assignment, "a=b=c", "a=b=c"),  # more than one "="
    (m.brace_sqrt, "\\sqrt3", "\\sqrt{3}"),
    (m.brace_sqrt, "2\\sqrt{3}", "2\\sqrt{3}"),
    (m.drop_spaces, "1 + 2", "1+2"),
    (m.brace_fracs, "\\frac12", "\\frac{1}{2}"),
    (m.brace_fracs, "\\frac1{72}", "\\frac{1}{72}"),
    (m.brace_fracs, "\\frac{1}{2}", "\\frac{1}{2}"),
    (m.brace_fracs, "2\\frac1", "2\\frac1"),  # one character after \frac: the string is left alone
    (m.half_as_frac, "0.5", "\\frac{1}{2}"),
    (m.half_as_frac, "0.50", "0.50"),
    (m.slash_as_frac, "3/4", "\\frac{3}{4}"),
    (m.slash_as_frac, "1/2/3", "1/2/3"),
    (m.slash_as_frac, "+3/4", "+3/4"),  # int() accepts "+3" but the text must read back the same
])
def test_normalisation_step(step, given, expected):
    assert step(given) == expected


@pytest.mark.parametrize("step, given, error", [
    (m.drop_units, "1\\text{ a}2\\text{ b}", ValueError),
    (m.brace_sqrt, "2\\sqrt", IndexError),
    (m.brace_fracs, "2\\frac", IndexError),
    (m.slash_as_frac, "x/2", ValueError),
])
def test_normalisation_step_failures(step, given, error):
    with pytest.raises(error):
        step(given)


def test_normalise_runs_the_steps_in_order():
    assert m.normalize("x = \\dfrac12") == "\\frac{1}{2}"
    assert m.normalize(" .5") == "\\frac{1}{2}"  # leading zero, spaces, then 0.5 -> 1/2
    assert m.normalize("\\left( 3, \\sqrt2 \\right)") == "(3,\\sqrt{2})"
    assert m.normalize("10\\%") == "10"
    assert m.normalize("") == ""


def test_is_equiv_falls_back_to_raw_equality():
    assert m.is_equiv("x/2", "x/2")  # normalising "x/2" fails: raw strings compared
    assert not m.is_equiv("x/2", "\\frac{x}{2}")
    assert m.is_equiv("\\frac{1}{2}", "0.5")
    assert m.is_equiv("1/2", "\\frac12")
    assert not m.is_equiv(None, "1")
    assert m.is_equiv(None, None)
    assert m.is_equiv(0.5, "0.5000000001")  # a float on either side: numeric, 1e-6


# -- Countdown ------------------------------------------------------------------------------------
@pytest.mark.parametrize("generation, expected", [
    ("<reasoning>..</reasoning><answer>\\boxed{3 + 5 * 2}</answer>", "3 + 5 * 2"),
    ("\\boxed{(8 \\times 3) \\div 2}", "(8 * 3) / 2"),
    ("\\boxed{8 \\cdot 3}", "8 * 3"),
    ("\\boxed{3 + 5 = 8}", "3 + 5"),  # "<expr>=<number>": the left side
    ("\\boxed{3+5= }", "3+5"),  # the right side may be just a space
    ("3 * 4", "3 * 4"),  # no box: the whole generation
    ("\\boxed{1 + (2 <answer>1+2</answer>", "1+2"),  # unbalanced: the first <answer> block
    ("oops \\boxed{1 + (2", "oops \\boxed{1 + (2"),  # unbalanced, no block: the whole generation
    ("\\boxed{}", ""),  # an empty box stays empty (no fallback for Countdown)
])
def test_countdown_expression(generation, expected):
    assert countdown_expression(generation) == expected


@pytest.mark.parametrize("expression, numbers, target, expected", [
    ("3 + 5 * 2", [3, 5, 2], 13, True),
    ("5 * 2 + 3", [2, 3, 5], 13, True),  # any order
    ("3 + 5 * 2 + 0", [3, 5, 2], 13, False),  # an extra number
    ("3 + 5 * 2", [3, 5, 2, 1], 13, False),  # a number left unused
    ("2 * 2 + 3", [2, 2, 3], 7, True),  # the multiset: both 2s used
    ("2 * 3 + 3", [2, 2, 3], 9, False),  # 3 twice, one 2 missing
    ("3 + 5 * 2", [3, 5, 2], 16, False),  # wrong value
    ("2**3", [2, 3], 8, True),  # Python arithmetic, as the reference's eval
    ("1/3", [1, 3], 0.333334, True),  # within 1e-5
    ("1/3", [1, 3], 0.3334, False),  # not within 1e-5
    ("5 / (3 - 3)", [5, 3, 3], 0, False),  # division by zero: infinity
    ("abs(3 - 5)", [3, 5], 2, False),  # a name: not arithmetic
    ("3(5)", [3, 5], 15, False),  # a call: not arithmetic
])
def test_countdown_correct(expression, numbers, target, expected):
    assert countdown_correct(expression, numbers, target) is expected


def test_countdown_counts_decimals_as_integers():
    assert uses_exactly("2.5 * 2", [2, 5, 2])
    assert not uses_exactly("2.5 * 2", [2, 2])


def test_restricted_evaluation():
    assert evaluate_arithmetic(" (1 + 2) * 3 ") == 9
    assert evaluate_arithmetic("7 // 2") == 3
    assert evaluate_arithmetic("-3 + +4") == 1
    assert math.isinf(evaluate_arithmetic("__import__('os')"))
    assert math.isinf(evaluate_arithmetic("1 +"))
    assert math.isinf(evaluate_arithmetic("05 + 1"))  # leading zeros are a syntax error in Python
    start = time.perf_counter()
    assert math.isinf(evaluate_arithmetic("99**99**99"))  # would run for ever as exact integers
    assert time.perf_counter() - start < 1
