"""Training data: JSONL in three shapes, rendered with the model's chat template and tokenised.

- {"prompt": ..., "response": ...} (optional "system" and "prefill": text appended to the rendered
  prompt, e.g. "<reasoning>", so training prompts end exactly where inference prompts end)
- {"messages": [{"role": ..., "content": ...}, ...]}: the last message is the assistant's response
- {"question": ..., "answer": ...}: GSM8K style; "reasoning #### 42" becomes the EvoToken recipe's
  "<reasoning>reasoning</reasoning>\n<answer>\\boxed{42}</answer>" under the recipe's system prompt.

The prompt is tokenised on its own, exactly as at inference; the response gets the end-of-turn token
and is padded with EOS (trained too, as in LLaDA's SFT) so the model learns to fill the tail with EOS.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import ConfigError, DataError
from evotok_cli.base.files import read_text
from evotok_cli.runtime import tokenizer as tok

EVOTOKEN_SYSTEM_PROMPT = (
    "\nRespond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n"
    "\\boxed{...}\n</answer>\n"
)


@dataclass
class Example:
    prompt_ids: list[int]
    response_ids: list[int]  # answer + end-of-turn (EOS padding is added by the collator)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class DataStats:
    lines: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [f"{self.used} examples from {self.lines} lines"]
        parts += [f"{n} skipped ({why})" for why, n in sorted(self.skipped.items())]
        return ", ".join(parts)


def _gsm8k_response(answer: str, where: str) -> str:
    if "####" not in answer:
        raise DataError("a GSM8K-style answer needs '#### <final answer>'", where=where,
                        fix='end "answer" with "#### 42", or use {"prompt", "response"}')
    reasoning, final = answer.rsplit("####", 1)
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()  # drop GSM8K's calculator annotations
    return f"<reasoning>{reasoning}</reasoning>\n<answer>\\boxed{{{final.strip()}}}</answer>"


def render(item: Any, tokenizer: Any, where: str) -> tuple[str, str]:
    """(rendered prompt, response text) of one JSON line. Every prompt goes through `render_messages`, the
    path generate and serve take: the data's text stays text (`protect`), the template renders sandboxed
    within its time budget, and a template that refuses the line's messages names the line."""
    try:
        return _render(item, tokenizer, where)
    except ConfigError as exc:  # the chat template's raise_exception() on this line's messages
        raise DataError(exc.what, where=where, fix=f"change the line so that the chat template ({exc.where}) "
                        "accepts its messages") from None


def _render(item: Any, tokenizer: Any, where: str) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise DataError("expected a JSON object", where=where, fix='write {"prompt": ..., "response": ...}')
    chat = tok.has_chat_template(tokenizer)
    if "messages" in item:
        msgs = item["messages"]
        well_formed = isinstance(msgs, list) and len(msgs) >= 2 and all(
            isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in msgs)
        if not well_formed:
            raise DataError("messages must be a list of {role, content} with at least two turns", where=where,
                            fix="end with the assistant turn to train on")
        if msgs[-1]["role"] != "assistant":
            raise DataError("the last message must be the assistant's", where=where, fix="end with the response turn")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise DataError("no user turn before the assistant's response", where=where,
                            fix='add a {"role": "user", "content": ...} message the response answers')
        _not_empty({f"messages[{i}].content": m["content"] for i, m in enumerate(msgs) if m["role"] != "system"},
                   where)
        if not chat:
            raise DataError("chat data needs a tokenizer with a chat template", where=where,
                            fix='use {"prompt", "response"} lines')
        return tok.render_messages(tokenizer, msgs[:-1], chat=True), msgs[-1]["content"]
    if "question" in item and "answer" in item:
        if not isinstance(item["question"], str) or not isinstance(item["answer"], str):
            raise DataError("question and answer must be strings", where=where, fix="fix the line")
        _not_empty({"question": item["question"], "answer": item["answer"]}, where)
        prompt = tok.render_prompt(tokenizer, EVOTOKEN_SYSTEM_PROMPT + "\n\n" + item["question"], chat=chat)
        return prompt, _gsm8k_response(item["answer"], where)
    if "prompt" in item and "response" in item:
        for key in ("prompt", "response", "system", "prefill"):
            if key in item and not isinstance(item[key], str):
                raise DataError(f"{key} must be a string", where=where, fix="fix the line")
        _not_empty({"prompt": item["prompt"], "response": item["response"]}, where)
        prompt = tok.render_prompt(tokenizer, item["prompt"], chat=chat, system=item.get("system"),
                                   prefill=item.get("prefill", ""))
        return prompt, item["response"]
    keys = ", ".join(sorted(item)) or "none"
    raise DataError(f"unrecognised line (keys: {keys})", where=where,
                    fix='use {"prompt", "response"}, {"messages": [...]} or {"question", "answer"}')


def _not_empty(texts: dict[str, str], where: str) -> None:
    """A turn with no text teaches nothing (an empty response trains only the end-of-turn token, an empty
    prompt answers nothing): refused, with the line."""
    for name, text in texts.items():
        if not text.strip():
            raise DataError(f"{name} is empty", where=where, fix="write the text, or remove the line")


def load_examples(path: str | Path, tokenizer: Any, *, eot_id: int | None, max_length: int,
                  min_response: int = 1, skip_invalid: bool = False) -> tuple[list[Example], DataStats]:
    p = Path(path).expanduser()
    # missing, a folder, a link loop or non-UTF-8 bytes (with the line they are on): one line each
    text = read_text(p, what="training data", fix="pass a JSONL file").removeprefix("\ufeff")
    if tokenizer is None:
        raise DataError("the model has no tokenizer", where=str(p), fix="train a model folder with tokenizer.json")
    stats = DataStats()
    examples: list[Example] = []
    # newlines only: a JSON string may hold U+2028 and other characters that splitlines() breaks on
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        stats.lines += 1
        where = f"{p}:{number}"
        try:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON ({exc.msg})", where=where, fix="one JSON object per line") from None
            except RecursionError:
                raise DataError("invalid JSON (nested too deeply)", where=where,
                                fix="one JSON object per line") from None
            prompt, response = render(item, tokenizer, where)
        except DataError as exc:
            if not skip_invalid:
                raise DataError(exc.what, where=exc.where,
                                fix=(exc.fix + "; " if exc.fix else "") + "or pass --skip-invalid") from None
            stats.skipped["invalid"] += 1
            continue
        prompt_ids = tok.encode(tokenizer, prompt)
        # the response is data too: a control token typed in it stays text (the end of turn is added below)
        response_ids = tok.encode(tokenizer, tok.protect(tokenizer, response), add_special_tokens=False)
        if eot_id is not None and tok.has_chat_template(tokenizer):
            response_ids.append(eot_id)
        example = Example(prompt_ids, response_ids)
        if example.length > max_length:
            stats.skipped["longer than --max-length"] += 1
        elif len(response_ids) < min_response:
            stats.skipped["response shorter than the minimum"] += 1
        else:
            examples.append(example)
    stats.used = len(examples)
    if not examples:
        raise DataError(f"no usable examples ({stats.summary()})", where=str(p),
                        fix="check the format, or raise --max-length")
    return examples, stats
