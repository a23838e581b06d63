"""The paper's studies (examples/experiments/) run end to end at toy size: tiny model, one problem,
a one-step training; each writes its bench folders and report, and a rerun resumes without redoing work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = {"LIMIT": "1", "BATCH": "2", "GEN": "--gen-length 8 --block-length 4", "TASKS": "sudoku4"}


def _run(script: str, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)  # the venv's `evotok`
    full = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
            **env}
    return subprocess.run(["bash", str(ROOT / "examples" / "experiments" / script), str(out)], env=full,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_three_studies_run_and_resume_at_toy_size(tmp_path, tiny_llada):
    model = {"MODEL": str(tiny_llada)}
    trajectory = _run("trajectory.sh", tmp_path / "trajectory", {
        **model, **TOY, "GEN": "--gen-length 8 --block-length 4 --steps 4", "TRAJECTORIES": "1 2", "LINES": "4",
        "TRAIN_ARGS": "--max-steps 1 --batch-size 2 --grad-accum 1 --response-length 8 --max-length 128 "
                      "--min-response 1 --save-every 1 --warmup 0"})
    assert trajectory.returncode == 0, trajectory.stderr[-3000:]
    for k in (1, 2):
        args = json.loads((tmp_path / "trajectory" / f"cts-k{k}" / "training_args.json").read_text())
        assert args["trajectory_steps"] == k
        doc = json.loads((tmp_path / "trajectory" / f"bench-k{k}" / "results.json").read_text())
        assert doc["results"] and doc["model"]["adapter_training"]["trajectory_steps"] == k
    assert (tmp_path / "trajectory" / "report.md").is_file()  # plotted against trajectory_steps (the script's --x)

    alpha = _run("alpha.sh", tmp_path / "alpha", {**model, **TOY, "STEPS": "4", "ALPHAS": "0.5,0.9", "KS": "1,3",
                                                   "CTS": str(tmp_path / "trajectory" / "cts-k2")})
    assert alpha.returncode == 0, alpha.stderr[-3000:]
    rows = json.loads((tmp_path / "alpha" / "cts" / "results.json").read_text())["results"]
    assert len(rows) == 2 * 2  # alpha x k
    assert (tmp_path / "alpha" / "training-free-report.png").is_file()

    ablation = _run("ablation.sh", tmp_path / "ablation", {**model, **TOY, "BUDGETS": "4"})
    assert ablation.returncode == 0, ablation.stderr[-3000:]
    rows = json.loads((tmp_path / "ablation" / "nfe4" / "results.json").read_text())["results"]
    assert {tuple(sorted(r["sweep"].items())) for r in rows} == {
        (("revise", r), ("soft_decoded", d), ("soft_mask", m)) for r in (True, False) for d in (True, False)
        for m in (True, False)}
    report = (tmp_path / "ablation" / "report.md").read_text()
    assert "soft_mask=False" in report
    paired = subprocess.run([sys.executable, str(ROOT / "examples" / "experiments" / "contrast.py"),
                             str(tmp_path / "ablation" / "nfe4"), "--switch", "soft_decoded", "--switch", "revise",
                             "--json"], capture_output=True, text=True, check=True)
    assert [(r["switch"], r["pairs"], r["n"]) for r in json.loads(paired.stdout)] == [("soft_decoded", 4, 1),
                                                                                  ("revise", 4, 1)]

    samples = {p: p.read_bytes() for p in (tmp_path / "ablation" / "nfe4").glob("samples_*.jsonl")}
    again = _run("ablation.sh", tmp_path / "ablation", {**model, **TOY, "BUDGETS": "4"})  # resumes: nothing to do
    assert again.returncode == 0 and len(samples) == 8
    assert {p: p.read_bytes() for p in samples} == samples  # nothing decoded again


def _samples(folder: Path, task: str, sweep: dict, correct: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = "_".join(f"{k}={v}" for k, v in sweep.items()) or "plain"
    with open(folder / f"samples_{task}_evotoken_{name}.jsonl", "w") as f:
        for doc_id, c in enumerate(correct):
            f.write(json.dumps({"task": task, "doc_id": doc_id, "sweep": sweep or None, "correct": bool(c)}) + "\n")


def test_contrast_pairs_problems_and_folders(tmp_path):
    """The paired effect is the mean of per-problem differences and its standard error sd / sqrt(n): here
    differences (0, -1, 1, 1), mean 0.25, sd sqrt(2.75 / 3), so 25.0 ± 47.9 points over 4 problems."""
    sys.path.insert(0, str(ROOT / "examples" / "experiments"))
    try:
        import contrast
    finally:
        sys.path.pop(0)
    a, b = tmp_path / "k1", tmp_path / "k4"
    _samples(a, "t", {}, [1, 1, 0, 0])
    _samples(b, "t", {}, [1, 0, 1, 1, 1])  # a fifth problem the first folder lacks: not compared
    _samples(a, "t", {"s": True}, [1, 0, 1, 1])
    _samples(a, "t", {"s": False}, [1, 1, 0, 0])
    table = contrast.outcomes([a, b])
    [row] = contrast.versus(table, a, b)
    assert (row["task"], row["switch"], row["n"], row["effect"]) == ("t", "k4 - k1", 4, 25.0)
    assert row["stderr"] == pytest.approx(100 * (2.75 / 3) ** 0.5 / 2)
    [switched] = contrast.contrast(table, "s")
    assert (switched["pairs"], switched["n"], switched["effect"]) == (1, 4, 25.0)
    assert switched["stderr"] == pytest.approx(row["stderr"])
