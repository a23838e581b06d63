"""The paper's four tasks under the EvoToken / d1 evaluation protocol (spec 3): zero-shot, the task's system
prompt inside one user message (`system_prompt + "\\n\\n" + question`), the chat template with a generation
prompt, the "<reasoning>" prefill, and the protocol's parsers.

The system prompts are the protocol's strings character for character, typos included: the GSM8K one has a
space after "\\boxed{}." before its newline; the MATH500/SVAMP one ends with a stray `"` and a space after
"</answer>", then a newline; the Countdown instruction runs straight into "Respond in the following
format:" without a newline. Changing any of them changes the paper's numbers.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, ClassVar

from evotok_cli.base.errors import DataError
from evotok_cli.bench import parsers
from evotok_cli.bench.data import task_records
from evotok_cli.bench.tasks.base import Doc, GenDefaults, Loaded, Task

PROTOCOL = "evotoken-d1"

RESPONSE_FORMAT = ("Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
                   "<answer>\n\\boxed{...}\n</answer>")
_SOLVE = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
          "Wrap the final answer in a \\boxed{}.")
GSM8K_SYSTEM_PROMPT = _SOLVE + " \n" + RESPONSE_FORMAT
MATH_SYSTEM_PROMPT = _SOLVE + "\n" + RESPONSE_FORMAT + '" \n'  # shared by MATH500 and SVAMP
COUNTDOWN_SYSTEM_PROMPT = (
    "Using only the provided numbers, create an arithmetic expression that evaluates to exactly the provided "
    "target number. You may use the operations +, -, *, and / as needed, but each number must be used exactly "
    "once. Think step-by-step. After reasoning, provide only your final expression inside \\boxed{} tags "
    "without including an equals sign or the target number. For example: \\boxed{a + b * c}" + RESPONSE_FORMAT)

# The EvoToken release script's settings: block 32, steps = gen_length / 2, temperature 0.5.
PAPER_DEFAULTS = GenDefaults(gen_length=256, block_length=32, steps=128, temperature=0.5)
COUNTDOWN_ITEMS = 256  # the protocol evaluates 256 items of a seed-42 permutation
COUNTDOWN_SEED = 42


class DatasetTask(Task):
    """A task over a fixed data set: local files in the original or Hugging Face layouts, or the hub."""

    protocol = PROTOCOL
    defaults = PAPER_DEFAULTS
    hub: ClassVar[tuple[str, str | None, str] | None] = None  # (path, config, split) for load_dataset
    folders: ClassVar[tuple[str, ...]] = ()  # sub-folders of a --data folder to look in first
    patterns: ClassVar[tuple[str, ...]] = ()  # file globs, in order of preference
    required: ClassVar[tuple[str, ...]] = ()  # fields every item needs
    example: ClassVar[str] = ""  # what to pass to --data, for error messages

    def load(self, data: Path | None, limit: int | None) -> Loaded:
        records, source = task_records(self, data)
        order = self.order(len(records))
        chosen = order if limit is None else order[:limit]
        docs = [self._doc(doc_id, index, records[index], source) for doc_id, index in enumerate(chosen)]
        return Loaded(docs, source, len(order), self.notes(docs))

    def order(self, n: int) -> list[int]:
        """Positions of the source items in evaluation order."""
        return list(range(n))

    def item(self, record: dict[str, Any]) -> tuple[str, Any]:
        """(question, target) of one source item."""
        raise NotImplementedError

    def notes(self, docs: list[Doc]) -> list[str]:
        return []

    def _doc(self, doc_id: int, index: int, record: dict[str, Any], source: str) -> Doc:
        missing = [f for f in self.required if f not in record]
        if missing:
            raise DataError(f"item {index} has no {missing[0]!r} field (has {', '.join(map(str, record)) or 'none'})",
                            where=source, fix=f"{self.name} items need {', '.join(self.required)}; e.g. {self.example}")
        try:
            question, target = self.item(record)
        except (TypeError, ValueError) as exc:
            raise DataError(f"item {index} is malformed ({exc})", where=source,
                            fix=f"{self.name} items need {', '.join(self.required)}; e.g. {self.example}") from None
        return Doc(doc_id, index, question, target)


class NumberAnswerTask(DatasetTask):
    """GSM8K and SVAMP: a number, first box first, compared by exact float equality."""

    def score(self, generation: str, target: Any) -> tuple[float | None, bool]:
        value = parsers.parse_number_answer(generation)
        return value, parsers.number_correct(value, target)


class GSM8K(NumberAnswerTask):
    name = "gsm8k"
    system_prompt = GSM8K_SYSTEM_PROMPT
    hub = ("openai/gsm8k", "main", "test")
    folders = ("gsm8k", "main")
    patterns = ("test.jsonl", "test.json", "test.parquet", "test-*.parquet", "main/test-*.parquet",
                "data/test-*.parquet")
    required = ("question", "answer")
    example = "/path/to/gsm8k/test.jsonl"

    def item(self, record: dict[str, Any]) -> tuple[str, Any]:
        return str(record["question"]), parsers.gsm8k_reference(str(record["answer"]))

    def notes(self, docs: list[Doc]) -> list[str]:
        unparsed = sum(d.target is None for d in docs)
        if not unparsed:
            return []
        return [f"{unparsed} reference answer(s) do not parse (the protocol's '####' regex has no minus sign, "
                "so negative answers become None); those items count as wrong, as in the paper"]

    def reference_target(self, item: dict[str, Any]) -> Any:
        value = item.get("ground_truth")
        return None if value is None else float(value)


class SVAMP(NumberAnswerTask):
    name = "svamp"
    system_prompt = MATH_SYSTEM_PROMPT
    hub = ("ChilleD/SVAMP", None, "test")
    folders = ("svamp", "SVAMP")
    patterns = ("test.jsonl", "test.json", "test.parquet", "test-*.parquet", "data/test-*.parquet", "SVAMP.json")
    required = ("Body", "Question", "Answer")
    example = "/path/to/svamp/SVAMP.json"

    def item(self, record: dict[str, Any]) -> tuple[str, Any]:
        # Body and Question joined with no separator ("...each packHow much..."), as the protocol does
        return str(record["Body"]) + str(record["Question"]), float(record["Answer"])

    def reference_target(self, item: dict[str, Any]) -> Any:
        return float(item["ground_truth"])


class MATH500(DatasetTask):
    name = "math500"
    system_prompt = MATH_SYSTEM_PROMPT
    hub = ("HuggingFaceH4/MATH-500", None, "test")
    folders = ("math500", "MATH-500", "math")
    patterns = ("test.jsonl", "test.json", "test.parquet", "test-*.parquet", "data/test-*.parquet")
    required = ("problem", "answer")
    example = "/path/to/math500/test.jsonl"

    def item(self, record: dict[str, Any]) -> tuple[str, Any]:
        return str(record["problem"]), str(record["answer"])

    def score(self, generation: str, target: Any) -> tuple[str | None, bool]:
        candidate = parsers.math_candidate(generation)
        return candidate, parsers.math_correct(candidate, str(target))

    def extra_scores(self, generation: str, target: Any) -> dict[str, bool]:
        verdict = math_verify_correct(generation, str(target))
        return {} if verdict is None else {"math_verify": verdict}

    def reference_target(self, item: dict[str, Any]) -> Any:
        return str(item.get("ground_truth", ""))


class Countdown(DatasetTask):
    name = "countdown"
    system_prompt = COUNTDOWN_SYSTEM_PROMPT
    hub = None  # the protocol's file (d1 / EvoToken's countdown_cd3_test.jsonl) is not on the hub
    folders = ("countdown",)
    patterns = ("cd3_test.jsonl", "countdown_cd3_test.jsonl", "test.jsonl", "test.json", "test-*.parquet")
    required = ()
    example = "/path/to/countdown/cd3_test.jsonl"

    def order(self, n: int) -> list[int]:
        """A seed-42 random choice of 256 items (all of them, permuted, for the 256-line file), drawn as
        `np.random.seed(42); np.random.choice(n, 256, replace=False)` draws it."""
        import numpy as np
        return np.random.RandomState(COUNTDOWN_SEED).choice(n, min(n, COUNTDOWN_ITEMS), replace=False).tolist()

    def item(self, record: dict[str, Any]) -> tuple[str, Any]:
        if "input" in record and "output" in record:  # the cd3 file: "a,b,c" -> "t"
            numbers = [int(x) for x in str(record["input"]).split(",")]
            target = int(record["output"])
        elif ("nums" in record or "numbers" in record) and "target" in record:  # Hugging Face Countdown sets
            numbers = [int(x) for x in record.get("nums", record.get("numbers"))]
            target = int(record["target"])
        else:
            raise ValueError('expected {"input": "a,b,c", "output": "t"} or {"nums": [...], "target": t}')
        return f"Numbers: {numbers}\nTarget: {target}", [numbers, target]

    def score(self, generation: str, target: Any) -> tuple[str, bool]:
        numbers, value = target
        expression = parsers.countdown_expression(generation)
        return expression, parsers.countdown_correct(expression, numbers, value)

    def reference_target(self, item: dict[str, Any]) -> Any:
        """The [numbers, target] pair; when a file lacks it, read both from the question, as the reference
        scorer does."""
        truth = item.get("ground_truth")
        if isinstance(truth, list) and len(truth) == 2:
            return truth
        question = str(item.get("question", ""))
        numbers = re.search(r"Numbers: \[([\d, ]+)\]", question, re.IGNORECASE)
        target = re.search(r"Target: (\d+)", question, re.IGNORECASE)
        return [[int(n) for n in numbers.group(1).split(",")] if numbers else [],
                int(target.group(1)) if target else None]


def math_verify_correct(generation: str, answer: str) -> bool | None:
    """math-verify's verdict (symbolic equivalence), or None when the package is not installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    main = threading.current_thread() is threading.main_thread()  # its timeouts use signals
    try:
        gold = parse(f"${answer}$", parsing_timeout=5 if main else None)
        found = parse(generation, parsing_timeout=5 if main else None)
        return bool(verify(gold, found, timeout_seconds=5 if main else None))
    except Exception:
        return False
