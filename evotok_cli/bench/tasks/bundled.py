"""The bundled model's tasks as benchmark tasks: the test split of `training/synthetic.py`'s generators,
and their scorers.

The problems and their answer format stay with the generators (the bundled model is trained on their
train split; the test split must never change). This file poses and scores them: n = --limit or 200
problems of the test split, generator seed 0, the question alone in the chat template (no system
prompt) and the "<reasoning>" prefill, as in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from evotok_cli.base.errors import ConfigError
from evotok_cli.bench.parsers import countdown_correct, countdown_expression, last_boxed, parse_number_answer
from evotok_cli.bench.tasks.base import Doc, GenDefaults, Loaded, Task
from evotok_cli.training.synthetic import GENERATORS, PREFILL

PROTOCOL = "evotok-synthetic/1"
DEFAULT_COUNT = 200
GENERATOR_SEED = 0


def _json_target(value: Any) -> Any:
    """Tuples (countdown3's (numbers, target)) become lists, as they come back from JSON."""
    if isinstance(value, tuple):
        return [_json_target(v) for v in value]
    return value


class BundledTask(Task):
    protocol = PROTOCOL
    prefill = PREFILL
    defaults = GenDefaults(gen_length=48, block_length=16, steps=48, temperature=0.0)
    uses_data = False
    generator: ClassVar[str] = ""

    def load(self, data: Path | None, limit: int | None) -> Loaded:
        if data is not None:
            raise ConfigError(f"{self.name} makes its own test problems and reads no data", where="--data",
                              fix=f"drop --data for {self.name}")
        n = DEFAULT_COUNT if limit is None else limit
        problems = GENERATORS[self.generator].problems("test", n, GENERATOR_SEED)
        docs = [Doc(i, i, p.question, _json_target(p.target)) for i, p in enumerate(problems)]
        return Loaded(docs, f"synthetic:{self.generator}:test:seed{GENERATOR_SEED}", n)


class Sudoku4(BundledTask):
    name = generator = "sudoku4"

    def score(self, generation: str, target: str) -> tuple[str | None, bool]:
        found = last_boxed(generation)
        if found is None or found is generation:
            return None, False
        answer = "".join(found.split())
        return answer, answer == target


class Arith(BundledTask):
    name = generator = "arith"

    def score(self, generation: str, target: float) -> tuple[float | None, bool]:
        value = parse_number_answer(generation)
        return value, value is not None and value == target


class ArithSmall(Arith):
    name = generator = "arith-small"


class Countdown3(BundledTask):
    name = generator = "countdown3"

    def score(self, generation: str, target: tuple[list[int], int]) -> tuple[str, bool]:
        expr = countdown_expression(generation)
        return expr, countdown_correct(expr, target[0], target[1])
