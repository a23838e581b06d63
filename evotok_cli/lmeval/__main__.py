"""`python -m evotok_cli.lmeval ARGS`: lm-eval's own command line, with the `evotok` model registered.

lm-eval 0.4.x finds models only in its own table or in modules already imported (`register_model`), and
reads no entry points, so `lm_eval --model evotok` alone cannot see evotok. This runs the same command
line after the import; evotok's user errors end as one `error: ...` line with exit code 2, as in `evotok`.

    python -m evotok_cli.lmeval --model evotok --model_args model=./LLaDA-8B-Instruct,decoder=evotoken,alpha=0.7 \
        --tasks gsm8k --apply_chat_template
"""

from __future__ import annotations

import os
import sys

from evotok_cli.base.errors import EvotokError


def register() -> None:
    """Import the model module, which registers `evotok` (or says in one line that lm-eval is missing)."""
    import evotok_cli.lmeval.model  # noqa: F401


def harness_batch_size(argv: list[str]) -> list[str]:
    """`argv` with `--batch_size N` added when --model_args sets batch_size=N and no --batch_size is given:
    the model uses model_args' value, and lm-eval's header and results then say so too (they printed the
    harness's default, 1)."""
    if any(a == "--batch_size" or a.startswith("--batch_size=") for a in argv):
        return argv
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--model_args" and i + 1 < len(argv) else \
            arg.split("=", 1)[1] if arg.startswith("--model_args=") else None
        if value is None:
            continue
        for pair in value.split(","):
            key, _, number = pair.partition("=")
            if key.strip() == "batch_size" and number.strip().isdigit():
                return [*argv, "--batch_size", number.strip()]
    return argv


def main() -> None:
    """Register the model, then hand sys.argv to lm-eval's command line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.argv = [sys.argv[0], *harness_batch_size(sys.argv[1:])]
    try:
        register()
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except EvotokError as exc:
        print(f"error: {exc.line()}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
