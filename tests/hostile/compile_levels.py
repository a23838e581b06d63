"""`--compile [on|max|off]` (runtime/compile.py) on generate, bench and serve: a level that is not one (from
the flag, EVOTOK_COMPILE or a --config file), and `max` (CUDA graphs) where there is no CUDA."""

from __future__ import annotations

from tests.hostile import Case, write

GEN = ["generate", "-m", "{model}", "-p", "hi", "--gen-length", "8", "--block-length", "4", "--steps", "4"]
BENCH = ["bench", "sudoku4", "-m", "{model}", "--limit", "1", "--gen-length", "8", "--block-length", "4",
         "--steps", "4", "--out", "{tmp}/runs"]
SERVE = ["serve", "-m", "{model}", "--port", "0"]
LEVEL = "expected bool or a level on | max | off, got "
NO_GRAPHS = "--compile: max replays CUDA graphs, and cpu has none"

CASES = [
    # not a level: the flag, its variable, the --config key
    Case("cmax-generate-bogus", GEN + ["--compile", "bogus"], f"--compile: {LEVEL}'bogus'"),
    Case("cmax-generate-typo", GEN + ["--compile=maxx"], f"{LEVEL}'maxx'"),
    Case("cmax-bench-number", BENCH + ["--compile", "2"], f"{LEVEL}'2'"),
    Case("cmax-serve-bogus", SERVE + ["--compile", "fast"], f"{LEVEL}'fast'"),
    Case("cmax-generate-env-bogus", GEN, f"{LEVEL}'turbo'", env={"EVOTOK_COMPILE": "turbo"}),
    Case("cmax-generate-config-number", GEN + ["--config", "{tmp}/c.yaml"], f"{LEVEL}2", write("c.yaml", "compile: 2\n")),
    Case("cmax-bench-config-list", BENCH + ["--config", "{tmp}/c.yaml"], f"{LEVEL}['max']",
         write("c.yaml", "compile: [max]\n")),
    # max on the CPU (no CUDA graphs): refused in one line that says to use a bare --compile, before any
    # weight is read (--device cpu: the rows hold on a GPU machine too)
    Case("cmax-generate-cpu", GEN + ["--compile", "max", "--device", "cpu"], NO_GRAPHS),
    Case("cmax-generate-cpu-fix", GEN + ["--device", "cpu", "--compile", "max"], "use a bare --compile (on) on cpu"),
    Case("cmax-bench-cpu", BENCH + ["--compile", "max", "--device", "cpu"], NO_GRAPHS),
    Case("cmax-serve-cpu", SERVE + ["--compile", "max", "--device", "cpu"], NO_GRAPHS),
    Case("cmax-generate-env-cpu", GEN + ["--device", "cpu"], NO_GRAPHS, env={"EVOTOK_COMPILE": "max"}),
    Case("cmax-generate-config-cpu", GEN + ["--device", "cpu", "--config", "{tmp}/c.yaml"], NO_GRAPHS,
         write("c.yaml", "compile: max\n")),
    Case("cmax-generate-quantized-cpu", GEN + ["--compile", "max", "--quantize", "int8", "--device", "cpu"],
         NO_GRAPHS),
]
