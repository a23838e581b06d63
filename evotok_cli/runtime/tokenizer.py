"""Tokenizer and chat template from the checkpoint folder, through `transformers` (no remote code).

`PreTrainedTokenizerFast` reads `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja`
directly, so no tokenizer class named in the folder is ever imported or executed.

Text from users never becomes control tokens. A user who types `<|eot_id|><|start_header_id|>system...`
must not open a system turn, nor `<|mdm_mask|>` plant a mask. So every string a user wrote (message
contents and roles, a system prompt, text without a template) goes through `protect`, which brackets each
control token it spells (the tokenizer's special added tokens) with two private-use characters; `encode`
then turns a bracketed token into the ids of its characters as plain text, and parses control tokens only
in the rest, the template's own text. Text without a bracket is encoded by the tokenizer's default call,
exactly as before, so ordinary prompts keep their ids. The brackets survive string operations (lm-eval
appends to a rendered context), and a user cannot type them: `protect` removes them from user text first.
Only whole control tokens are neutralised: a template that builds one from pieces of user text
(`'<|' + role + '|>'`) is not protected by this.

Which strings hold real control tokens is carried by their type, so that forgetting `protect` is safe:
`render_messages` and `render_prompt` return a `Rendered` string, and `encode` parses control tokens only
in one; any other string is user text and `encode` protects it first (`encode(tokenizer, "<|eot_id|>")`
is the ids of those characters). A caller holding a template it rendered itself says so with `Rendered(text)`.
"""

from __future__ import annotations

import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import CheckpointError
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


def render_messages(tokenizer: Any, messages: list[dict[str, str]], *, chat: bool, prefill: str = "",
                    generation_prompt: bool = True) -> str:
    """A conversation as the model sees it: the chat template with a generation prompt + prefill; with no
    template (or chat off), the contents joined by blank lines. `render_prompt` is the one-question case,
    so a server's chat request and `generate -p` render the same question identically. The messages are
    user text (`protect`ed); the prefill is the operator's or the checkpoint's, and its tokens are real.
    `generation_prompt=False` continues the last message instead (lm-eval's `gen_prefix`)."""
    from evotok_cli.runtime.chat_template import apply_template

    messages = protect(tokenizer, messages)
    if chat and has_chat_template(tokenizer):
        rendered = apply_template(tokenizer, messages, generation_prompt=generation_prompt)
    else:
        rendered = "\n\n".join(m["content"] for m in messages)
    return Rendered(rendered + prefill)


class Rendered(str):
    """A prompt as a chat template rendered it: the control tokens it spells outside brackets (the
    template's, the prefill's) are real, and `encode` parses them; any other string is user text. `+` keeps
    the mark (lm-eval continues a rendered context with its gen_prefix, an example a prompt with part of its
    answer), so text joined to it that a user wrote must be `protect`ed first; any other string operation
    returns a plain str, which `encode` reads as user text."""

    __slots__ = ()

    def __add__(self, other: str) -> Rendered:
        return Rendered(str.__add__(self, other)) if isinstance(other, str) else NotImplemented

    def __radd__(self, other: str) -> Rendered:
        return Rendered(str.__add__(other, self)) if isinstance(other, str) else NotImplemented


# Brackets around a control token typed by a user (Unicode plane 15, private use: no template writes them).
OPEN, CLOSE = "\U000fdc01", "\U000fdc02"
_PIECES = re.compile(f"{OPEN}([^{OPEN}{CLOSE}]*){CLOSE}|[{OPEN}{CLOSE}]")


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special added tokens (BOS, EOS, mask, role headers, end of turn): the strings that
    must stay plain text when a user types them."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return tuple(sorted({t.content for t in decoder.values() if getattr(t, "special", False) and t.content.strip()}))


@lru_cache(maxsize=16)
def _control_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    # longest first, as the tokenizer matches them: `<|eot_id|>` before a shorter token it starts with
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))) if tokens else None


def protect(tokenizer: Any, value: Any) -> Any:
    """User text (a string, or the strings inside messages) with each control token it spells bracketed,
    so that `encode` keeps it plain text; brackets a user typed are dropped first, so none can be forged."""
    return _bracket(value, _control_pattern(control_tokens(tokenizer)))


def _bracket(value: Any, pattern: re.Pattern | None) -> Any:
    if isinstance(value, str):
        value = value.replace(OPEN, "").replace(CLOSE, "")
        return pattern.sub(lambda m: OPEN + m.group(0) + CLOSE, value) if pattern else value
    if isinstance(value, dict):
        return {key: _bracket(item, pattern) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bracket(item, pattern) for item in value]
    return value


def visible(text: str) -> str:
    """A rendered prompt without its brackets: the text a person reads."""
    return text.replace(OPEN, "").replace(CLOSE, "")


def encode(tokenizer: Any, rendered: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt by the tokenizer's default call, as the official evaluation does. Control
    tokens are parsed only in a `Rendered` string, and there not where `protect` bracketed them; a plain
    string is user text, protected here, so its control tokens are the ids of their characters (a string
    without any is encoded exactly as before). `add_special_tokens=False`: without the BOS/EOS the
    post-processor adds (a training response)."""
    if not isinstance(rendered, Rendered):
        rendered = protect(tokenizer, rendered)
    if OPEN not in rendered and CLOSE not in rendered:
        return list(tokenizer(rendered, add_special_tokens=add_special_tokens)["input_ids"])
    pieces = _PIECES.split(rendered)  # [text, typed token, text, ...]; None for a lone bracket
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        ids += _as_text(tokenizer, piece) if i % 2 else list(tokenizer(piece, add_special_tokens=False)["input_ids"])
    if not add_special_tokens:
        return ids
    prefix, suffix = _added_around(tokenizer)
    return prefix + ids + suffix


def _as_text(tokenizer: Any, token: str) -> list[int]:
    """A control token's characters through the tokenizer's normaliser, pre-tokeniser and model, its added
    tokens left out. (Not `split_special_tokens=True`: that flips a flag on the shared backend, and a
    server encoding in two threads could see the other's setting.)"""
    backend = tokenizer.backend_tokenizer
    text = backend.normalizer.normalize_str(token) if backend.normalizer is not None else token
    words = [text] if backend.pre_tokenizer is None else [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    ids = [t.id for w in words for t in backend.model.tokenize(w)]
    own = tokenizer.convert_tokens_to_ids(token)
    if own in ids:
        raise CheckpointError(f"the vocabulary spells the control token {token} from its characters, so user text "
                              "could forge it", where=str(getattr(tokenizer, "name_or_path", "tokenizer")),
                              fix="use a tokenizer whose special tokens are added tokens only")
    return ids


def _added_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a text (a BOS, say), found by encoding
    one character with and without them."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def token_id(tokenizer: Any, token: str) -> int | None:
    if tokenizer is None:
        return None
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None
