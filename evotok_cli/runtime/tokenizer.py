"""Tokenizer and chat template from the checkpoint folder, through `transformers` (no remote code).

`PreTrainedTokenizerFast` reads `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja`
directly, so no tokenizer class named in the folder is ever imported or executed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from evotok_cli.errors import CheckpointError
from evotok_cli.runtime.checkpoint import read_json

# Small JSON files transformers reads beside tokenizer.json: checked first, so that a damaged one is named
# as itself rather than blamed on tokenizer.json.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file()


def load_tokenizer(folder: Path) -> Any:
    """The fast tokenizer of the folder, or None when the checkpoint ships none (use --prompt-ids)."""
    if not has_tokenizer(folder):
        return None
    for name in SIDE_FILES:
        if os.path.lexists(folder / name):
            read_json(folder / name, name)
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer ({exc})", where=str(folder / "tokenizer.json"),
                              fix="repair tokenizer.json / tokenizer_config.json or pass --prompt-ids") from None


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, text: str, *, chat: bool, system: str | None = None, prefill: str = "") -> str:
    """The string the model sees: the chat template with a generation prompt (when there is one) + prefill."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return render_messages(tokenizer, messages, chat=chat, prefill=prefill)


def render_messages(tokenizer: Any, messages: list[dict[str, str]], *, chat: bool, prefill: str = "") -> str:
    """A conversation as the model sees it: the chat template with a generation prompt + prefill; with no
    template (or chat off), the contents joined by blank lines. `render_prompt` is the one-question case,
    so a server's chat request and `generate -p` render the same question identically."""
    if chat and has_chat_template(tokenizer):
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        rendered = "\n\n".join(m["content"] for m in messages)
    return rendered + prefill


def encode(tokenizer: Any, rendered: str) -> list[int]:
    """Token ids of a rendered prompt by the tokenizer's default call, as the official evaluation does."""
    return list(tokenizer(rendered)["input_ids"])


def token_id(tokenizer: Any, token: str) -> int | None:
    if tokenizer is None:
        return None
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None
