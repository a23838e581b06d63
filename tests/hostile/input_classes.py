"""Input classes of issue 30: seeds outside what torch's generators take, decoder options beyond what the
model allows, YAML and JSON settings files with nulls, lists, booleans, duplicate keys or aliases where
plain values belong, bench samples and results of the wrong JSON types (or counted twice), sweeps that
repeat a value, prompts that are text and ids at once, training rows with no user turn or no text, and a
response window longer than the model's context."""

from __future__ import annotations

import json
import shutil

from tests.hostile import Case, Ctx, both, write
from tests.hostile.finetune import DATA, ft

GEN = ["generate", "-m", "{model}", "-p", "hi", "--gen-length", "8", "--block-length", "4", "--steps", "4"]
BENCH = ["bench", "sudoku4", "-m", "{model}", "--limit", "1", "--gen-length", "8", "--block-length", "4",
         "--steps", "4", "--out", "{tmp}/runs"]
# for --config rows: no flag that would win over the file's value
GEN_BARE = ["generate", "-m", "{model}", "-p", "hi"]
BENCH_BARE = ["bench", "sudoku4", "-m", "{model}", "--out", "{tmp}/runs"]
SEED = "seed must be in [0, 9223372036854775807]"
HUGE = str(2**64)
VOCAB = "above the model's vocab size"


def config(text: str) -> tuple[list[str], object]:
    """`--config {tmp}/c.yaml` and the setup that writes it."""
    return ["--config", "{tmp}/c.yaml"], write("c.yaml", text)


def gen_yaml(case_id: str, text: str, expect: str, *extra: str) -> Case:
    flags, setup = config(text)
    return Case(f"in-yaml-{case_id}", GEN_BARE + list(extra) + flags, expect, setup)


def bench_yaml(case_id: str, text: str, expect: str) -> Case:
    flags, setup = config(text)
    return Case(f"in-yaml-{case_id}", BENCH_BARE + flags, expect, setup)


def ft_yaml(case_id: str, text: str, expect: str) -> Case:
    flags, setup = config(text)
    return Case(f"in-yaml-{case_id}", ft(*flags), expect, both(write("data.jsonl", DATA), setup))


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def model_copy(generation_config: str):
    """A copy of the tiny model whose generation_config.json is `generation_config`."""
    def setup(ctx: Ctx) -> None:
        shutil.copytree(ctx.model, ctx.tmp / "m")
        (ctx.tmp / "m" / "generation_config.json").write_text(generation_config)
    return setup


def on_copy(case_id: str, generation_config: str, expect: str) -> Case:
    argv = ["generate", "-m", "{tmp}/m", "-p", "hi"]
    return Case(f"in-json-{case_id}", argv, expect, model_copy(generation_config))


SAMPLE = {"doc_id": 0, "task": "arith-small", "generation": "\\boxed{4}", "target": 4.0, "correct": True,
          "nfe": 4, "tokens": 8, "seconds": 0.5}


def samples(*lines: dict | str, name: str = "samples_arith-small_hard-mask.jsonl"):
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return write(f"s/{name}", text)


def score(case_id: str, expect: str, *lines: dict | str) -> Case:
    return Case(f"in-score-{case_id}", ["bench", "score", "{tmp}/s"], expect, samples(*lines))


def _result_row(**changes: object) -> dict:
    row = {"task": "sudoku4", "decoder": "hard-mask", "sweep": None, "label": "",
           "settings": {"gen_length": 8, "block_length": 4, "steps": 4, "temperature": 0.0},
           "n": 2, "correct": 0, "accuracy": 0.0, "accuracy_stderr": 0.0, "mean_nfe": 4.0, "tokens_per_nfe": 2.0,
           "tokens_per_second": 10.0, "scores": {}}
    return {**row, **changes}


def report(case_id: str, expect: str, document: dict) -> Case:
    text = json.dumps({"schema": "evotok.bench/1", "model": {"adapter": None}, "best_over_sweep": [], **document})
    return Case(f"in-report-{case_id}", ["bench", "report", "{tmp}/r"], expect, write("r/results.json", text))


