"""Docs that agree with the code (issue 31, item 6): every flag a command's --help lists is a row of its
doc's flag table and every row is a flag it has; no doc or README names an evotok flag that does not exist;
demo prompts the bundled model answers wrongly stay out of help texts and docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
# command -> the doc whose "| flag | default | meaning |" table lists its flags
DOC_OF = {"generate": "docs/generate.md", "chat": "docs/chat.md", "bench run": "docs/bench.md",
          "finetune": "docs/finetune.md", "trace": "docs/trace.md", "serve": "docs/serve.md"}
# commands whose --help is their whole reference (few flags, no doc of their own)
HELP_ONLY = {"info", "decoders", "init-model", "data", "download", "bench score", "bench report"}
# flags of other programs that the docs show next to evotok's
EXTERNAL = {"--nproc_per_node", "--num_processes", "--config_file",  # torchrun, accelerate launch
            "--model_args", "--tasks", "--batch_size", "--apply_chat_template", "--fewshot_as_multiturn",
            "--include_path", "--log_samples", "--output_path", "--device", "--limit",  # lm_eval
            "--local-dir",  # huggingface-cli download
            "--address", "--head"}  # ray start
WRONG_DEMOS = ("What is 7 + 8?", "7 + 8 =")  # the bundled model answers these wrongly (18, ...)
PENDING: set[str] = set()  # commands whose doc is being rewritten (their table check is skipped meanwhile)
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][a-zA-Z0-9_-]*)")


def commands() -> dict[str, object]:
    from evotok_cli.cli.app import app

    out = {}

    def walk(cmd, name: str) -> None:
        if hasattr(cmd, "commands"):
            for sub_name, sub in cmd.commands.items():
                walk(sub, f"{name} {sub_name}".strip())
        else:
            out[name] = cmd

    walk(typer.main.get_command(app), "")
    return out


def flags_of(command) -> set[str]:
    return {o for p in command.params for o in p.opts + p.secondary_opts if o.startswith("-")} - {"--help", "-h"}


def table_flags(text: str) -> set[str]:
    """The flags in the first cells of the doc's tables headed `| flag |`."""
    found: set[str] = set()
    inside = False
    for line in text.splitlines():
        if line.startswith("| flag |"):
            inside = True
            continue
        if inside and not line.startswith("|"):
            inside = False
        if inside and not line.startswith("|---"):
            first = line.split("|")[1]
            for token in re.findall(r"`([^`]+)`", first):
                found |= {part for part in re.split(r"[/, ]+", token) if part.startswith("-")}
    return found


def test_every_command_has_a_doc_table_or_is_help_only():
    names = set(commands())
    assert names - set(DOC_OF) - HELP_ONLY == set(), "a new command needs a flag table (DOC_OF) or HELP_ONLY"
    assert set(DOC_OF) | HELP_ONLY <= names


@pytest.mark.parametrize("command", sorted(DOC_OF))
def test_the_doc_table_lists_exactly_the_commands_flags(command):
    if command in PENDING:
        pytest.skip(f"{DOC_OF[command]} is being rewritten")
    have = flags_of(commands()[command])
    listed = table_flags((ROOT / DOC_OF[command]).read_text(encoding="utf-8"))
    assert sorted(have - listed) == [], f"{DOC_OF[command]}'s flag table lacks these flags of `{command}`"
    assert sorted(listed - have) == [], f"{DOC_OF[command]}'s flag table lists flags `{command}` does not have"


def script_flags() -> set[str]:
    """The flags of benchmarks/*.py (their argparse declarations), which docs cite with their results."""
    found: set[str] = set()
    for path in (ROOT / "benchmarks").glob("*.py"):
        found |= set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", path.read_text(encoding="utf-8")))
    return found


def test_no_doc_names_a_flag_that_does_not_exist():
    known = set().union(*(flags_of(c) for c in commands().values())) | script_flags() | EXTERNAL | {"--help"}
    unknown = {}
    for path in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        names = {f for f in FLAG.findall(path.read_text(encoding="utf-8")) if f.startswith("--")}
        if names - known:
            unknown[path.name] = sorted(names - known)
    assert unknown == {}


def test_demo_prompts_are_ones_the_bundled_model_answers():
    from evotok_cli.cli.app import app

    pages = [*(ROOT / "docs").glob("*.md"), *(ROOT / "examples").rglob("README.md"), ROOT / "README.md"]
    texts = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in pages}
    group = typer.main.get_command(app)
    for name, command in commands().items():
        texts[f"evotok {name} --help"] = command.help or ""
    texts["evotok --help"] = group.help or ""
    bad = sorted(where for where, text in texts.items() if any(demo in text for demo in WRONG_DEMOS)
                 and not any(p in where for p in PENDING))
    assert bad == []
