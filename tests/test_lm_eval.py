"""evotok as an lm-evaluation-harness model (`evotok_cli.lmeval`).

- The Monte Carlo log-likelihood bound against a plain loop written here from its description (LLaDA's
  paper and harness), token for token on tiny checkpoints, and against the exact bound by enumeration.
- model_args: settings vs decoder options, one-line errors, max_gen_toks rounding, stop strings.
- lm-eval's own evaluator on the bundled model with a task defined from a local JSON-lines file, against
  `evotok bench` on the same items and settings: same prompts, same generations, same accuracy.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lm_eval  # noqa: E402,F401 (the test extra installs it: missing must fail, not skip)
import pytest
import torch

from evotok_cli.base.errors import ConfigError  # noqa: E402
from evotok_cli.jobs.canvas_plan import CanvasPlan, cut_answer  # noqa: E402
from evotok_cli.lmeval.loglik import greedy_reproduces, mc_loglikelihood  # noqa: E402
from evotok_cli.lmeval.model import EvotokLM  # noqa: E402
from evotok_cli.lmeval.settings import EvalSettings, cut_at, scaled_settings  # noqa: E402
from evotok_cli.runtime.model import load_model  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


# -- the estimator, restated ------------------------------------------------------------------------
def aligned_logits(model, ids: list[int]) -> torch.Tensor:
    """(len, V) logits, row i predicting position i (Dream: the output at i - 1; position 0 its own)."""
    out = model(torch.tensor([ids], device=model.device))[0].double()
    return torch.cat([out[:1], out[:-1]]) if model.shifted_logits else out


def reference_loglikelihood(model, prompt, answer, mc_num, batch, seed) -> float:
    """The bound as described: per sample, l of the L answer tokens masked (l stratified over a batch from one
    uniform offset, a uniform subset of that size), sum of -log p of the masked tokens times L / l; the mean
    over samples, negated. One sequence at a time, plain Python sums, the same random draws in the same order."""
    gen = torch.Generator().manual_seed(seed)
    length = len(answer)
    total = 0.0
    for _ in range(mc_num // batch):
        k = int(torch.randint(1, length + 1, (1,), generator=gen))
        scores = torch.rand(batch, length, generator=gen)
        for row in range(batch):
            count = (k - 1 + row * length // batch) % length + 1
            order = sorted(range(length), key=lambda j, row=row: float(scores[row, j]))
            masked = set(order[:count])
            noisy = prompt + [model.mask_id if j in masked else t for j, t in enumerate(answer)]
            logp = torch.log_softmax(aligned_logits(model, noisy), dim=-1)
            for j in masked:
                total += -float(logp[len(prompt) + j, answer[j]]) * length / count
    return -total / mc_num


def exact_bound(model, prompt, answer) -> float:
    """E_l E_S [...] by enumerating every non-empty subset of the answer (small L only)."""
    length = len(answer)
    value = 0.0
    for count in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), count))
        for masked in subsets:
            noisy = prompt + [model.mask_id if j in masked else t for j, t in enumerate(answer)]
            logp = torch.log_softmax(aligned_logits(model, noisy), dim=-1)
            nll = sum(-float(logp[len(prompt) + j, answer[j]]) for j in masked)
            value += nll * length / count / len(subsets) / length
    return -value


def reference_greedy(model, prompt, length) -> list[int]:
    """Unmask the answer one token per pass, the most probable (non-mask) token at the most confident position."""
    ids = prompt + [model.mask_id] * length
    for _ in range(length):
        probs = torch.softmax(aligned_logits(model, ids).float(), dim=-1)
        probs[:, model.mask_id] = 0.0
        best, where, token = -1.0, None, None
        for j in range(len(prompt), len(ids)):
            if ids[j] == model.mask_id and float(probs[j].max()) > best:
                best, where, token = float(probs[j].max()), j, int(probs[j].argmax())
        ids[where] = token
    return ids[len(prompt):]


@pytest.fixture(scope="module", params=["llada", "dream"])
def any_model(request, tiny_llada, tiny_dream):
    return load_model(tiny_llada if request.param == "llada" else tiny_dream, device="cpu")


@pytest.mark.parametrize(("mc_num", "batch", "seed"), [(8, 4, 0), (6, 3, 7), (5, 5, 1)])
def test_estimate_equals_the_restated_loop(any_model, mc_num, batch, seed):
    prompt, answer = [5, 17, 33, 40, 41], [60, 61, 62, 63, 64, 65, 66]
    ours = mc_loglikelihood(any_model, prompt, answer, mc_num=mc_num, mc_batch_size=batch, seed=seed)
    ref = reference_loglikelihood(any_model, prompt, answer, mc_num, batch, seed)
    assert ours < 0
    assert ours == pytest.approx(ref, rel=1e-5)


def test_estimate_is_unbiased(tiny_model):
    """Many samples land within a few standard errors of the exact bound (L = 3: 7 subsets)."""
    prompt, answer = [5, 17, 33, 40], [60, 70, 80]
    exact = exact_bound(tiny_model, prompt, answer)
    estimates = [mc_loglikelihood(tiny_model, prompt, answer, mc_num=240, mc_batch_size=24, seed=s) for s in range(5)]
    mean = sum(estimates) / len(estimates)
    spread = math.sqrt(sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1))
    assert abs(mean - exact) < 4 * spread / math.sqrt(len(estimates)) + 1e-3 * abs(exact), (estimates, exact)


def test_estimate_edges(tiny_model):
    assert mc_loglikelihood(tiny_model, [5, 6], [], mc_num=4, mc_batch_size=2) == 0.0
    one = mc_loglikelihood(tiny_model, [5, 6], [7], mc_num=4, mc_batch_size=2)
    assert one == pytest.approx(exact_bound(tiny_model, [5, 6], [7]), rel=1e-5)  # L = 1: no randomness
    with pytest.raises(ConfigError, match="not a multiple"):
        mc_loglikelihood(tiny_model, [5], [6, 7], mc_num=10, mc_batch_size=4)


def test_greedy_check_equals_the_restated_decoding(any_model):
    prompt = [5, 17, 33, 40]
    greedy = reference_greedy(any_model, prompt, 4)
    assert greedy_reproduces(any_model, prompt, greedy)
    other = list(greedy)
    other[2] = 7 if greedy[2] != 7 else 8
    assert not greedy_reproduces(any_model, prompt, other)


# -- model_args ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    ("decoder=evotoken,alpha=1.5", "alpha=1.5 is out of range"),
    ("decoder=evotoken,gen_lenght=64", "did you mean gen_length"),
    ("decoder=hard-mask,alpha=0.7", "neither an evotok setting nor an option of decoder 'hard-mask'"),
    ("decoder=evotokn", "unknown decoder 'evotokn'"),
    ("gen_length=100,block_length=32", "not divisible by block length"),
    ("steps=many", "steps='many' is not a valid int"),
    ("mc_num=100,mc_batch_size=32", "not a multiple of mc_batch_size"),
    ("batch_size=auto", "batch_size=auto is not supported"),
    ("model=a,pretrained=b", "both model and pretrained given"),
    ("stop_at_eos=maybe", "stop_at_eos='maybe' is not a valid bool"),
    ("lora_mode=fused", "lora_mode='fused' is not one of auto, merged, unmerged"),
    ("padded_attention=row", "padded_attention='row' is not one of auto, masked, rowwise"),
])
def test_bad_model_args_fail_in_one_line_before_loading(args, message):
    with pytest.raises(ConfigError) as info:
        EvotokLM.create_from_arg_string(args, {"batch_size": 1, "device": "cuda:0"})
    assert message in info.value.line() and "\n" not in info.value.line()


def test_model_args_win_over_the_harness_and_options_reach_the_decoder(tiny_llada):
    lm = EvotokLM.create_from_arg_obj(
        {"pretrained": str(tiny_llada), "decoder": "evotoken", "alpha": "0.6", "k_soft": 2, "batch_size": 4,
         "gen_length": 16, "block_length": 8, "steps": 8, "trust_remote_code": True},
        {"batch_size": 1, "max_batch_size": None, "device": "cuda:0" if not torch.cuda.is_available() else "cpu"})
    assert lm.settings.batch_size == 4 and lm.decoder.config.alpha == 0.6 and lm.decoder.config.k_soft == 2
    assert lm.settings.lora_mode == "auto" and lm.model.padded_attention == "rowwise"  # generate's defaults on CPU
    assert lm.model.device.type == "cpu" or torch.cuda.is_available()
    info = lm.get_model_info()
    assert info["evotok_settings"]["gen_length"] == 16 and info["decoder_options"]["alpha"] == "0.6"


def test_max_gen_toks_rounds_up_to_whole_blocks_keeping_steps_per_block():
    from evotok_cli.jobs.generation import make_decoder

    s = EvalSettings(gen_length=256, block_length=32, steps=128)
    evotoken = make_decoder("evotoken", {})
    assert scaled_settings(s, evotoken, None) == CanvasPlan(256, 32, 128)
    assert scaled_settings(s, evotoken, 100) == CanvasPlan(128, 32, 64)
    assert scaled_settings(s, evotoken, 512) == CanvasPlan(512, 32, 256)  # a task's longer length grows the canvas
    assert scaled_settings(s, evotoken, 300) == CanvasPlan(320, 32, 160)
    assert scaled_settings(s, make_decoder("d2f", {}), 100) == CanvasPlan(100, 32, 128)  # no blocks or steps read
    with pytest.raises(ConfigError, match="max_gen_toks=0"):
        scaled_settings(s, evotoken, 0)


@pytest.mark.parametrize("decoder, options", [("hard-mask", {}), ("evotoken", {}), ("d2f", {"block_size": 32}),
                                              ("d2f", {"block_size": 64})])
def test_max_gen_toks_below_gen_length_is_serves_canvas_for_max_tokens(decoder, options):
    """The same canvas as `evotok serve` plans for max_tokens (canvas_plan.plan_canvas), and one the decoder
    accepts: d2f with a block_size got max_gen_toks itself before, which it refuses unless a multiple."""
    from evotok_cli.jobs.canvas_plan import block_constraint, plan_canvas
    from evotok_cli.jobs.generation import check_settings, make_decoder

    s = EvalSettings(gen_length=256, block_length=32, steps=128)
    dec = make_decoder(decoder, options)
    for cap in (1, 20, 32, 33, 100, 128, 200, 255):
        canvas = scaled_settings(s, dec, cap)
        assert canvas == plan_canvas(gen_length=256, block_length=32, steps=128, max_tokens=cap,
                                     block=block_constraint(dec)), cap
        assert canvas.gen_length >= cap
        check_settings(dec, gen_length=canvas.gen_length, block_length=canvas.block_length, steps=canvas.steps,
                       temperature=0.0)
    grown = scaled_settings(s, dec, 300)
    check_settings(dec, gen_length=grown.gen_length, block_length=grown.block_length, steps=grown.steps,
                   temperature=0.0)
    assert grown.gen_length >= 300


def test_cut_at_the_earliest_stop_string():
    assert cut_at("a</b>c Q: d", ["Q:", "</b>"]) == "a"
    assert cut_at("abc", []) == "abc" and cut_at("abc", [""]) == "abc"


# -- the model object on a tiny checkpoint ---------------------------------------------------------
def instance(kind, args, doc_id=0, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=idx, metadata=("t", doc_id, 1))


@pytest.fixture(scope="module")
def tiny_lm(tiny_llada):
    return EvotokLM.create_from_arg_obj({"model": str(tiny_llada), "decoder": "evotoken", "gen_length": 8,
                                         "block_length": 4, "steps": 4, "mc_num": 4, "mc_batch_size": 2,
                                         "device": "cpu", "stop_at_eos": False})


def test_generate_until_is_evotok_generate_cut_at_until(tiny_lm):
    from evotok_cli.jobs.generation import generate
    from evotok_cli.runtime.prompts import Prompt
    from evotok_cli.runtime.tokenizer import encode

    contexts = ["What is 2 + 3?", "Tom has 12 apples"]
    requests = [instance("generate_until", (c, {"until": [], "max_gen_toks": 6}), doc_id=i)
                for i, c in enumerate(contexts)]
    texts = tiny_lm.generate_until(requests, disable_tqdm=True)
    prompts = [Prompt(c, ids=encode(tiny_lm.model.tokenizer, c)) for c in contexts]
    direct, _ = generate(tiny_lm.model, "evotoken", tiny_lm.decoder, prompts, gen_length=8, block_length=4,
                         steps=4, temperature=0.0, seed=None, seeds=[0, 1])  # 6 tokens: two blocks of 4
    stops = tiny_lm.model.stop_ids
    assert texts == [tiny_lm.model.decode(cut_answer(r["token_ids"], 6, stops)[0]) for r in direct]
    assert any(cut_answer(r["token_ids"], 6, stops)[1] for r in direct)  # the answer is cut to max_gen_toks
    stop = texts[0][3:5]
    cut = tiny_lm.generate_until([instance("generate_until", (contexts[0], {"until": [stop], "max_gen_toks": 6}))],
                                 disable_tqdm=True)
    assert cut == [texts[0].split(stop)[0]]


def test_loglikelihood_splits_pairs_as_lm_eval_does(tiny_lm):
    prompt, answer = tiny_lm.encode_pair("What is 2 + ", "3?")
    moved = tiny_lm.encode_pair("What is 2 +", " 3?")
    assert (prompt, answer) == moved and answer
    (value, greedy), = tiny_lm.loglikelihood([instance("loglikelihood", ("What is 2 + ", "3?"))], disable_tqdm=True)
    assert value == mc_loglikelihood(tiny_lm.model, prompt, answer, mc_num=4, mc_batch_size=2, seed=0)
    assert greedy == greedy_reproduces(tiny_lm.model, prompt, answer)
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        tiny_lm.loglikelihood_rolling([instance("loglikelihood_rolling", ("text",))])


# -- lm-eval's evaluator against `evotok bench` on the bundled model ----------------------------------------
N_ITEMS = 10
SETTINGS = {"gen_length": 48, "block_length": 16, "steps": 6, "temperature": 0.0}  # few steps: some items fail
OPTIONS = {"alpha": 0.6}
# the task as a user would write it: the question in the chat template, "<reasoning>" prefilled (gen_prefix),
# the last box extracted (whitespace ignored), as `evotok bench sudoku4` scores it
TASK = {
    "task": "evotok_sudoku4",
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "generate_until",
    "doc_to_text": "{{prompt}}",
    "gen_prefix": "{{prefill}}",
    "doc_to_target": "{{response.split('boxed{')[1].split('}')[0]}}",
    "generation_kwargs": {"until": ["</answer>"], "max_gen_toks": SETTINGS["gen_length"]},
    "filter_list": [{"name": "boxed", "filter": [
        {"function": "regex", "regex_pattern": r"(?s)\\boxed\{([^{}]*)\}(?!.*\\boxed)"},
        {"function": "take_first"}]}],
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                     "regexes_to_ignore": [r"\s"]}],
    "num_fewshot": 0,
    "metadata": {"version": 1},
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The task YAML beside a JSON-lines file of the first test problems, as `evotok data` writes them."""
    import yaml

    from evotok_cli.training.synthetic import write_training_data

    folder = tmp_path_factory.mktemp("lm-eval-task")
    items = folder / "sudoku4.jsonl"
    write_training_data(["sudoku4"], split="test", n=N_ITEMS, seed=0, out=items)  # = `evotok data --split test`
    task = {**TASK, "dataset_kwargs": {"data_files": {"test": str(items)}}}
    (folder / "evotok_sudoku4.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


def model_args(**extra) -> dict:
    from evotok_cli.assets import default_model_path

    return {"model": str(default_model_path()), "decoder": "evotoken", **SETTINGS, **OPTIONS, "device": "cpu",
            **extra}


@pytest.fixture(scope="module")
def bench_samples(tmp_path_factory) -> tuple[dict, list[dict]]:
    """`evotok bench sudoku4` on the same items with the same decoder, options and settings."""
    from evotok_cli.bench.runner import BenchRequest, run_bench

    out = tmp_path_factory.mktemp("bench")
    document = run_bench(BenchRequest(tasks=["sudoku4"], decoders=["evotoken"], limit=N_ITEMS, options=OPTIONS,
                                      overrides=dict(SETTINGS), out=out))
    lines = [json.loads(line) for line in (out / "samples_sudoku4_evotoken.jsonl").read_text().splitlines()]
    return document["results"][0], sorted(lines, key=lambda r: r["doc_id"])


@pytest.mark.slow
@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_lm_eval_scores_what_evotok_bench_scores(task_dir, bench_samples, stop_at_eos):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="evotok", model_args=model_args(stop_at_eos=stop_at_eos),
                                  tasks=["evotok_sudoku4"], apply_chat_template=True, log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    samples = sorted(out["samples"]["evotok_sudoku4"], key=lambda s: s["doc_id"])
    accuracy = out["results"]["evotok_sudoku4"]["exact_match,boxed"]
    result, bench = bench_samples

    assert len(samples) == len(bench) == N_ITEMS
    for ours, theirs in zip(samples, bench):
        prompt, _kwargs = ours["arguments"][0]
        assert prompt == theirs["prompt"]  # the same rendered prompt, prefill included
        if not stop_at_eos:  # the same text: the generated span, special tokens kept, cut at "</answer>"
            assert ours["resps"][0][0] == theirs["generation"].split("</answer>")[0]
        extracted = ours["filtered_resps"][0]
        assert (None if extracted == "[invalid]" else extracted) == theirs["extracted"]
        assert bool(ours["exact_match"]) == theirs["correct"]
    assert 0 < result["correct"] < N_ITEMS  # a score that could differ
    assert accuracy * 100 == pytest.approx(result["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_multiple_choice_runs_through_the_estimator(tmp_path):
    import yaml
    from lm_eval.tasks import TaskManager

    items = tmp_path / "choices.jsonl"
    items.write_text("".join(json.dumps({"q": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1)], "gold": 0}) + "\n"
                             for a, b in [(2, 3), (4, 4), (1, 7)]))
    task = {"task": "evotok_choice", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(items)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc"}], "metadata": {"version": 1}}
    (tmp_path / "choice.yaml").write_text(yaml.safe_dump(task))
    out = lm_eval.simple_evaluate(model="evotok", model_args=model_args(mc_num=8, mc_batch_size=4),
                                  tasks=["evotok_choice"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert 0.0 <= out["results"]["evotok_choice"]["acc,none"] <= 1.0
    for sample in out["samples"]["evotok_choice"]:
        assert len(sample["resps"]) == 2 and all(resp[0][0] < 0 for resp in sample["resps"])


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "evotok_cli.lmeval", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


@pytest.mark.slow
def test_command_line_runs_the_model_and_refuses_bad_args_in_one_line(task_dir, tmp_path):
    from tests.conftest import one_line_error

    common = ["--model", "evotok", "--tasks", str(task_dir / "evotok_sudoku4.yaml"), "--apply_chat_template"]
    args = ",".join(f"{k}={v}" for k, v in model_args().items() if k != "device")  # the harness's cuda:0 default
    proc = run_module(*common, "--model_args", args, "--limit", "2", "--output_path", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact_match" in proc.stdout and "evotok_sudoku4" in proc.stdout
    bad = run_module(*common, "--model_args", "decoder=evotoken,alpha=1.5", cwd=tmp_path)
    assert "alpha=1.5 is out of range" in one_line_error(bad)


def test_loglikelihood_stops_at_the_next_request_after_a_swallowed_sigterm(tiny_lm):
    """A SIGTERM that `evotok lm-eval`'s entry point recorded but whose exception was swallowed (see
    evotok_cli/base/stopping.py) stops the scoring loop at its next request, not after the whole task."""
    import signal

    from evotok_cli.base import stopping

    stopping.note(signal.SIGTERM)
    try:
        with pytest.raises(stopping.Terminated):
            tiny_lm.loglikelihood([instance("loglikelihood", ("What is 2 + ", "3?"))], disable_tqdm=True)
    finally:
        stopping.reset()
    (value, _), = tiny_lm.loglikelihood([instance("loglikelihood", ("What is 2 + ", "3?"))], disable_tqdm=True)
    assert value < 0  # without a signal it scores
