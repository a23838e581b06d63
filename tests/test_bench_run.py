"""`evotok bench` end to end on a tiny checkpoint: two decoders and a sweep through the CLI, resuming after
an interruption, sharding over two gloo processes, `score` on official files, `report`, user errors.

A random tiny model scores ~0%: these tests check the plumbing (counts, files, schema, equality of
interrupted / sharded / plain runs); the scoring rules are tested on hand-written text elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evotok_cli.bench.results import comparable
from evotok_cli.bench.runner import BenchRequest, run_bench
from tests.conftest import one_line_error, write_llada

DATA = Path(__file__).parent / "data"
GEN = ["--gen-length", "8", "--block-length", "4", "--steps", "4"]
GEN_SETTINGS = {"gen_length": 8, "block_length": 4, "steps": 4}


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny LLaDA with room for the paper tasks' long prompts (the test tokenizer is character-level-ish)."""
    return write_llada(tmp_path_factory.mktemp("bench") / "llada", tokenizer_dir, max_length=2048)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def request(model: Path, out: Path, **kw) -> BenchRequest:
    base = {"tasks": ["arith"], "decoders": ["hard-mask", "evotoken"], "model": model, "limit": 5,
            "overrides": dict(GEN_SETTINGS), "out": out}
    return BenchRequest(**{**base, **kw})


# -- the CLI, two decoders and a sweep ------------------------------------------------------------
def test_cli_two_decoders_and_a_sweep(cli, model, tmp_path):
    out = tmp_path / "out"
    args = ["bench", "arith", "gsm8k", "-m", str(model), "-d", "hard-mask", "-d", "evotoken",
            "--sweep", "alpha=0.5,0.7", "--data", f"gsm8k={DATA / 'gsm8k/test.jsonl'}", "--limit", "3", *GEN,
            "--out", str(out), "--json"]
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "evotok.bench/1"
    assert json.loads((out / "results.json").read_text()) == doc
    rows = {(r["task"], r["decoder"], r["label"]) for r in doc["results"]}
    assert rows == {(t, d, label) for t in ("arith", "gsm8k")
                    for d, label in (("hard-mask", ""), ("evotoken", "alpha=0.5"), ("evotoken", "alpha=0.7"))}
    for row in doc["results"]:
        assert row["n"] == row["expected"] == 3 and row["complete"]
        assert 0 <= row["accuracy"] <= 100 and row["mean_nfe"] > 0 and row["tokens_per_nfe"] > 0
        assert row["settings"]["gen_length"] == 8 and row["protocol"] in ("evotoken-d1", "evotok-synthetic/1")
        if row["decoder"] == "evotoken":
            assert row["decoder_options"]["alpha"] == row["sweep"]["alpha"]
        for name in row["samples"]:
            records = lines(out / name)
            assert [r["doc_id"] for r in records] == [0, 1, 2]
            assert {"doc_id", "prompt", "generation", "extracted", "target", "correct", "nfe", "tokens",
                    "seconds"} <= set(records[0])
            assert all(r["prompt"].endswith("<reasoning>") and r["tokens"] <= 8 for r in records)
    assert (out / "samples_gsm8k_evotoken_alpha=0.5.jsonl").is_file()
    gsm = lines(out / "samples_gsm8k_hard-mask.jsonl")
    assert [r["target"] for r in gsm] == [18.0, 3.0, 2125.0]
    assert "Wrap the final answer in a \\boxed{}. \n" in gsm[0]["prompt"]
    best = doc["best_over_sweep"]
    assert {(b["task"], b["decoder"]) for b in best} == {("arith", "evotoken"), ("gsm8k", "evotoken")}
    assert all(b["chosen_on"] == "test set" and b["swept"] == {"alpha": [0.5, 0.7]} for b in best)
    assert doc["versions"]["torch"] and doc["versions"]["evotok"]
    assert doc["config"]["sweep"] == {"alpha": ["0.5", "0.7"]}
    assert "hard-mask" in res.stderr and "evotoken" in res.stderr and "chosen on test set" in res.stderr

    # a finished run started again generates nothing and reports the same numbers
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert comparable(json.loads(again.stdout)) == comparable(doc)
    assert all(len(lines(p)) == 3 for p in out.glob("samples_*.jsonl"))


def test_option_first_and_explicit_run_form(cli, model, tmp_path):
    res = cli("bench", "run", "arith", "--limit", "2", "-m", str(model), *GEN, "--out", str(tmp_path / "b"))
    assert res.returncode == 0, res.stderr
    res = cli("bench", "--limit", "2", "-m", str(model), *GEN, "--out", str(tmp_path / "c"), "arith")
    assert res.returncode == 0, res.stderr
    assert comparable(json.loads((tmp_path / "b/results.json").read_text()))["results"] == \
        comparable(json.loads((tmp_path / "c/results.json").read_text()))["results"]


