"""Issue 31's inputs: --threads and EVOTOK_THREADS on every compute command, each refused in one line before
a model loads (and, for serve, before the port is bound); hub ids that the local cache lacks, and downloads
that cannot happen."""

from __future__ import annotations

from tests.hostile import Case, write

GEN = ["generate", "-m", "{model}", "-p", "hi", "--gen-length", "8", "--block-length", "4", "--steps", "4"]
BENCH = ["bench", "sudoku4", "-m", "{model}", "--limit", "1", "--out", "{tmp}/out"]
FT = ["finetune", "{tmp}/d.jsonl", "-m", "{model}", "--out", "{tmp}/run", "--max-steps", "1"]
DATA = write("d.jsonl", '{"prompt": "hi", "response": "there"}\n')
HUB = {"HF_HUB_CACHE": "hub", "HF_HUB_OFFLINE": "1"}  # a cache folder (relative: inside the case) with nothing

CASES = [
    Case("h31-threads-zero", [*GEN, "--threads", "0"], "--threads: threads must be >= 1, got 0"),
    Case("h31-threads-negative", [*GEN, "--threads", "-2"], "--threads: threads must be >= 1, got -2"),
    Case("h31-threads-text", [*GEN, "--threads", "many"], "--threads"),
    Case("h31-threads-env-text", GEN, "EVOTOK_THREADS: threads must be a whole number >= 1, got 'x'",
         env={"EVOTOK_THREADS": "x"}),
    Case("h31-threads-env-zero", GEN, "EVOTOK_THREADS: threads must be a whole number >= 1, got '0'",
         env={"EVOTOK_THREADS": "0"}),
    Case("h31-threads-env-fraction", GEN, "got '1.5'", env={"EVOTOK_THREADS": "1.5"}),
    Case("h31-bench-threads-zero", [*BENCH, "--threads", "0"], "--threads: threads must be >= 1, got 0"),
    Case("h31-bench-threads-env", BENCH, "EVOTOK_THREADS: threads must be a whole number", env={"EVOTOK_THREADS": "-1"}),
    Case("h31-finetune-threads-zero", [*FT, "--threads", "0"], "--threads: threads must be >= 1, got 0", DATA),
    Case("h31-finetune-threads-env", FT, "EVOTOK_THREADS: threads must be a whole number", DATA,
         env={"EVOTOK_THREADS": "two"}),
    Case("h31-serve-threads-zero", ["serve", "-m", "{model}", "--threads", "0"], "--threads"),
    Case("h31-serve-threads-env", ["serve", "-m", "{model}", "--port", "0"], "EVOTOK_THREADS",
         env={"EVOTOK_THREADS": "none"}),
    # hub ids: nothing cached (offline) is one line naming the download command
    Case("h31-hub-model-not-cached", ["generate", "-m", "org/absent", "-p", "hi"], "evotok download org/absent",
         env=HUB),
    Case("h31-hub-adapter-not-cached", ["generate", "--adapter", "org/absent", "-p", "hi"],
         "--adapter: no local folder org/absent and no Hugging Face adapter", env=HUB),
    Case("h31-hub-info-not-cached", ["info", "org/absent"], "no Hugging Face model org/absent", env=HUB),
    Case("h31-hub-bench-not-cached", ["bench", "sudoku4", "-m", "org/absent", "--limit", "1", "--out", "{tmp}/out"],
         "evotok download org/absent", env=HUB),
    Case("h31-hub-download-offline", ["download", "org/name"], "HF_HUB_OFFLINE is set", env=HUB),
    Case("h31-hub-download-not-an-id", ["download", "a/b/c"], "'a/b/c' is not a Hugging Face id"),
    Case("h31-hub-download-dotdot", ["download", "../x"], "is not a Hugging Face id"),
    # evotok chat: its flags are refused before the model loads (and before a line is read)
    Case("h31-chat-log-folder", ["chat", "-m", "{model}", "--log", "{tmp}"], "--log"),
    Case("h31-chat-threads-zero", ["chat", "-m", "{model}", "--threads", "0"], "--threads: threads must be >= 1"),
    Case("h31-chat-decoder-unknown", ["chat", "-m", "{model}", "-d", "nope"], "unknown decoder 'nope'"),
    Case("h31-chat-opt-unknown", ["chat", "-m", "{model}", "--opt", "nonsense=1"], "nonsense"),
    Case("h31-chat-model-missing", ["chat", "-m", "{tmp}/none"], "does not exist"),
    # a prompts file's conversations (what `evotok chat --log` writes)
    Case("h31-prompts-file-messages-text", ["generate", "-m", "{model}", "--prompts-file", "{tmp}/p.jsonl"],
         'p.jsonl:1: "messages" must be a non-empty list', write("p.jsonl", '{"messages": "hi"}\n')),
    Case("h31-prompts-file-messages-role", ["generate", "-m", "{model}", "--prompts-file", "{tmp}/p.jsonl"],
         '"messages" must be a non-empty list', write("p.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n')),
    Case("h31-prompts-file-messages-empty", ["generate", "-m", "{model}", "--prompts-file", "{tmp}/p.jsonl"],
         "p.jsonl:2:", write("p.jsonl", '"hi"\n{"messages": []}\n')),
    Case("h31-info-system-threads-env", ["info", "--system"], "EVOTOK_THREADS: threads must be a whole number",
         env={"EVOTOK_THREADS": "all"}),
]
