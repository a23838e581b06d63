"""What a benchmark task is: where its items come from, what the model is shown, how an answer is scored.

Tasks are plugins found through the `evotok.tasks` entry-point group, like decoders: a third-party
package registers a subclass of `Task` (or any class with the same attributes and methods).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

PREFILL = "<reasoning>"


@dataclass(frozen=True)
class Doc:
    """One item to answer. `doc_id` is its position in the evaluation order, the key that sharding,
    resuming and scoring use; `index` is its position in the source (line, row, generator order)."""

    doc_id: int
    index: int
    question: str
    target: Any  # a JSON value the task's scorer compares against


@dataclass(frozen=True)
class GenDefaults:
    """Generation settings a task runs with unless the user overrides them."""

    gen_length: int
    block_length: int
    steps: int
    temperature: float


@dataclass
class Loaded:
    docs: list[Doc]
    source: str  # where the items came from, for results.json
    total: int  # items in the evaluation order before --limit
    notes: list[str] = field(default_factory=list)  # facts worth a line on stderr (protocol quirks hit)


class Task:
    """Base class of benchmark tasks; subclasses set the class attributes and implement load/score."""

    name: ClassVar[str] = ""
    protocol: ClassVar[str] = ""  # which evaluation protocol the prompt and scorer follow
    system_prompt: ClassVar[str | None] = None  # placed inside the user message (the d1 protocol)
    prefill: ClassVar[str] = PREFILL
    defaults: ClassVar[GenDefaults] = GenDefaults(256, 32, 128, 0.0)
    uses_data: ClassVar[bool] = True  # False: the task makes its own items and reads no --data

    def load(self, data: Path | None, limit: int | None) -> Loaded:
        raise NotImplementedError

    def user_message(self, doc: Doc) -> str:
        return f"{self.system_prompt}\n\n{doc.question}" if self.system_prompt else doc.question

    def render(self, tokenizer: Any, doc: Doc) -> str:
        """The prompt string: one user message in the chat template, generation prompt, then the prefill.
        A subclass that renders its own template returns `runtime.tokenizer.Rendered(text)`: a plain str is
        user text, whose control tokens `encode` keeps as text."""
        from evotok_cli.runtime.tokenizer import render_prompt
        return render_prompt(tokenizer, self.user_message(doc), chat=True, prefill=self.prefill)

    def score(self, generation: str, target: Any) -> tuple[Any, bool]:
        """(extracted answer, correct) for one generation."""
        raise NotImplementedError

    def extra_scores(self, generation: str, target: Any) -> dict[str, bool]:
        """Optional second opinions (name -> correct), reported beside the protocol's score."""
        return {}

    def reference_target(self, item: dict[str, Any]) -> Any:
        """The target of one item of an official EvoToken / d1 generations file."""
        return item.get("ground_truth")
