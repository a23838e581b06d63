"""Render a checkpoint's chat template as untrusted code: sandboxed, with a time budget, one-line errors.

A chat template is Jinja code that came with a downloaded folder. `transformers` compiles it in jinja2's
`ImmutableSandboxedEnvironment` (no attribute tricks, no mutation of the messages, `range` capped at
100,000), but the sandbox bounds neither time nor the ways a template can fail. So the render runs under a
deadline enforced by a trace function installed in the rendering thread itself (`sys.settrace`): the
template's compiled code raises as soon as a line runs past the budget. Unlike a signal (main thread
only), this works in any thread, e.g. the server's workers. A single C-level operation (one enormous
string repetition) cannot be interrupted this way; the budget bounds loops, recursion and long messages.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import CheckpointError, ConfigError

BUDGET_S = 2.0  # a real template renders a long conversation in milliseconds
TEMPLATE_FILE = "chat_template.jinja"
JINJA_CODE = "<template>"  # the file name jinja gives the code it compiles from a string


class OutOfTime(BaseException):
    """Raised inside the template's frames at the deadline. A BaseException, so that no `except Exception`
    on the way up (jinja's, transformers') turns it into something else."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise `OutOfTime` in this thread's Python code once `seconds` have passed, then put back whatever
    trace function was there (a debugger's, coverage's). The clock is read on every function call, and on
    every line of the template's own compiled code (where its loops run); tracing the lines of every other
    function too would make each render several times slower."""
    end = time.monotonic() + seconds

    def on_line(frame: Any, event: str, arg: Any) -> Callable | None:
        if time.monotonic() > end:
            raise OutOfTime
        return on_line

    def tracer(frame: Any, event: str, arg: Any) -> Callable | None:
        if time.monotonic() > end:
            raise OutOfTime
        return on_line if frame.f_code.co_filename == JINJA_CODE else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def where(tokenizer: Any) -> str:
    """The file the template came from: chat_template.jinja, or the chat_template key of tokenizer_config.json."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    if (folder / TEMPLATE_FILE).is_file():
        return str(folder / TEMPLATE_FILE)
    return f"{folder / 'tokenizer_config.json'}: chat_template"


def apply_template(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool = True) -> str:
    """The template's text for `messages`: with the assistant's header after them, or (False) continuing
    the last message. Every failure is one line naming the template and how to get past it."""
    import jinja2

    place = where(tokenizer)
    fix = f"repair the chat template in {place}, or pass --no-chat-template"
    try:
        with deadline(BUDGET_S):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                 continue_final_message=not generation_prompt)
    except OutOfTime:
        raise CheckpointError(f"the chat template ran longer than {BUDGET_S:g} s (a loop in the template, or a "
                              "conversation too long for it)", where=place, fix=fix) from None
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"the chat template is not valid Jinja (line {exc.lineno}: {_short(exc)})",
                              where=place, fix=fix) from None
    except jinja2.exceptions.SecurityError as exc:
        raise CheckpointError(f"the chat template tried an operation the sandbox forbids ({_short(exc)})",
                              where=place, fix=fix) from None
    except jinja2.UndefinedError as exc:
        raise CheckpointError(f"the chat template uses an undefined value ({_short(exc)})", where=place,
                              fix=fix) from None
    except (jinja2.TemplateError, ValueError) as exc:
        # raise_exception() in the template (e.g. "roles must alternate"), or transformers' own refusal
        raise ConfigError(f"the chat template refuses these messages ({_short(exc)})", where=place,
                          fix="send messages the template accepts (see its text), or pass --no-chat-template") from None
    except Exception as exc:  # a template's bug: an undefined name, a type error, a recursion
        raise CheckpointError(f"the chat template fails ({type(exc).__name__}: {_short(exc)})", where=place,
                              fix=fix) from None


def _short(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to `limit` characters (a template decides its length)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
