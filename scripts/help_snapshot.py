"""Save what a refactor must not change, or compare against a saved snapshot: `evotok <command> --help` for
every command and subcommand, and the tokens `evotok generate --json` decodes over a matrix of decoders, cache
modes, temperatures and seeds on the bundled model.

Why: the code is refactored from time to time (issue 29); the CLI's help text is a user-facing contract and the
decoded tokens are the faithfulness contract, so a refactor must leave every help page byte-identical and every
token, text and NFE equal. Usage:

    python scripts/help_snapshot.py save /tmp/before
    ... refactor ...
    python scripts/help_snapshot.py diff /tmp/before     # exit 1 and a unified diff if anything changed

Each page is produced by the real console entry point in a subprocess with COLUMNS=120, as a user sees it;
each decode is `python -m evotok_cli generate` in a subprocess (fp32, CPU, one thread: deterministic).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def command_paths() -> list[tuple[str, ...]]:
    """Every command path of the CLI, found by walking the click tree (the root is the empty path)."""
    import typer.main

    from evotok_cli.cli.app import app

    root = typer.main.get_command(app)
    paths: list[tuple[str, ...]] = []

    def walk(cmd: Any, path: tuple[str, ...]) -> None:  # typer vendors its own click: duck-type groups
        paths.append(path)
        for name in sorted(getattr(cmd, "commands", None) or {}):
            walk(cmd.commands[name], (*path, name))

    walk(root, ())
    return paths


def help_text(path: tuple[str, ...]) -> str:
    """The help page exactly as `evotok <path> --help` prints it (stdout, then stderr if any)."""
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}
    code = "from evotok_cli.cli.app import main; main()"
    done = subprocess.run([sys.executable, "-c", code, *path, "--help"], capture_output=True, text=True, env=env,
                          check=False)
    return done.stdout + (f"\n[stderr]\n{done.stderr}" if done.stderr else "") + f"\n[exit {done.returncode}]\n"


PROMPTS = ("2+3=", "Sort 3 1 2:", "Solve the 4x4 sudoku: 1 . . 4 / . 4 1 . / . 1 4 . / 4 . . 1")
DECODES = [(decoder, cache, temperature, seed)
           for decoder, caches in (("hard-mask", ("none", "prefix", "dual")), ("evotoken", ("none", "prefix", "dual")),
                                   ("d2f", (None,)))
           for cache in caches for temperature, seed in ((0.0, 0), (0.7, 3))]
TOKENS = "tokens.json"


def decode(decoder: str, cache: str | None, temperature: float, seed: int) -> list[dict[str, Any]]:
    """token_ids, text and NFE of each prompt, as `evotok generate --json` prints them (timings left out)."""
    argv = [sys.executable, "-m", "evotok_cli", "generate", "--decoder", decoder, "--temperature", str(temperature),
            "--seed", str(seed), "--threads", "1", "--device", "cpu", "--dtype", "float32", "--json"]
    argv += [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    argv += ["--opt", f"cache={cache}"] if cache else []
    env = {key: value for key, value in os.environ.items() if not key.startswith("EVOTOK_")}  # the defaults only
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[2:])} failed:\n{done.stderr}")
    return [{key: row[key] for key in ("token_ids", "text", "nfe")} for row in json.loads(done.stdout)["results"]]


def tokens() -> dict[str, list[dict[str, Any]]]:
    return {f"{decoder} cache={cache} T={temperature} seed={seed}": decode(decoder, cache, temperature, seed)
            for decoder, cache, temperature, seed in DECODES}


def file_name(path: tuple[str, ...]) -> str:
    return "_".join(("evotok", *path)) + ".txt"


def save(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for path in command_paths():
        text = help_text(path)
        if not text.endswith("[exit 0]\n"):  # a snapshot of a traceback would make every later diff pass
            print(f"evotok {' '.join(path)} --help failed:\n{text}", file=sys.stderr)
            return 1
        (folder / file_name(path)).write_text(text)
    (folder / TOKENS).write_text(json.dumps(tokens(), indent=1))
    print(f"saved {len(list(folder.glob('*.txt')))} help pages and {len(DECODES)} decodes into {folder}")
    return 0


def diff(folder: Path) -> int:
    changed = 0
    now = {file_name(path): path for path in command_paths()}
    before = {p.name for p in folder.glob("*.txt")}
    for name in sorted(before - now.keys()):
        print(f"gone: {name}")
        changed += 1
    for name, path in sorted(now.items()):
        new = help_text(path)
        old = (folder / name).read_text() if name in before else ""
        if new != old:
            changed += 1
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       f"before/{name}", f"after/{name}"))
    print(f"{len(now)} help pages, {changed} changed")
    decodes = 0
    if (folder / TOKENS).is_file():
        old, new = json.loads((folder / TOKENS).read_text()), tokens()
        for case in sorted(old.keys() | new.keys()):
            if old.get(case) != new.get(case):
                decodes += 1
                print(f"decode changed: {case}\n  before: {old.get(case)}\n  after:  {new.get(case)}")
        print(f"{len(new)} decodes ({len(PROMPTS)} prompts each), {decodes} changed")
    return 1 if changed or decodes else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["save", "diff"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    return save(args.folder) if args.action == "save" else diff(args.folder)


if __name__ == "__main__":
    raise SystemExit(main())
