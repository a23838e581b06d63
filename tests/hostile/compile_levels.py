"""`--compile [on|max|off]` (runtime/compile.py) on generate, bench, serve and chat: a level that is not one
(from the flag, EVOTOK_COMPILE or a --config file), and `max` (CUDA graphs) where there is no CUDA. On bench
the word after a bare --compile may be a task (bench/cli.py: compile_before_task): one that is neither a
level nor a task is refused."""

from __future__ import annotations

from tests.hostile import Case, write

GEN = ["generate", "-m", "{model}", "-p", "hi", "--gen-length", "8", "--block-length", "4", "--steps", "4"]
BENCH = ["bench", "sudoku4", "-m", "{model}", "--limit", "1", "--gen-length", "8", "--block-length", "4",
         "--steps", "4", "--out", "{tmp}/runs"]
SERVE = ["serve", "-m", "{model}", "--port", "0"]
CHAT = ["chat", "-m", "{model}", "--gen-length", "8", "--block-length", "4", "--steps", "4"]
BENCH_REST = ["-m", "{model}", "--limit", "1", "--out", "{tmp}/runs"]
LEVEL = "expected bool or a level on | max | off, got "
NO_GRAPHS = "--compile: max replays CUDA graphs, and cpu has none"

CASES = [
    # not a level: the flag, its variable, the --config key
    Case("cmax-generate-bogus", GEN + ["--compile", "bogus"], f"--compile: {LEVEL}'bogus'"),
    Case("cmax-generate-typo", GEN + ["--compile=maxx"], f"{LEVEL}'maxx'"),
    Case("cmax-bench-number", BENCH + ["--compile", "2"], f"{LEVEL}'2'"),
    Case("cmax-serve-bogus", SERVE + ["--compile", "fast"], f"{LEVEL}'fast'"),
    Case("cmax-chat-bogus", CHAT + ["--compile", "bogus"], f"--compile: {LEVEL}'bogus'"),
    Case("cmax-chat-env-bogus", CHAT, f"{LEVEL}'turbo'", env={"EVOTOK_COMPILE": "turbo"}),
    # bench: after a bare --compile, a word that is neither a level nor a task (a task's typo, a level's)
    Case("cmax-bench-task-typo", ["bench", "--compile", "sudoku", *BENCH_REST],
         "got 'sudoku', which is no task either (did you mean the task sudoku4?"),
    Case("cmax-bench-level-typo-first", ["bench", "--compile", "maxx", "sudoku4", *BENCH_REST],
         f"{LEVEL}'maxx', which is no task either"),
    Case("cmax-bench-run-neither", ["bench", "run", "--compile", "fast", "sudoku4", *BENCH_REST],
         "tasks go before --compile, or after --compile=on"),
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
    Case("cmax-chat-cpu", CHAT + ["--compile", "max", "--device", "cpu"], NO_GRAPHS),
    Case("cmax-bench-max-before-task-cpu", ["bench", "--compile", "max", "sudoku4", "--device", "cpu", *BENCH_REST],
         NO_GRAPHS),
    Case("cmax-generate-env-cpu", GEN + ["--device", "cpu"], NO_GRAPHS, env={"EVOTOK_COMPILE": "max"}),
    Case("cmax-generate-config-cpu", GEN + ["--device", "cpu", "--config", "{tmp}/c.yaml"], NO_GRAPHS,
         write("c.yaml", "compile: max\n")),
    Case("cmax-generate-quantized-cpu", GEN + ["--compile", "max", "--quantize", "int8", "--device", "cpu"],
         NO_GRAPHS),
]
