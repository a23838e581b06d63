"""vLLM's POST /tokenize and /detokenize: the token ids a completion request would decode from, and text
back from ids. A `prompt` is encoded as /v1/completions encodes it (raw, no template); `messages` as
/v1/chat/completions does (the chat template with a generation prompt, then the model's prefill), so
`count` is the request's `usage.prompt_tokens`."""

from __future__ import annotations

import json
from typing import Any

from evotok_cli.runtime.prompts import Prompt
from evotok_cli.serve.plan import Served, encode
from evotok_cli.serve.schema import CompletionFields, Fields, bad, check_model, messages_of, text_prompt


def tokenize(body: dict[str, Any], served: Served, *, strict: bool = False) -> tuple[dict[str, Any], list[str]]:
    """vLLM's answer {count, max_model_len, tokens, token_strs}, and the unknown fields it ignored."""
    f = Fields(body, strict=strict)
    check_model(f.string("model"), served.name)
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise bad("send either prompt (a string) or messages", "prompt" if has_prompt else "messages",
                  "invalid_value" if has_prompt else "missing_field")
    if has_prompt:
        fields = CompletionFields(chat=False, prompts=[Prompt(text_prompt(f.raw("prompt")))])
    else:
        fields = CompletionFields(chat=True, prompts=[Prompt(None, messages=messages_of(f.raw("messages"), f))])
    f.neutral("add_special_tokens", (True,), "only true: the ids are those a completion request decodes from")
    f.neutral("add_generation_prompt", (True,), "only true: the ids are those a chat request decodes from")
    names = bool(f.boolean("return_token_strs"))
    f.finish()
    ids = encode(fields, served, served.defaults["prefill"] if fields.chat else "")[0].ids
    tokenizer = served.model.tokenizer
    strs = [tokenizer.convert_ids_to_tokens(i) for i in ids] if names else None
    return {"count": len(ids), "max_model_len": served.model.max_length, "tokens": ids, "token_strs": strs}, f.ignored


def detokenize(body: dict[str, Any], served: Served, *, strict: bool = False) -> tuple[dict[str, Any], list[str]]:
    """vLLM's answer {prompt}: the ids' text, special tokens kept."""
    f = Fields(body, strict=strict)
    check_model(f.string("model"), served.name)
    tokens = f.raw("tokens")
    if tokens is None:
        raise bad("tokens is required", "tokens", "missing_field")
    vocab = served.model.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("tokens must be an array of token ids (integers)", "tokens", "invalid_type")
    wrong = next((t for t in tokens if not 0 <= t < vocab), None)
    if wrong is not None:
        raise bad(f"token id {wrong} is outside the vocabulary (size {vocab})", "tokens")
    f.finish()
    tokenizer = served.model.tokenizer
    if tokenizer is None:
        raise bad("this model has no tokenizer: ids cannot become text", "tokens", "unsupported")
    return {"prompt": tokenizer.decode(tokens)}, f.ignored


def render(body: dict[str, Any], piece: int = 65_536) -> bytes:
    """The answer's JSON (as JSONResponse writes it), a long list a slice at a time: one `json.dumps` of
    millions of ids holds the GIL, so the event loop too, for a second or more even from a worker thread;
    between slices the interpreter lets /health run."""
    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    def value_of(value: Any) -> str:
        if not isinstance(value, list) or len(value) <= piece:
            return dump(value)
        return "[" + ",".join(dump(value[i:i + piece])[1:-1] for i in range(0, len(value), piece)) + "]"

    return ("{" + ",".join(f"{dump(key)}:{value_of(value)}" for key, value in body.items()) + "}").encode()
