"""The bundled model's tasks as problem generators: deterministic, with test sets disjoint from training
by construction, in the paper's answer format so the protocol's parsers apply unchanged.
`evotok data` writes problems of the train split as training JSONL (`write_training_data`); the bench
tasks of the same names (`bench/tasks/bundled.py`) pose the test split and score the answers.

- `sudoku4`: 4x4 Sudoku with a unique solution. Committing many cells per step creates conflicts (two
  cells of a row both become "3"), which is what revisable soft decoding is meant to avoid. The split is
  by *solution grid*: test grids never occur in training, so the model must solve, not recall.
- `arith`: two- and three-step word problems over small numbers (start 2-20, steps 1-10, x2 or x3 on values
  up to 10); split by the problem's content.
- `arith-small`: the same problems with every value, intermediate and answer within 1..20 (start 2-12,
  steps 1-9), each result written once in the reasoning ("10-5=5, *3=15, -6=9.").
- `countdown3`: Countdown with three numbers from 1 to 9 and targets up to 60, in the cd3 question format;
  split by (numbers, target).

Prompts are short on purpose: the model is trained on these tasks alone, and every prompt token costs
compute on a 2-core CPU without teaching anything.

A problem goes to the test split iff a hash of its split key falls in a fixed 1/N of the hash space, so
any seed, any count and any generator run give disjoint train and test sets.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

ANSWER_FORMAT = "<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n\\boxed{{{answer}}}\n</answer>"
PREFILL = "<reasoning>"


@dataclass(frozen=True)
class Problem:
    question: str
    reasoning: str
    answer: str
    target: Any  # what the scorer compares against
    key: str  # split key

    @property
    def response(self) -> str:
        """The full answer text; the first len(PREFILL) characters are the inference prefill."""
        return ANSWER_FORMAT.format(reasoning=self.reasoning, answer=self.answer)


def in_test_split(key: str, one_in: int) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % one_in == 0


class Generator:
    """Problems of one task, either split, deterministic in (split, seed)."""

    name: str
    one_in: int = 10  # 1/one_in of the problem space is test

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """n distinct problems of the split, deterministic in (split, n, seed)."""
        rng = random.Random(f"{self.name}/{split}/{seed}")
        want_test = split == "test"
        seen: set[str] = set()
        out: list[Problem] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 20 * n + 10000:
                from evotok_cli.base.errors import ConfigError
                raise ConfigError(f"{self.name} has fewer than {n} distinct {split} problems", where="--n",
                                  fix="ask for fewer problems")
            p = self.sample(rng)
            if in_test_split(p.key, self.one_in) != want_test or p.question in seen:
                continue
            seen.add(p.question)
            out.append(p)
        return out

    def stream(self, split: str, seed: int) -> Iterator[Problem]:
        """An endless stream (repeats allowed) for training data."""
        rng = random.Random(f"{self.name}/{split}/stream/{seed}")
        want_test = split == "test"
        while True:
            p = self.sample(rng)
            if in_test_split(p.key, self.one_in) == want_test:
                yield p


# -- sudoku4 -------------------------------------------------------------------------------------
@cache
def all_sudoku4() -> tuple[tuple[int, ...], ...]:
    """All 288 valid 4x4 Sudoku grids, row-major."""
    grids = []
    rows = list(itertools.permutations((1, 2, 3, 4)))
    for r0, r1, r2, r3 in itertools.product(rows, repeat=4):
        g = r0 + r1 + r2 + r3
        cols_ok = all(len({g[c], g[4 + c], g[8 + c], g[12 + c]}) == 4 for c in range(4))
        boxes_ok = all(len({g[4 * r + c], g[4 * r + c + 1], g[4 * (r + 1) + c], g[4 * (r + 1) + c + 1]}) == 4
                       for r in (0, 2) for c in (0, 2))
        if cols_ok and boxes_ok:
            grids.append(g)
    return tuple(grids)


@cache
def _grid_array():
    import numpy as np
    return np.array(all_sudoku4(), dtype=np.int8)  # (288, 16)


def sudoku4_solution_count(clues: tuple[int, ...] | list[int]) -> int:
    import numpy as np
    c = np.asarray(clues, dtype=np.int8)
    return int(((_grid_array() == c) | (c == 0)).all(axis=1).sum())


def grid_text(cells: tuple[int, ...], blank: str = "0") -> str:
    """Rows joined by "|", blanks as "0": every cell is then exactly one token (digits are split one per
    token, while runs of punctuation like ".|." would merge into one), so the puzzle and the answer grid
    have the same token layout and copying a clue is a fixed-offset lookup."""
    return "|".join("".join(str(v) if v else blank for v in cells[4 * r:4 * r + 4]) for r in range(4))


class Sudoku4Generator(Generator):
    name = "sudoku4"
    one_in = 6  # 46 of the 288 grids are test-only
    min_blanks, max_blanks = 6, 10

    def sample(self, rng: random.Random) -> Problem:
        grid = rng.choice(all_sudoku4())
        blanks = rng.randint(self.min_blanks, self.max_blanks)
        clues = list(grid)
        removed = 0
        for cell in rng.sample(range(16), 16):
            if removed == blanks:
                break
            keep = clues[cell]
            clues[cell] = 0
            if sudoku4_solution_count(clues) == 1:
                removed += 1
            else:
                clues[cell] = keep
        puzzle = tuple(clues)
        question = f"Sudoku 4x4 (0 = blank):\n{grid_text(puzzle)}"
        reasoning = f"{puzzle.count(0)} blanks."
        return Problem(question, reasoning, grid_text(grid), grid_text(grid), key=grid_text(grid))


# -- arith ---------------------------------------------------------------------------------------
NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lea", "Max", "Nia",
         "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe")
ITEMS = ("apples", "pens", "books", "coins", "cards", "eggs", "stickers", "marbles", "shells", "cookies",
         "stamps", "beads")


class ArithGenerator(Generator):
    name = "arith"
    one_in = 10
    start_high = 20  # the first value is 2..start_high
    amount_high = 10  # amounts added or taken are 1..amount_high
    cap: int | None = None  # no value (start, intermediate or answer) exceeds cap

    def sample(self, rng: random.Random) -> Problem:
        name, other = rng.sample(NAMES, 2)
        item = rng.choice(ITEMS)
        value = rng.randint(2, self.start_high)
        sentences = [f"{name} has {value} {item}."]
        steps: list[str] = []
        for _ in range(rng.choice((2, 2, 3))):
            kind = rng.choice(("add", "add", "sub", "sub", "mul"))
            factors = tuple(f for f in (2, 3) if value <= 10 and (self.cap is None or value * f <= self.cap))
            can_add = self.cap is None or value < self.cap
            if kind == "mul" and factors:
                factor = rng.choice(factors)
                sentences.append(f"Then the number of {item} becomes {factor} times as many." if rng.random() < .5
                                 else f"Then {name} gets {factor} times as many {item}.")
                steps.append(f"{value}*{factor}={value * factor}.")
                value *= factor
            elif (kind == "sub" and value > 2) or not can_add:  # at the cap only a subtraction stays within it
                amount = rng.randint(1, min(value - 1, self.amount_high))
                sentences.append(rng.choice((f"{name} gives {amount} {item} to {other}.",
                                             f"{name} loses {amount} {item}.",
                                             f"{other} takes {amount} {item} from {name}.")))
                steps.append(f"{value}-{amount}={value - amount}.")
                value -= amount
            else:
                high = self.amount_high if self.cap is None else min(self.amount_high, self.cap - value)
                amount = rng.randint(1, high)
                sentences.append(rng.choice((f"{name} buys {amount} more {item}.",
                                             f"{other} gives {name} {amount} {item}.",
                                             f"{name} finds {amount} {item}.")))
                steps.append(f"{value}+{amount}={value + amount}.")
                value += amount
        sentences.append(f"How many {item} does {name} have now?")
        question = " ".join(sentences)
        return Problem(question, self.chain(steps), str(value), float(value), key=question)

    @staticmethod
    def chain(steps: list[str]) -> str:
        """The reasoning: the steps one after another ("10-5=5. 5*3=15.")."""
        return " ".join(steps)


class ArithSmallGenerator(ArithGenerator):
    """`arith` with every value kept within 1..20 (285 distinct steps), and a reasoning that writes
    each result once: "10-5=5, *3=15, -6=9." instead of "10-5=5. 5*3=15. 15-6=9.".

    Why: in `arith` a result reappears as the next step's first operand, so masked-diffusion training
    mostly rewards copying it, and the bundled model, before its compute runs, learnt exactly that
    (examples/bundled_model/step_probe.py: results right 95 of 95 times with the rest of the answer
    visible, 12 of 95 from the operands alone, the case decoding meets)."""

    name = "arith-small"
    start_high = 12
    amount_high = 9
    cap = 20

    @staticmethod
    def chain(steps: list[str]) -> str:
        """Steps `10-5=5.`, `5*3=15.`, `15-6=9.` become `10-5=5, *3=15, -6=9.`."""
        tails = [step.lstrip("0123456789") for step in steps[1:]]  # drop the first operand: the last result
        return ", ".join(step.rstrip(".") for step in [steps[0], *tails]) + "."


# -- countdown3 ----------------------------------------------------------------------------------
_OPS = ("+", "-", "*", "/")


def _apply(a: int, op: str, b: int) -> int | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a - b > 0 else None
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


class Countdown3Generator(Generator):
    name = "countdown3"
    one_in = 10
    low, high, max_target = 1, 9, 60

    def sample(self, rng: random.Random) -> Problem:
        while True:
            nums = [rng.randint(self.low, self.high) for _ in range(3)]
            a, b, c = nums
            op1, op2 = rng.choice(_OPS), rng.choice(_OPS)
            first = _apply(a, op1, b)
            if first is None:
                continue
            total = _apply(first, op2, c)
            if total is None or not 1 <= total <= self.max_target:
                continue
            inner = f"{a}{op1}{b}"
            expr = f"({inner}){op2}{c}" if op2 in "*/" and op1 in "+-" else f"{inner}{op2}{c}"
            question = f"Numbers: [{a}, {b}, {c}]\nTarget: {total}"
            reasoning = f"{a}{op1}{b}={first}. {first}{op2}{c}={total}."
            key = f"{sorted(nums)}->{total}"
            return Problem(question, reasoning, expr, (nums, total), key=key)


GENERATORS: dict[str, Generator] = {g.name: g for g in (Sudoku4Generator(), ArithGenerator(),
                                                         ArithSmallGenerator(), Countdown3Generator())}


def training_lines(p: Problem, cuts: bool = False) -> list[dict[str, str]]:
    """The problem as one training line; with `cuts`, also one per "=" of its reasoning, the answer up to
    and including that "=" moved into the prefill (the prompt side, never masked in training)."""
    lines = [{"prompt": p.question, "prefill": PREFILL, "response": p.response[len(PREFILL):]}]
    if cuts:
        start = p.response.index(p.reasoning)
        for i, ch in enumerate(p.reasoning):
            if ch == "=":
                cut = start + i + 1
                lines.append({"prompt": p.question, "prefill": p.response[:cut], "response": p.response[cut:]})
    return lines


def data_problems(name: str, split: str, n: int, seed: int) -> list[Problem]:
    """The n problems `evotok data` writes for one task: train reads an endless stream, so small problem
    spaces (countdown3) repeat as epochs would; test gives n distinct problems (the bench's, with seed 0)."""
    if split == "train":
        return list(itertools.islice(GENERATORS[name].stream(split, seed), n))
    return GENERATORS[name].problems(split, n, seed)


def write_training_data(names: list[str], *, split: str, n: int, seed: int, out, cuts: bool = False) -> int:
    """Interleave n problems of each task into a JSONL file of {"prompt", "response", "prefill"}
    (with `cuts`, each problem is followed by its cut copies: see `training_lines`)."""
    import json

    from evotok_cli.base.errors import ConfigError
    from evotok_cli.base.files import atomic_open, output_file

    unknown = [t for t in names if t not in GENERATORS]
    if unknown:
        raise ConfigError(f"unknown synthetic task {unknown[0]!r}", where="evotok data",
                          fix=f"choose from {', '.join(GENERATORS)}")
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}", where="--split", fix="use train or test")
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}", where="--n", fix="e.g. --n 1000")
    path = output_file(out, "--out")
    per_task = [data_problems(t, split, n, seed) for t in names]
    count = 0
    with atomic_open(path) as f:
        for i in range(n):
            for problems in per_task:
                for line in training_lines(problems[i], cuts):
                    f.write(json.dumps(line) + "\n")
                    count += 1
    return count
