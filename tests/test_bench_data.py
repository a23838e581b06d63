"""Bench tasks: loaders on slices of the reference data in every supported layout, the protocol's prompts
character for character, the Countdown order, the synthetic test split, and task discovery."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from evotok_cli.base.errors import ConfigError, DataError
from evotok_cli.bench.runner import resolve_data
from evotok_cli.bench.tasks import registry
from evotok_cli.bench.tasks.protocol import (
    COUNTDOWN_SYSTEM_PROMPT,
    GSM8K,
    GSM8K_SYSTEM_PROMPT,
    MATH500,
    MATH_SYSTEM_PROMPT,
    SVAMP,
    Countdown,
)
from tests.conftest import one_line_error, run_cli

DATA = Path(__file__).parent / "data"
GSM8K_LINES = [json.loads(line) for line in (DATA / "gsm8k/test.jsonl").read_text().splitlines()]
GSM8K_TARGETS = [18.0, 3.0, 2125.0, None]


def questions(loaded):
    return [(d.question, d.target) for d in loaded.docs]


# -- the protocol's strings ---------------------------------------------------------------------------
FORMAT = ("Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
          "<answer>\n\\boxed{...}\n</answer>")


def test_system_prompts_keep_their_quirks():
    solve = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
             "Wrap the final answer in a \\boxed{}.")
    assert solve + " \n" + FORMAT == GSM8K_SYSTEM_PROMPT  # the space after "\boxed{}."
    assert solve + "\n" + FORMAT + '" \n' == MATH_SYSTEM_PROMPT  # the stray quote, a space, a newline
    assert MATH500.system_prompt is SVAMP.system_prompt is MATH_SYSTEM_PROMPT
    assert COUNTDOWN_SYSTEM_PROMPT.endswith("For example: \\boxed{a + b * c}" + FORMAT)  # no newline between
    assert COUNTDOWN_SYSTEM_PROMPT.startswith("Using only the provided numbers, create an arithmetic expression")


def test_prompt_is_one_user_message_with_prefill(tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    doc = GSM8K().load(DATA / "gsm8k/test.jsonl", 1).docs[0]
    content = GSM8K_SYSTEM_PROMPT + "\n\n" + GSM8K_LINES[0]["question"]
    expected = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False) + "<reasoning>"
    assert GSM8K().render(tokenizer, doc) == expected
    assert "system" not in expected  # the d1 protocol has no system turn


# -- loaders -------------------------------------------------------------------------------------------
def test_gsm8k_original_jsonl():
    loaded = GSM8K().load(DATA / "gsm8k/test.jsonl", None)
    assert questions(loaded) == [(r["question"], t) for r, t in zip(GSM8K_LINES, GSM8K_TARGETS)]
    assert [d.doc_id for d in loaded.docs] == [0, 1, 2, 3] and loaded.total == 4
    assert "negative" in loaded.notes[0]  # the -3 answer cannot be scored correct, and we say so


def test_gsm8k_folder_of_all_sets_and_limit():
    loaded = GSM8K().load(DATA, 2)
    assert questions(loaded) == [(r["question"], t) for r, t in zip(GSM8K_LINES[:2], GSM8K_TARGETS)]
    assert loaded.source.endswith("gsm8k/test.jsonl") and loaded.total == 4


def test_gsm8k_hugging_face_parquet_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = tmp_path / "gsm8k" / "main"
    shard.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(GSM8K_LINES[:2]), shard / "test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(GSM8K_LINES[2:]), shard / "test-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(GSM8K_LINES[:1]), shard / "train-00000-of-00001.parquet")
    loaded = GSM8K().load(tmp_path / "gsm8k", None)
    assert questions(loaded) == [(r["question"], t) for r, t in zip(GSM8K_LINES, GSM8K_TARGETS)]
    assert GSM8K().load(shard / "test-00001-of-00002.parquet", None).docs[0].target == 2125.0


def test_json_lines_under_a_json_name(tmp_path):
    """`Dataset.to_json` writes JSON lines even with a .json suffix."""
    path = tmp_path / "test.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_LINES))
    assert questions(GSM8K().load(path, None)) == [(r["question"], t) for r, t in zip(GSM8K_LINES, GSM8K_TARGETS)]


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(GSM8K_LINES)}).save_to_disk(str(tmp_path / "dd"))
    assert [d.target for d in GSM8K().load(tmp_path / "dd", None).docs] == GSM8K_TARGETS


def test_svamp_original_list_joins_body_and_question():
    items = json.loads((DATA / "svamp/SVAMP.json").read_text())
    loaded = SVAMP().load(DATA / "svamp/SVAMP.json", None)
    assert questions(loaded) == [(r["Body"] + r["Question"], float(r["Answer"])) for r in items]
    assert "each packHow much" in loaded.docs[0].question  # no separator, as the protocol does


def test_svamp_hugging_face_jsonl(tmp_path):
    items = json.loads((DATA / "svamp/SVAMP.json").read_text())
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    assert questions(SVAMP().load(tmp_path, None)) == questions(SVAMP().load(DATA / "svamp/SVAMP.json", None))


def test_math500_jsonl():
    items = [json.loads(line) for line in (DATA / "math500/test.jsonl").read_text().splitlines()]
    loaded = MATH500().load(DATA, None)
    assert questions(loaded) == [(r["problem"], r["answer"]) for r in items]


def test_countdown_seed_42_order():
    import numpy as np

    items = [json.loads(line) for line in (DATA / "countdown/cd3_test.jsonl").read_text().splitlines()]
    loaded = Countdown().load(DATA / "countdown/cd3_test.jsonl", None)
    order = [d.index for d in loaded.docs]
    state = np.random.get_state()
    try:
        np.random.seed(42)
        assert order == np.random.choice(5, 5, replace=False).tolist()
        np.random.seed(42)
        assert Countdown().order(256) == np.random.choice(256, 256, replace=False).tolist()
    finally:
        np.random.set_state(state)
    first = items[order[0]]
    numbers = [int(x) for x in first["input"].split(",")]
    assert loaded.docs[0].question == f"Numbers: [{numbers[0]}, {numbers[1]}, {numbers[2]}]\nTarget: {first['output']}"
    assert loaded.docs[0].target == [numbers, int(first["output"])]


def test_countdown_hugging_face_fields(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"nums": [3, 5, 2], "target": 13}) + "\n")
    assert Countdown().load(tmp_path / "test.jsonl", None).docs[0].target == [[3, 5, 2], 13]


def test_missing_field_is_a_one_line_data_error(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError) as info:
        GSM8K().load(path, None)
    line = info.value.line()
    assert "'answer'" in line and str(path) in line and "\n" not in line


def test_invalid_json_line_names_the_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(GSM8K_LINES[0]) + "\n{broken\n")
    with pytest.raises(DataError, match=r"test.jsonl:2"):
        GSM8K().load(path, None)


def test_folder_without_the_task_file(tmp_path):
    with pytest.raises(DataError, match="no gsm8k data found"):
        GSM8K().load(tmp_path, None)


def test_without_data_and_offline_says_what_to_pass(tmp_path):
    proc = run_cli("bench", "gsm8k", "--out", str(tmp_path / "out"),
                   env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    line = one_line_error(proc)
    assert "openai/gsm8k" in line and "--data /path/to/gsm8k/test.jsonl" in line


def test_countdown_has_no_hub_dataset():
    with pytest.raises(DataError, match="--data /path/to/countdown/cd3_test.jsonl"):
        Countdown().load(None, None)


# -- the bundled model's tasks ---------------------------------------------------------------------------
def test_synthetic_tasks_are_the_generators_test_split():
    from evotok_cli.training.synthetic import GENERATORS

    for name in ("sudoku4", "arith-small", "arith", "countdown3"):
        task = registry.get(name)
        loaded = task.load(None, 5)
        problems = GENERATORS[name].problems("test", 5, 0)
        assert [d.question for d in loaded.docs] == [p.question for p in problems]
        assert task.system_prompt is None and task.prefill == "<reasoning>"
        assert (task.defaults.gen_length, task.defaults.block_length, task.defaults.steps) == (48, 16, 48)
        # a correct answer in the training format scores correct
        assert task.score(problems[0].response[len("<reasoning>"):], loaded.docs[0].target)[1]
    assert len(registry.get("arith").load(None, None).docs) == 200


def test_synthetic_tasks_read_no_data():
    with pytest.raises(ConfigError, match="reads no data"):
        registry.get("arith").load(DATA, None)


# -- --data routing and discovery ------------------------------------------------------------------------
def test_resolve_data():
    tasks = [registry.get(n) for n in ("gsm8k", "svamp", "arith")]
    assert resolve_data([str(DATA)], tasks) == {"gsm8k": DATA, "svamp": DATA}
    assert resolve_data([f"svamp={DATA / 'svamp/SVAMP.json'}", str(DATA)], tasks) == {
        "svamp": DATA / "svamp/SVAMP.json", "gsm8k": DATA}
    with pytest.raises(ConfigError, match="one data file for 2 tasks"):
        resolve_data([str(DATA / "gsm8k/test.jsonl")], tasks)
    assert resolve_data([str(DATA / "gsm8k/test.jsonl")], tasks[:1]) == {"gsm8k": DATA / "gsm8k/test.jsonl"}


def test_unknown_task_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean gsm8k"):
        registry.get("gsm9k")


def test_third_party_task_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "mytask_pkg.py").write_text(textwrap.dedent("""
        from evotok_cli.bench.tasks.bundled import Arith

        class Echo(Arith):
            name = "echo"
    """))
    info = tmp_path / "mytask_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mytask-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[evotok.tasks]\necho = mytask_pkg:Echo\nbroken = mytask_pkg:Nope\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "echo" in registry.available()
    assert registry.get("echo").name == "echo"
    with pytest.raises(ConfigError, match="task 'broken' failed to load"):
        registry.get("broken")
    shutil.rmtree(info)