def test_yaml_config(cli, model, tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text(f"tasks: [arith]\ndecoders: [evotoken]\nlimit: 2\ngen_length: 8\nblock_length: 4\n"
                      f"steps: 4\nmodel: {model}\nsweep: {{k_soft: [2, 3]}}\ndecoder: {{alpha: 0.6}}\n")
    res = cli("bench", "-c", str(config), "--out", str(tmp_path / "out"), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [(r["sweep"], r["decoder_options"]["alpha"]) for r in doc["results"]] == [({"k_soft": 2}, 0.6),
                                                                                    ({"k_soft": 3}, 0.6)]


# -- resuming -----------------------------------------------------------------------------------------
class Interrupt(KeyboardInterrupt):
    pass


def test_resume_after_an_interruption_gives_the_same_results(model, tmp_path):
    common = {"batch_size": 2, "overrides": {**GEN_SETTINGS, "temperature": 0.5}, "sweeps": ["alpha=0.6"]}
    whole = run_bench(request(model, tmp_path / "whole", **common))

    batches = []

    def stop_after_two(run, done, total):
        batches.append(run.name)
        if len(batches) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_bench(request(model, tmp_path / "cut", on_batch=stop_after_two, **common))
    cut = tmp_path / "cut"
    assert len(lines(cut / "samples_arith_hard-mask.jsonl")) == 4  # two batches of two
    assert not (cut / "samples_arith_evotoken_alpha=0.6.jsonl").exists() and not (cut / "results.json").exists()
    # a kill can also leave half a line behind
    with (cut / "samples_arith_hard-mask.jsonl").open("a") as f:
        f.write('{"doc_id": 4, "generation": "half a li')
    resumed = run_bench(request(model, cut, **common))
    assert comparable(resumed)["results"] == comparable(whole)["results"]
    # every item once; at batch size 2 items are batched in prompt-length order, so the file is in that order
    assert sorted(r["doc_id"] for r in lines(cut / "samples_arith_hard-mask.jsonl")) == [0, 1, 2, 3, 4]
    assert {k: v for k, v in comparable(resumed).items() if k != "config"} == \
        {k: v for k, v in comparable(whole).items() if k != "config"}


def test_resume_under_another_setup_is_refused(cli, model, tmp_path):
    out = tmp_path / "out"
    assert cli("bench", "arith", "-m", str(model), "--limit", "2", *GEN, "--out", str(out)).returncode == 0
    res = cli("bench", "arith", "-m", str(model), "--limit", "2", "--gen-length", "16", "--block-length", "4",
              "--steps", "4", "--out", str(out))
    line = one_line_error(res)
    assert "another setup" in line and "gen_length" in line and "samples_arith_hard-mask.jsonl" in line
    # a larger limit on the same setup only adds the missing items
    res = cli("bench", "arith", "-m", str(model), "--limit", "3", *GEN, "--out", str(out), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["results"][0]["n"] == 3


# -- two processes on gloo ------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_gloo_processes_match_one(model, tmp_path):
    args = ["bench", "arith", "-m", str(model), "-d", "hard-mask", "-d", "evotoken", "--limit", "5", *GEN,
            "--temperature", "0.5", "--json"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EVOTOK_")}, "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    one = subprocess.run([sys.executable, "-m", "evotok_cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "evotok_cli", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr
    single, sharded = json.loads(one.stdout), json.loads(two.stdout)  # only rank 0 prints
    assert sharded["config"]["world_size"] == 2
    assert comparable(sharded) == comparable(single)
    for row in sharded["results"]:
        assert row["samples"] == [f"samples_arith_{row['decoder']}.rank0.jsonl",
                                  f"samples_arith_{row['decoder']}.rank1.jsonl"]
        rank0, rank1 = (lines(tmp_path / "two" / name) for name in row["samples"])
        assert [r["doc_id"] for r in rank0] == [0, 2, 4] and [r["doc_id"] for r in rank1] == [1, 3]
        merged = sorted(rank0 + rank1, key=lambda r: r["doc_id"])
        plain = lines(tmp_path / "one" / f"samples_arith_{row['decoder']}.jsonl")
        assert [r["generation"] for r in merged] == [r["generation"] for r in plain]


# -- score and report -----------------------------------------------------------------------------------
def official(folder: Path, name: str, items: list[tuple[str, object]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"generations": [{"question": "q", "prompt_input": "p", "generations": g,
                                                 "ground_truth": t} for g, t in items],
                                "metrics": {"wall_time": 1.0, "total_processed": len(items)}}))
    return path


def test_score_official_files(cli, tmp_path):
    a = tmp_path / "eval_results_kSoft_3_alphaSoftMask_0.5"
    official(a, "gsm8k_256_128_0_generations.json", [
        ("<reasoning>6+12=18</reasoning><answer>\\boxed{18}</answer><|eot_id|>", 18.0),
        ("\\boxed{17}", 18.0),
        ("<answer>so 3</answer>", 3.0),
        ("\\boxed{-3}", None),  # a negative reference answer is never matched
    ])
    official(a, "gsm8k_256_128_1_generations.json", [("\\boxed{2,125}", 2125.0)])  # "2,125" reads as 2
    official(a, "math_256_128_0_generations.json", [("\\boxed{\\dfrac12}", "\\frac{1}{2}"), ("\\fbox{4}", "4")])
    official(a, "countdown_256_128_0_generations.json", [
        ("\\boxed{1 + 2 + 3}", [[1, 2, 3], 6]), ("\\boxed{1 * 2 * 3 = 6}", [[1, 2, 3], 6]),
        ("\\boxed{6}", [[1, 2, 3], 6])])
    b = tmp_path / "eval_results_kSoft_3_alphaSoftMask_0.7"
    official(b, "gsm8k_256_128_0_generations.json", [("\\boxed{18}", 18.0)] * 2)
    res = cli("bench", "score", str(a), str(b), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    got = {(Path(r["folder"]).name[-3:], r["setup"]): (r["task"], len(r["files"]), r["n"], r["correct"])
           for r in doc["setups"]}
    assert got == {("0.5", "gsm8k_256_128"): ("gsm8k", 2, 5, 2), ("0.5", "math_256_128"): ("math500", 1, 2, 1),
                   ("0.5", "countdown_256_128"): ("countdown", 1, 3, 2), ("0.7", "gsm8k_256_128"): ("gsm8k", 1, 2, 2)}
    assert doc["best_over_folders"] == [{"setup": "gsm8k_256_128", "task": "gsm8k", "folders": 2, "folder": str(b),
                                         "accuracy": 100.0, "n": 2, "chosen_on": "test set"}]
    table = cli("bench", "score", str(a / "math_256_128_0_generations.json"))
    assert table.returncode == 0 and "math500" in table.stdout


def test_score_needs_a_task_it_can_tell(cli, tmp_path):
    path = official(tmp_path, "mystery.json", [("\\boxed{1}", 1.0)])
    assert "cannot tell the task" in one_line_error(cli("bench", "score", str(path)))
    res = cli("bench", "score", str(path), "--task", "svamp", "--json")
    assert json.loads(res.stdout)["setups"][0]["accuracy"] == 100.0


def test_score_and_report_our_run(cli, model, tmp_path):
    out = tmp_path / "out"
    res = cli("bench", "arith", "-m", str(model), "-d", "hard-mask", "-d", "evotoken", "--sweep", "alpha=0.5,0.9",
              "--limit", "3", *GEN, "--out", str(out), "--json")
    doc = json.loads(res.stdout)
    scored = json.loads(cli("bench", "score", str(out), "--json").stdout)
    assert {r["setup"]: (r["n"], r["correct"], r["disagreements"]) for r in scored["setups"]} == {
        f"samples_arith_{r['decoder']}" + (f"_{r['label']}" if r["label"] else ""): (r["n"], r["correct"], 0)
        for r in doc["results"]}
    rep = cli("bench", "report", str(out))
    assert rep.returncode == 0, rep.stderr
    assert "| arith | evotoken | alpha=0.9 | 8 / 4 / 4 | 3 |" in rep.stdout and "chosen on the test set" in rep.stdout
    # the study's own table: one column per swept value, accuracy ± s.e.; hard-mask has no alpha: not in it
    acc = {r["label"]: (r["accuracy"], r["accuracy_stderr"]) for r in doc["results"] if r["decoder"] == "evotoken"}
    assert "| task | method | n | alpha 0.5 | alpha 0.9 |" in rep.stdout
    assert ("| arith | evotoken | 3 | " + " | ".join(f"{a:.1f} ± {e:.1f}" for a, e in (acc["alpha=0.5"], acc["alpha=0.9"]))
            + " |") in rep.stdout
    assert "| arith | hard-mask | 3 |" not in rep.stdout
    assert (out / "report.md").read_text() == rep.stdout.rstrip("\n") + "\n"
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert one_line_error(cli("bench", "report", str(out), "--x", "beta")).startswith("error: --x: no run swept")
    # a second budget in its own folder: the budget table puts both side by side, one row per method
    out8 = tmp_path / "out8"
    doc8 = json.loads(cli("bench", "arith", "-m", str(model), "-d", "hard-mask", "--limit", "3", *GEN, "--steps", "8",
                          "--out", str(out8), "--json").stdout)
    both = cli("bench", "report", str(out), str(out8), "--out", str(tmp_path / "both")).stdout
    assert "| task | method | steps 8 | steps 4 |" in both
    at4 = next(r for r in doc["results"] if r["decoder"] == "hard-mask")["accuracy"]
    assert f"| arith | hard-mask | {doc8['results'][0]['accuracy']:.1f} | {at4:.1f} |" in both
    assert "| arith | evotoken alpha=0.5 |  | " in both  # no steps-8 run for it: an empty cell


# -- user errors and help -------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["gsm9k"], "unknown task 'gsm9k'"),
    (["arith", "--sweep", "alphaa=0.5"], "did you mean alpha"),
    (["arith", "--sweep", "alpha"], "not key=v1,v2"),
    (["arith", "--opt", "steps=3"], "generation setting"),
    (["arith", "--gen-length", "10"], "not divisible"),
    (["gsm8k", "--data", "/nonexistent/gsm8k.jsonl"], "data path does not exist"),
    (["arith", "--data", str(DATA)], "none of the tasks reads data"),
    (["arith", "--batch-size", "0"], "batch size must be >= 1"),
])
def test_user_errors_are_one_line(cli, model, tmp_path, extra, message):
    res = cli("bench", "-m", str(model), "-d", "evotoken", "--limit", "2", *GEN, "--out", str(tmp_path / "out"),
              *extra)  # a later flag wins over GEN
    assert message in one_line_error(res)


def test_missing_bundled_model_says_to_pass_model(cli, monkeypatch, tmp_path):
    import evotok_cli.assets

    monkeypatch.setattr(evotok_cli.assets, "BUNDLED_NAME", "not-installed")
    line = one_line_error(cli("bench", "arith", "--limit", "1", "--out", str(tmp_path / "out")))
    assert "bundled model is not installed" in line and "--model" in line


def test_yaml_limit_must_be_a_number(cli, model, tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("limit: many\n")
    line = one_line_error(cli("bench", "arith", "-m", str(model), "-c", str(config), "--out", str(tmp_path / "o")))
    assert "limit: expected int, got 'many'" in line


def test_help_explains_the_three_forms(cli):
    res = cli("bench", "--help")
    assert res.returncode == 0
    for form in ("evotok bench TASK [TASK ...] [OPTIONS]", "evotok bench score FILE|DIR", "evotok bench report DIR"):
        assert form in res.stdout


def test_top_level_help_stays_light():
    code = ("import sys; from evotok_cli.cli.app import app; "
            "print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_report_axis_over_adapter_training_settings():
    """A study over adapters (CTS's trajectory length): the one training setting the adapters differ in is
    the x axis, each adapter a point of one line per decoder; an asked-for setting nobody varied is refused."""
    from evotok_cli.bench.report import x_axis, x_value

    def row(k: int | None, sweep: dict | None = None) -> dict:
        training = {} if k is None else {"objective": "cts", "trajectory_steps": k, "seed": 0, "lr": 5e-4}
        return {"task": "sudoku4", "decoder": "evotoken", "sweep": sweep, "training": training}

    rows = [row(1), row(2), row(4)]
    assert x_axis(rows, "auto") == "trajectory_steps" == x_axis(rows, "trajectory_steps")
    assert [x_value(r, "trajectory_steps") for r in rows] == [1, 2, 4]
    assert x_axis([row(1), row(1)], "auto") == "nfe"  # nothing differs
    assert x_axis([row(1, {"alpha": 0.5}), row(2, {"alpha": 0.7})], "auto") == "alpha"  # a sweep comes first
    assert x_axis([row(None), row(None)], "auto") == "nfe"  # no adapters made by evotok finetune
    with pytest.raises(Exception, match="no adapters differ in it"):
        x_axis([row(1), row(1)], "seed")


def test_report_ignores_adapter_training_that_is_not_a_mapping(tmp_path):
    """A hand-edited results.json whose adapter_training is not an object plots as a run without one."""
    from evotok_cli.bench.report import rows_of

    doc = {"model": {"adapter": "a", "adapter_training": "K=4"}, "results": [{"task": "t", "decoder": "d"}]}
    assert rows_of([(tmp_path / "results.json", doc)])[0]["training"] == {}
