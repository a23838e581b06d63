"""`evotok chat` (issue 31, item 5), driven through stdin as a script would: the history goes through the chat
template, --show draws the canvas, the / commands change decoder, options and history, --log writes a
transcript that `evotok generate --prompts-file` replays to the same answers."""

from __future__ import annotations

import io
import json
import sys

import pytest

SUDOKU = "Sudoku 4x4 (0 = blank):\\n0012|0230|4320|0103"  # as typed: a literal backslash-n inside one line
ARITH = "What is 2 + 3?"
GEN = ["--gen-length", "16", "--block-length", "16", "--steps", "16"]


def chat(cli, monkeypatch, lines: list[str], *args: str):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    return cli("chat", *args)


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_turns_with_show_keep_the_history_and_replay_through_generate(cli, monkeypatch, tmp_path):
    log = tmp_path / "chat.jsonl"
    r = chat(cli, monkeypatch, [SUDOKU, ARITH], "--show", "--log", str(log), *GEN)
    assert r.returncode == 0, r.stderr
    turns = read_log(log)
    assert [t["messages"][-1]["content"] for t in turns] == [SUDOKU, ARITH]
    # the second turn's prompt is the whole conversation: user, assistant (the first answer), user
    assert [m["role"] for m in turns[1]["messages"]] == ["user", "assistant", "user"]
    assert turns[1]["messages"][1]["content"] == turns[0]["answer"]
    assert r.stdout == "".join(t["answer"] + "\n" for t in turns)  # the answers, and only them, on stdout
    assert turns[0]["answer"].startswith("<reasoning>")  # the model's prefill is part of its answer
    assert r.stderr.count("hard-mask: NFE 16") == 2 and r.stderr.count("step 16 · block") == 2  # --show: the canvas
    replay = cli("generate", "--prompts-file", str(log), *GEN, "--json")
    assert replay.returncode == 0, replay.stderr
    assert ["<reasoning>" + x["text"] for x in json.loads(replay.stdout)["results"]] == [t["answer"] for t in turns]


def test_commands_change_decoder_options_and_history(cli, monkeypatch, tmp_path):
    log, saved = tmp_path / "chat.jsonl", tmp_path / "saved.json"
    lines = [ARITH, "/decoder evotoken", "/opt alpha=0.7", "/opt steps=8", ARITH, "/clear", ARITH,
             f"/save {saved}", "/quit", "never answered"]
    r = chat(cli, monkeypatch, lines, "--log", str(log), *GEN)
    assert r.returncode == 0, r.stderr
    turns = read_log(log)
    assert [t["decoder"] for t in turns] == ["hard-mask", "evotoken", "evotoken"]
    assert turns[1]["options"]["alpha"] == 0.7 and turns[1]["settings"]["steps"] == 8 and turns[1]["nfe"] == 8
    assert len(turns[1]["messages"]) == 3 and len(turns[2]["messages"]) == 1  # /clear forgot the first two turns
    document = json.loads(saved.read_text())
    assert document["schema"] == "evotok.chat/1" and document["decoder"] == "evotoken"
    assert [m["role"] for m in document["messages"]] == ["user", "assistant"]
    assert "never answered" not in log.read_text()


def test_a_bad_line_is_one_error_and_the_chat_goes_on(cli, monkeypatch, tmp_path):
    lines = ["/bogus", "/opt steps=x", "/decoder nope", "/opt", ARITH]
    r = chat(cli, monkeypatch, lines, *GEN, "--system", "Answer briefly.")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: chat: unknown command /bogus (/help lists the commands)",
        "error: /opt: steps must be a whole number, got 'x' (e.g. /opt steps=32)",
        errors[2], "error: /opt: '' is not KEY=VALUE (e.g. /opt steps=32 or /opt alpha=0.7)"]
    assert errors[2].startswith("error: /decoder:") and "nope" in errors[2]
    assert r.stdout.strip(), "the last line was still answered"
    assert r.returncode == 2  # piped input: a script learns that a line failed


@pytest.mark.parametrize(("args", "expect"), [
    (["--log", "{tmp}"], "--log"),
    (["--threads", "0"], "--threads"),
    (["-d", "nope"], "nope"),
])
def test_bad_flags_fail_before_the_model_loads(cli, monkeypatch, tmp_path, args, expect):
    from tests.conftest import one_line_error

    r = chat(cli, monkeypatch, [ARITH], *[a.format(tmp=tmp_path) for a in args])
    assert expect in one_line_error(r) and r.stdout == ""
