"""The bundled model's synthetic tasks as benchmark tasks: the test split of `synthetic.py`'s generators.

The problems, their answer format and their scorers stay in `synthetic.py` (the bundled model is trained
on its train split; the test split must never change). This file only wraps them: n = --limit or 200
problems of the test split, generator seed 0, the question alone in the chat template (no system
prompt) and the "<reasoning>" prefill, as in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from evotok_cli.bench.tasks.base import Doc, GenDefaults, Loaded, Task
from evotok_cli.bench.tasks.synthetic import PREFILL, TASKS
from evotok_cli.errors import ConfigError

PROTOCOL = "evotok-synthetic/1"
DEFAULT_COUNT = 200
GENERATOR_SEED = 0


def _json_target(value: Any) -> Any:
    """Tuples (countdown3's (numbers, target)) become lists, as they come back from JSON."""
    if isinstance(value, tuple):
        return [_json_target(v) for v in value]
    return value


class SyntheticTask(Task):
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
        problems = TASKS[self.generator].problems("test", n, GENERATOR_SEED)
        docs = [Doc(i, i, p.question, _json_target(p.target)) for i, p in enumerate(problems)]
        return Loaded(docs, f"synthetic:{self.generator}:test:seed{GENERATOR_SEED}", n)

    def score(self, generation: str, target: Any) -> tuple[Any, bool]:
        return TASKS[self.generator].score(generation, target)


class Sudoku4(SyntheticTask):
    name = generator = "sudoku4"


class Arith(SyntheticTask):
    name = generator = "arith"


class ArithSmall(SyntheticTask):
    name = generator = "arith-small"


class Countdown3(SyntheticTask):
    name = generator = "countdown3"