def _resumed_with(change: dict):
    """A real one-item bench run in {tmp}/runs whose samples line is then edited by `change`: the rerun
    (a resume) reads it back."""
    def setup(ctx: Ctx) -> None:
        assert ctx.cli(*[a.format(**ctx.vars()) for a in BENCH]).returncode == 0
        path = next((ctx.tmp / "runs").glob("samples_*.jsonl"))
        record = json.loads(path.read_text().splitlines()[0])
        path.write_text(json.dumps({**record, **change}) + "\n")
    return setup


def train_rows(case_id: str, row: dict, expect: str) -> Case:
    return Case(f"in-train-{case_id}", ft(), expect, write("data.jsonl", DATA + json.dumps(row) + "\n"))


CASES = [
    # -- seeds: torch takes 64 bits and rows draw from seed + i, so [0, 2^63 - 1] on every command ----------
    Case("in-seed-generate-2p64", GEN + ["--seed", HUGE], SEED),
    Case("in-seed-generate-negative", GEN + ["--seed", "-1"], SEED),
    Case("in-seed-generate-env", GEN, SEED, env={"EVOTOK_SEED": str(2**70)}),
    gen_yaml("seed-generate", f"seed: {HUGE}\n", SEED),
    Case("in-seed-bench-2p64", BENCH + ["--seed", HUGE], SEED),
    bench_yaml("seed-bench-negative", "seed: -3\n", SEED),
    Case("in-seed-finetune-negative", ft("--seed", "-5"), SEED, write("data.jsonl", DATA)),
    Case("in-seed-finetune-2p64", ft("--seed", HUGE), SEED, write("data.jsonl", DATA)),
    Case("in-seed-data", ["data", "sudoku4", "--n", "2", "--seed", HUGE, "--out", "{tmp}/d.jsonl"], SEED),
    Case("in-seed-data-negative", ["data", "sudoku4", "--n", "2", "--seed", "-1", "--out", "{tmp}/d.jsonl"], SEED),
    Case("in-seed-init-model", ["init-model", "{tmp}/m", "--seed", HUGE], SEED),
    # -- decoder options whose bound is the model's (k_soft <= vocabulary), and their types --------------
    Case("in-opt-k-soft-above-vocab", GEN + ["-d", "evotoken", "--opt", "k_soft=100000"], VOCAB),
    Case("in-opt-k-soft-d2f", GEN + ["-d", "d2f", "--opt", "soft=true", "--opt", "k_soft=301"], VOCAB),
    gen_yaml("k-soft-in-config", "decoder: {k_soft: 100000}\n", VOCAB, "-d", "evotoken"),
    Case("in-opt-k-soft-sweep", BENCH + ["-d", "evotoken", "--sweep", "k_soft=2,1000"], VOCAB),
    gen_yaml("k-soft-bool", "decoder: {k_soft: true}\n", "k_soft=True is not a valid int", "-d", "evotoken"),
    gen_yaml("alpha-list", "decoder: {alpha: [0.5, 0.7]}\n", "is not a valid float", "-d", "evotoken"),
    gen_yaml("alpha-bool", "decoder: {alpha: true}\n", "alpha=True is not a valid float", "-d", "evotoken"),
    gen_yaml("soft-mask-int", "decoder: {soft_mask: 1}\n", "soft_mask=1 is not a valid bool", "-d", "evotoken"),
    gen_yaml("cache-mapping", "decoder: {cache: {a: 1}}\n", "is not one of none, prefix, dual", "-d",
             "evotoken"),
    Case("in-opt-finetune-k-soft-above-vocab", ft("--k-soft", "100000"), "k_soft 100000 is above the model's "
         "vocabulary", write("data.jsonl", DATA)),
    ft_yaml("finetune-k-soft-in-config", "k_soft: 301\n", "k_soft 301 is above the model's vocabulary"),
    # -- YAML settings: nulls, lists and booleans where numbers belong; duplicate keys; aliases ------------
    gen_yaml("gen-length-null", "gen_length: null\n", "gen_length: expected int, got null"),
    gen_yaml("steps-tilde", "steps: ~\n", "steps: expected int, got null"),
    gen_yaml("temperature-list", "temperature: [0.5]\n", "temperature: expected float, got [0.5]"),
    gen_yaml("seed-null", "seed: null\n", "seed: expected int, got null"),
    gen_yaml("batch-size-true", "batch_size: true\n", "batch_size: expected int, got true"),
    gen_yaml("chat-template-int", "chat_template: 1\n", "chat_template: expected bool, got 1"),
    gen_yaml("device-list", "device: [cpu]\n", "device: expected str, got [\"cpu\"]"),
    gen_yaml("duplicate-key", "gen_length: 8\nsteps: 4\ngen_length: 16\n", "duplicate key 'gen_length', first given "
             "on line 1"),
    gen_yaml("duplicate-decoder-key", "decoder:\n  alpha: 0.5\n  alpha: 0.6\n", "duplicate key 'alpha'", "-d",
             "evotoken"),
    gen_yaml("alias-bomb", BOMB, "aliases are not supported"),
    gen_yaml("merge-key-alias", "base: &b {steps: 4}\n<<: *b\n", "aliases are not supported"),
    gen_yaml("nested-too-deeply", "a: " + "[" * 5000 + "\n", "invalid YAML"),
    bench_yaml("bench-limit-list", "limit: [3]\n", "limit: expected int, got [3]"),
    bench_yaml("bench-limit-true", "limit: true\n", "limit: expected int, got true"),
    bench_yaml("bench-duplicate-key", "limit: 1\nlimit: 2\n", "duplicate key 'limit'"),
    bench_yaml("bench-alias", "data: &d x.jsonl\ntasks: [*d]\n", "aliases are not supported"),
    ft_yaml("finetune-lr-null", "lr: null\n", "lr: expected float, got null"),
    ft_yaml("finetune-full-int", "full: 1\n", "full: expected bool, got 1"),
    ft_yaml("finetune-trajectory-steps-true", "trajectory_steps: true\n", "trajectory_steps: expected int, got true"),
    ft_yaml("finetune-counts-bool", "decode_counts: [1, true]\n", "decode_counts: expected a list of numbers"),
    ft_yaml("finetune-duplicate-key", "lr: 0.1\nwarmup: 2\nlr: 0.2\n", "duplicate key 'lr', first given on line 1"),
    # -- the JSON settings a model folder carries (generation_config.json's "evotok") ----------------------
    on_copy("generation-config-duplicate", '{\n "evotok": {\n  "steps": 4,\n  "steps": 8\n }\n}\n',
            "generation_config.json:4: duplicate key 'steps'"),
    on_copy("generation-config-null", '{"evotok": {"gen_length": null}}', "invalid entry 'gen_length'"),
    on_copy("generation-config-bool", '{"evotok": {"steps": true}}', "invalid entry 'steps'"),
    # -- bench score: samples of the wrong JSON types, items counted twice ----------------------------------
    score("doc-id-text", '"doc_id" is text, expected an integer', {**SAMPLE, "doc_id": "0"}),
    score("correct-text", '"correct" is text, expected true or false', {**SAMPLE, "correct": "yes"}),
    score("generation-list", '"generation" is a list, expected text', {**SAMPLE, "generation": ["x"]}),
    score("nfe-negative", '"nfe" is -4, expected an integer >= 0', {**SAMPLE, "nfe": -4}),
    score("target-object", '"target" is an object', {**SAMPLE, "target": {"a": 1}}),
    score("target-wrong-shape", "cannot be scored as a countdown3 answer", {**SAMPLE, "task": "countdown3"}),
    score("duplicate-doc", "doc_id 0 is scored twice (first at", SAMPLE, SAMPLE),
    score("duplicate-doc-later", "doc_id 1 is scored twice", {**SAMPLE, "doc_id": 1}, {**SAMPLE, "doc_id": 2},
          {**SAMPLE, "doc_id": 1}),
    Case("in-score-duplicate-across-rank-files", ["bench", "score", "{tmp}/s"], "doc_id 0 is scored twice",
         both(samples(SAMPLE, name="samples_a.rank0.jsonl"), samples(SAMPLE, name="samples_a.rank1.jsonl"))),
    Case("in-score-official-generations-list", ["bench", "score", "{tmp}/gsm8k_256_0_generations.json"],
         '"generations" is a list, expected text',
         write("gsm8k_256_0_generations.json",
               json.dumps({"generations": [{"question": "q", "generations": ["x"], "ground_truth": 3}]}))),
    Case("in-resume-doc-id-text", BENCH, '"doc_id" is text, expected an integer', _resumed_with({"doc_id": "0"})),
    Case("in-resume-nfe-float", BENCH, '"nfe" is a number, expected an integer', _resumed_with({"nfe": 4.5})),
    # -- bench report: results.json of the wrong JSON types -------------------------------------------------
    report("accuracy-text", 'results[0].accuracy is text, expected a number or null',
           {"results": [_result_row(accuracy="high")]}),
    report("steps-text", "results[0].settings.steps is text, expected an integer >= 0",
           {"results": [_result_row(settings={"gen_length": 8, "block_length": 4, "steps": "4"})]}),
    report("results-object", "results.json.results is an object, expected a list", {"results": {"a": 1}}),
    report("n-negative", "results[1].n is -1, expected an integer >= 0",
           {"results": [_result_row(), _result_row(n=-1)]}),
    report("task-missing", "results[0].task is missing, expected text",
           {"results": [{k: v for k, v in _result_row().items() if k != "task"}]}),
    report("sweep-list-value", "results[0].sweep.alpha is a list, expected a number",
           {"results": [_result_row(sweep={"alpha": [0.5]})]}),
    # -- sweeps that repeat a value ----------------------------------------------------------------------
    Case("in-sweep-duplicate-value", BENCH + ["-d", "evotoken", "--sweep", "alpha=0.5,0.5"],
         "alpha: '0.5' is given twice"),
    Case("in-sweep-same-number", BENCH + ["-d", "evotoken", "--sweep", "alpha=0.5,0.50"],
         "alpha: '0.5' and '0.50' are one value"),
    Case("in-sweep-duplicate-name", BENCH + ["-d", "evotoken", "--sweep", "cache=none,dual,none"],
         "cache: 'none' is given twice"),
    bench_yaml("sweep-duplicate-in-config", "decoders: [evotoken]\nsweep: {alpha: [0.7, 0.7]}\n",
               "alpha: '0.7' is given twice"),
    # -- a prompt given as text and as ids at once ---------------------------------------------------------
    Case("in-prompt-and-ids-row", ["generate", "-m", "{model}", "--prompts-file", "{tmp}/p.jsonl"],
         'both "prompt" and "prompt_ids" given', write("p.jsonl", '{"prompt": "hi", "prompt_ids": [3, 4]}\n')),
    Case("in-prompt-and-ids-later-row", ["generate", "-m", "{model}", "--prompts-file", "{tmp}/p.jsonl"],
         'p.jsonl:2: both "prompt" and "prompt_ids" given',
         write("p.jsonl", '{"prompt": "hi"}\n{"prompt_ids": [3], "prompt": "x"}\n')),
    Case("in-prompt-and-null-ids", ["generate", "-m", "{model}", "--prompts-file", "{tmp}/p.jsonl"],
         'both "prompt" and "prompt_ids" given', write("p.jsonl", '{"prompt_ids": null, "prompt": "x"}\n')),
    # -- training rows with no user turn or no text -----------------------------------------------------
    train_rows("no-user-turn", {"messages": [{"role": "system", "content": "s"},
                                             {"role": "assistant", "content": "a"}]},
               "data.jsonl:7: no user turn before the assistant's response"),
    train_rows("empty-user-turn", {"messages": [{"role": "user", "content": " "},
                                                {"role": "assistant", "content": "a"}]},
               "data.jsonl:7: messages[0].content is empty"),
    train_rows("empty-response", {"prompt": "What is 1+1?", "response": ""}, "data.jsonl:7: response is empty"),
    train_rows("empty-prompt", {"prompt": "\n", "response": "2"}, "data.jsonl:7: prompt is empty"),
    train_rows("empty-answer", {"question": "q?", "answer": ""}, "data.jsonl:7: answer is empty"),
    # -- a response window longer than the model's context (config.json says 256) ---------------------------
    Case("in-train-response-length-beyond-context", ft("--response-length", "100000"),
         "leave no room for a prompt in the model's context of 256 tokens", write("data.jsonl", DATA)),
    Case("in-train-response-length-equal-context", ft("--response-length", "256"),
         "model's context of 256 tokens", write("data.jsonl", DATA)),
    ft_yaml("response-length-in-config", "response_length: 4096\n", "model's context of 256 tokens"),
]
