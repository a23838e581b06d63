"""`evotok generate`'s sampling filters (--top-k, --top-p, --min-p) from flags, variables and --config files,
and d2f's explicit block size, which still has to divide the canvas."""

from __future__ import annotations

from tests.hostile import Case, write

GEN = ["generate", "-m", "{model}", "-p", "hi", "--gen-length", "8", "--block-length", "4", "--steps", "4",
       "--temperature", "1"]
CONFIG = GEN + ["--config", "{tmp}/c.yaml"]


def _flag(id: str, extra: list[str], expect: str) -> Case:
    return Case(f"samp-{id}", GEN + extra, expect)


def _yaml(id: str, text: str, expect: str) -> Case:
    return Case(f"samp-{id}", CONFIG, expect, write("c.yaml", text))


def _env(id: str, env: dict[str, str], expect: str) -> Case:
    return Case(f"samp-{id}", GEN, expect, env=env)


CASES = [
    # --top-p: in (0, 1]
    _flag("top-p-zero", ["--top-p", "0"], "--top-p: top-p must be in (0, 1], got 0.0"),
    _flag("top-p-above-one", ["--top-p", "1.5"], "top-p must be in (0, 1], got 1.5"),
    _flag("top-p-negative", ["--top-p", "-0.2"], "top-p must be in (0, 1], got -0.2"),
    _flag("top-p-nan", ["--top-p", "nan"], "top-p must be in (0, 1], got nan"),
    _flag("top-p-text", ["--top-p", "high"], "--top-p"),
    # --top-k: an integer >= 1
    _flag("top-k-zero", ["--top-k", "0"], "--top-k: top-k must be an integer >= 1, got 0"),
    _flag("top-k-negative", ["--top-k", "-1"], "top-k must be an integer >= 1, got -1"),
    _flag("top-k-fraction", ["--top-k", "2.5"], "--top-k"),
    _flag("top-k-text", ["--top-k", "ten"], "--top-k"),
    # --min-p: in [0, 1]
    _flag("min-p-negative", ["--min-p", "-0.1"], "--min-p: min-p must be in [0, 1], got -0.1"),
    _flag("min-p-above-one", ["--min-p", "1.01"], "min-p must be in [0, 1], got 1.01"),
    _flag("min-p-inf", ["--min-p", "inf"], "min-p must be in [0, 1], got inf"),
    _flag("min-p-text", ["--min-p", "some"], "--min-p"),
    # the same from a --config file
    _yaml("yaml-top-p-range", "top_p: 2\n", "top-p must be in (0, 1], got 2.0"),
    _yaml("yaml-top-k-text", "top_k: ten\n", "top_k: expected int"),
    _yaml("yaml-top-k-bool", "top_k: true\n", "top_k: expected int"),
    _yaml("yaml-min-p-list", "min_p: [0.1]\n", "min_p: expected float"),
    # and from EVOTOK_* variables
    _env("env-top-p-range", {"EVOTOK_TOP_P": "2"}, "top-p must be in (0, 1], got 2.0"),
    _env("env-top-k-zero", {"EVOTOK_TOP_K": "0"}, "top-k must be an integer >= 1, got 0"),
    _env("env-min-p-text", {"EVOTOK_MIN_P": "abc"}, "EVOTOK_MIN_P"),
    # d2f's block size fits the canvas when unset; an explicit one must still divide it
    _flag("d2f-block-explicit", ["-d", "d2f", "--opt", "block_size=5"], "not a multiple of block_size 5"),
    _flag("d2f-block-budget", ["-d", "d2f", "--opt", "max_new_tokens=6", "--opt", "block_size=4"],
          "max new tokens 6 is not a multiple of block_size 4"),
]
