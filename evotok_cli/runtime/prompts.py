"""Prompts from flags or a JSONL file, rendered with the chat template and tokenised."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import ConfigError, DataError
from evotok_cli.base.files import check_text, read_stdin_text, read_text
from evotok_cli.runtime import tokenizer as tok


@dataclass
class Prompt:
    text: str | None  # what the user wrote (None for --prompt-ids)
    ids: list[int] | None = None  # given ids, or filled in by `encode_prompts`
    system: str | None = None
    messages: list[dict[str, str]] | None = None  # a whole conversation (the server's chat requests)
    where: str = "--prompt-ids"  # where given ids came from, for errors: the flag, or a file's line


def parse_ids(text: str, where: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"{text!r} is not a comma-separated list of token ids", where=where,
                          fix="write e.g. --prompt-ids 1,2,3") from None
    if not ids:
        raise ConfigError(f"{text!r} holds no token ids", where=where, fix="write e.g. --prompt-ids 1,2,3")
    if min(ids) < 0:
        raise ConfigError(f"token id {min(ids)} is negative", where=where,
                          fix="token ids are 0 or more, e.g. --prompt-ids 1,2,3")
    return ids


def read_prompts_file(path: str | Path) -> list[Prompt]:
    if str(path) == "-":  # standard input: `... | evotok generate --prompts-file -`
        p, text = Path("<stdin>"), read_stdin_text(what="prompts file")
    else:
        p = Path(path).expanduser()
        text = read_text(p, what="prompts file", fix="pass a UTF-8 JSONL file, one prompt per line, or - for stdin")
    prompts: list[Prompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{number}"
        try:
            item: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg})", where=where,
                            fix="one JSON object or string per line") from None
        if isinstance(item, dict) and "prompt" in item and "prompt_ids" in item:
            raise DataError('both "prompt" and "prompt_ids" given', where=where,
                            fix="keep one of them: text for the chat template, or ids as they are")
        if isinstance(item, str):
            prompts.append(Prompt(check_text(item, where)))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            system = item.get("system")
            if system is not None and not isinstance(system, str):
                raise DataError(f'"system" is {type(system).__name__}, not text', where=where,
                                fix='write e.g. {"prompt": "...", "system": "You are..."}')
            prompts.append(Prompt(check_text(item["prompt"], where),
                                  system=None if system is None else check_text(system, where)))
        elif isinstance(item, dict) and isinstance(item.get("prompt_ids"), list):
            ids = item["prompt_ids"]
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise DataError("prompt_ids must be a non-empty list of token ids", where=where,
                                fix='write e.g. {"prompt_ids": [1, 2, 3]}')
            prompts.append(Prompt(None, ids=list(ids), where=where))
        elif isinstance(item, dict) and "messages" in item:  # a conversation, e.g. a line of `evotok chat --log`
            prompts.append(Prompt(None, messages=_messages(item["messages"], where), where=where))
        else:
            raise DataError("expected a string or an object with \"prompt\", \"prompt_ids\" or \"messages\"",
                            where=where, fix='write e.g. {"prompt": "What is 2+3?"}')
    if not prompts:
        raise DataError("no prompts in file", where=str(p), fix="one JSON object or string per line")
    return prompts


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A prompts file's "messages": a non-empty list of {"role": system|user|assistant, "content": text}."""
    roles = ("system", "user", "assistant")
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str) for m in value):
        raise DataError('"messages" must be a non-empty list of {"role", "content"} objects (roles: system, user, '
                        "assistant)", where=where, fix='write e.g. {"messages": [{"role": "user", "content": "hi"}]}')
    return [{"role": m["role"], "content": check_text(m["content"], where)} for m in value]


def encode_prompts(prompts: list[Prompt], tokenizer: Any, *, chat: bool, vocab_size: int,
                   system: str | None = None, prefill: str = "", mask_id: int | None = None) -> list[Prompt]:
    """Each prompt's ids: text through the chat template (user text stays plain text: `tokenizer.protect`),
    given ids checked. No id may lie outside the vocabulary, and none may be the mask id (`mask_id`): the
    decoder fills every mask position, so a mask inside the prompt would be rewritten as if generated."""
    for prompt in prompts:
        given = prompt.ids is not None
        if not given:
            if tokenizer is None:
                raise ConfigError("this checkpoint has no tokenizer, so text prompts cannot be encoded",
                                  where="--prompt", fix="pass token ids with --prompt-ids 1,2,3")
            if prompt.messages is not None:
                rendered = tok.render_messages(tokenizer, prompt.messages, chat=chat, prefill=prefill)
            else:
                rendered = tok.render_prompt(tokenizer, prompt.text or "", chat=chat, system=prompt.system or system,
                                             prefill=prefill)
            prompt.ids = tok.encode(tokenizer, rendered)
        _check_ids(prompt, given, vocab_size, mask_id)
    return prompts


def _check_ids(prompt: Prompt, given: bool, vocab_size: int, mask_id: int | None) -> None:
    error = ConfigError if prompt.where.startswith("--") else DataError  # a flag, or a prompts file's line
    bad = [i for i in prompt.ids or [] if i >= vocab_size]
    if bad:
        raise error(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})", where=prompt.where,
                    fix=f"use ids below {vocab_size}")
    if mask_id is not None and mask_id in (prompt.ids or []):
        if not given:  # user text cannot spell the mask token: it came from the template or the prefill
            raise ConfigError(f"the prompt encodes to the mask token id {mask_id}", where="--prefill",
                              fix="remove the mask token from the prefill or the chat template")
        raise error(f"token id {mask_id} is the mask token; the decoder would overwrite it as if it were "
                    "generated", where=prompt.where,
                    fix=f"remove id {mask_id} from the prompt (the decoder appends the masks it fills itself)")
