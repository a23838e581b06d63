"""`evotok trace` and `generate --show`: traces are read strictly, the HTML grid holds exactly the trace's
states (steps x positions cells per prompt, revisions marked), the PNG is a real image, the live view runs,
and the page works in a real headless Chromium (skipped where none is installed, except in CI)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest

from evotok_cli.base.errors import DataError
from evotok_cli.viz.trace import read_trace

from .conftest import one_line_error

PROMPTS = [[5, 17, 33], [40, 41, 42, 43, 44]]
RUNS = {  # decoder -> (request settings, decoder options); small enough for 2 CPU cores
    "evotoken": ({"gen_length": 8, "block_length": 4, "steps": 8}, {}),
    "hard-mask": ({"gen_length": 8, "block_length": 4, "steps": 8}, {}),
    "d2f": ({"gen_length": 8, "block_length": 4, "steps": 8},
            {"block_size": 4, "skip_threshold": 0.3, "block_add_threshold": 0.5, "soft": True}),
}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def traces(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """One trace file per decoder, two prompts each, written by the same code as `generate --trace`."""
    from evotok_cli.jobs.generation import generate, make_decoder
    from evotok_cli.runtime.prompts import Prompt

    folder = tmp_path_factory.mktemp("traces")
    out = {}
    for name, (settings, options) in RUNS.items():
        path = folder / f"{name}.jsonl"
        generate(tiny_model, name, make_decoder(name, options), [Prompt(None, ids=p) for p in PROMPTS],
                 temperature=0.0, seed=0, trace=path, **settings)
        out[name] = path
    return out


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- reading -------------------------------------------------------------------------------------
def test_read_groups_steps_by_prompt(traces):
    trace = read_trace(traces["evotoken"])
    records = lines_of(traces["evotoken"])
    assert trace.decoder == "evotoken" and trace.mask_id == records[0]["mask_id"]
    assert [p.index for p in trace.prompts] == [0, 1]
    for p in trace.prompts:
        mine = [r for r in records if r["prompt_index"] == p.index]
        assert [s.step for s in p.steps] == [r["step"] for r in mine] == list(range(1, len(mine) + 1))
        assert p.positions == 8
        assert [s.states for s in p.steps] == [r["states"] for r in mine]


def test_viz_states_are_the_decoders_states():
    from evotok_cli.decoding.soft import DECODED, MASK, SOFT, SOFT_MASK
    from evotok_cli.viz.style import STATES as DRAWN

    assert DRAWN == (MASK, SOFT_MASK, SOFT, DECODED)


def _edit(index: int, change):
    def apply(records: list[dict]) -> list[str]:
        change(records[index])
        return [json.dumps(r) for r in records]
    return apply


BAD = {  # what is wrong -> (how to break the file, the words the error must hold)
    "not json": (lambda rs: [json.dumps(rs[0]), "{oops"], "line 2: not JSON"),
    "bad state": (_edit(1, lambda r: r["states"].__setitem__(3, "soft-mask")), "line 2: states[3] is 'soft-mask'"),
    "missing field": (_edit(2, lambda r: r.pop("tokens")), "line 3: missing field 'tokens'"),
    "schema": (_edit(0, lambda r: r.update(schema="evotok.trace/9")), "line 1: schema is 'evotok.trace/9'"),
    "short list": (_edit(1, lambda r: r["confidence"].pop()), "line 2: confidence has 7 entries, not 8"),
    "position out of range": (_edit(1, lambda r: r.update(revised=[8])), "line 2: revised[0] is 8, outside [0, 7]"),
    "step order": (_edit(2, lambda r: r.update(step=1)), "line 3: step 1 of prompt 0 follows step 1"),
    "candidate pair": (_edit(2, lambda r: r["candidates"].__setitem__(0, [[1, 0.5, 3]])),
                       "line 3: candidates[0][0] is [1, 0.5, 3]"),
    "two decoders": (_edit(2, lambda r: r.update(decoder="d2f")), "line 3: decoder is 'd2f', earlier lines"),
    "bool as int": (_edit(0, lambda r: r.update(prompt_index=True)), "line 1: prompt_index is True, not an integer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_trace_is_one_clear_error(traces, tmp_path, case):
    breaker, words = BAD[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(breaker(lines_of(traces["evotoken"]))) + "\n")
    with pytest.raises(DataError) as err:
        read_trace(bad)
    message = err.value.line()
    assert words in message and str(bad) in message
    assert "\n" not in message


def test_d2f_blocks_are_checked(traces, tmp_path):
    records = lines_of(traces["d2f"])
    records[0]["blocks"][0]["state"] = "cached"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(map(json.dumps, records)))
    with pytest.raises(DataError, match=r"line 1: blocks\[0\].state is 'cached'"):
        read_trace(bad)


def test_cli_reports_a_bad_line_and_writes_nothing(cli, traces, tmp_path):
    records = lines_of(traces["hard-mask"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps({**records[1], "tokens": "x"}) + "\n")
    out = tmp_path / "out.html"
    proc = cli("trace", str(bad), "--html", str(out))
    line = one_line_error(proc)
    assert "line 2: tokens is str, not a list" in line
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    ([], "nothing to draw"),
    (["--html", "x.html", "--prompt-index", "7"], "no prompt 7 in this trace"),
])
def test_cli_usage_errors(cli, traces, tmp_path, args, words):
    args = [str(tmp_path / a) if a.endswith(".html") else a for a in args]
    assert words in one_line_error(cli("trace", str(traces["evotoken"]), *args))


def test_cli_empty_or_missing_file(cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    html = str(tmp_path / "a.html")
    assert "no trace records" in one_line_error(cli("trace", str(empty), "--html", html))
    assert "trace file does not exist" in one_line_error(cli("trace", str(tmp_path / "nope.jsonl"), "--html", html))


# -- HTML ----------------------------------------------------------------------------------------
class Cells(HTMLParser):
    """Collect every grid cell (`td.c`) per prompt section: its data attributes, classes and text."""

    def __init__(self):
        super().__init__()
        self.sections: dict[int, list[dict]] = {}
        self.hidden: dict[int, bool] = {}
        self.pipes = 0
        self.current: int | None = None
        self.cell: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "data-prompt" in a:
            self.current = int(a["data-prompt"])
            self.sections[self.current] = []
            self.hidden[self.current] = "hidden" in a
        elif tag == "td" and "c" in (a.get("class") or "").split():
            self.cell = {**a, "classes": set(a["class"].split()), "text": ""}
            self.sections[self.current].append(self.cell)
        elif tag == "td" and a.get("class") == "pipe":
            self.pipes += 1

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self.cell = None


def parse_cells(page: str) -> Cells:
    parser = Cells()
    parser.feed(page)
    return parser


@pytest.mark.parametrize("decoder", list(RUNS))
def test_html_grid_is_the_trace(cli, traces, tmp_path, decoder):
    """Without --model and without a recorded model folder, cells show token ids."""
    out = tmp_path / f"{decoder}.html"
    anonymous = tmp_path / f"{decoder}.jsonl"
    anonymous.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "model"}) + "\n"
                                 for r in lines_of(traces[decoder])))
    proc = cli("trace", str(anonymous), "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    trace = read_trace(traces[decoder])
    cells = parse_cells(page)
    assert sorted(cells.sections) == [p.index for p in trace.prompts]
    assert [cells.hidden[p.index] for p in trace.prompts] == [False, True]  # the selector shows one at a time
    assert 'id="prompt-select"' in page
    for p in trace.prompts:
        grid = cells.sections[p.index]
        assert len(grid) == len(p.steps) * p.positions
        assert len({(c["data-step"], c["data-pos"]) for c in grid}) == len(grid)
        by_cell = {(int(c["data-step"]), int(c["data-pos"])): c for c in grid}
        for s in p.steps:
            for pos, state in enumerate(s.states):
                cell = by_cell[s.step, pos]
                assert cell["data-state"] == state and f"s-{state}" in cell["classes"]
                assert int(cell["data-token"]) == s.tokens[pos]
                assert ("rv" in cell["classes"]) == (pos in s.revised) == ("data-revised" in cell)
                assert ("ob" in cell["classes"]) == (not s.block[0] <= pos < s.block[1])
                if s.tokens[pos] != trace.mask_id:
                    assert cell["text"] == str(s.tokens[pos])  # no --model: token ids
    if decoder != "hard-mask":  # soft decoders revise on this model; hard-mask never does
        assert sum(p.revisions for p in trace.prompts) > 0
    assert cells.pipes == (sum(len(p.steps) for p in trace.prompts) if decoder == "d2f" else 0)
    for needle in ("http://", "https://", "<script src", "<link", "@import", "url("):
        assert needle not in page, needle  # self-contained: nothing fetched


@pytest.mark.parametrize("explicit", [True, False], ids=["--model", "recorded-model"])
def test_html_one_prompt_with_token_text(cli, traces, tiny_llada, tiny_model, tmp_path, explicit):
    """Token text comes from --model, or else from the checkpoint folder the trace recorded."""
    from evotok_cli.viz.tokens import TokenText

    out = tmp_path / "one.html"
    assert lines_of(traces["evotoken"])[0]["model"] == str(tiny_model.path)
    flags = ["--model", str(tiny_llada)] if explicit else []
    proc = cli("trace", str(traces["evotoken"]), "--html", str(out), *flags, "--prompt-index", "1")
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    cells = parse_cells(page)
    assert list(cells.sections) == [1] and not cells.hidden[1]
    assert 'id="prompt-select"' not in page
    text = TokenText(tiny_model.tokenizer, tiny_model.mask_id)
    last = read_trace(traces["evotoken"]).prompts[1].steps[-1]
    shown = [c["text"] for c in cells.sections[1] if int(c["data-step"]) == last.step]
    assert shown == ["" if t == tiny_model.mask_id else text.label(t) for t in last.tokens]
    assert any(shown) and all(" " not in s for s in shown)  # whitespace is drawn visibly


def test_html_escapes_token_text(traces, tmp_path):
    from evotok_cli.viz.html import render_html
    from evotok_cli.viz.tokens import TokenText

    class Evil:
        def __len__(self):
            return 10_000

        def decode(self, ids, skip_special_tokens=False):
            return "</script><b>x&y"

    trace = read_trace(traces["evotoken"])
    page = render_html(trace, TokenText(Evil(), trace.mask_id), trace.prompts)
    assert "<b>x" not in page and "&lt;/script&gt;&lt;b&gt;x&amp;y" in page
    assert page.count("</script>") == 2  # the data blob and the script, each closed once


# -- PNG -----------------------------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("decoder", ["evotoken", "d2f"])
def test_png_is_an_image(cli, traces, tmp_path, decoder):
    out = tmp_path / "sub" / f"{decoder}.png"
    proc = cli("trace", str(traces[decoder]), "--png", str(out), "--prompt-index", "1")
    assert proc.returncode == 0, proc.stderr
    width, height = png_size(out)
    assert 500 < width < 6000 and 300 < height < 7000
    assert out.stat().st_size > 10_000


# -- live view -----------------------------------------------------------------------------------
def test_generate_show_still_prints_the_answer(cli, tiny_llada):
    gen = ["-m", str(tiny_llada), "-p", "hi", "-d", "evotoken", "--gen-length", "8", "--block-length", "4",
           "--steps", "8"]
    plain = cli("generate", *gen)
    shown = cli("generate", *gen, "--show")
    assert plain.returncode == shown.returncode == 0, shown.stderr
    assert shown.stdout == plain.stdout and shown.stdout.strip()
    assert "prompt 0 · step 8" in shown.stderr and "Soft(V)" in shown.stderr


def test_live_canvas_shows_rows_joining_and_leaving():
    from rich.console import Console

    from evotok_cli.decoding.api import StepEvent
    from evotok_cli.viz.live import LiveCanvas

    class Model:
        tokenizer, mask_id = None, 2

    def event(step, row, tokens):
        return StepEvent(step=step, row=row, block=(0, 3), states=["mask", "soft", "decoded"], tokens=tokens,
                         confidence=[None, 0.5, 0.9], committed=[1], revised=[2])

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=100)
    with LiveCanvas(Model(), console) as view:
        view.update(event(1, 0, [2, 11, 12]))
        view.update(event(1, 1, [2, 21, 22]))  # a second row joins
        view.update(event(2, 0, [10, 13, 14]))  # row 0 is done: printed, and it leaves the live area
        assert sorted(view.rows) == [1]
        view.update(event(1, 2, [2, 31, 32]))  # the next prompt takes its place
        assert sorted(view.rows) == [1, 2]
    out = buffer.getvalue()
    assert "prompt 0 · step 2" in out and "10 13 14" in out
    assert "prompt 1 · step 1" in out and "· 21 22" in out and "prompt 2 · step 1" in out
    assert out.endswith("\n")


# -- a real browser ------------------------------------------------------------------------------
def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def browser_missing(reason: str):
    """A skip that says what is missing; in CI (CI=true, which .ci/run's machines set) a failure instead:
    .ci/run installs Chromium there, and a browser test that silently does not run proves nothing."""
    if in_ci():
        pytest.fail(f"{reason}; CI is set, where the browser test must run, not skip", pytrace=False)
    pytest.skip(reason)


def browser_page():
    """A playwright page in Debian's Chromium, or a skip (a failure in CI) that says what is missing."""
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        browser_missing("no chromium: install Debian's package (apt-get install -y chromium, as .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_missing("no playwright: pip install playwright (never `playwright install`; Debian's chromium is used)")
    return sync_playwright, shutil.which("chromium") or CHROMIUM


def test_html_in_headless_chromium(cli, traces, tmp_path):
    sync_playwright, executable = browser_page()
    out = tmp_path / "evotoken.html"
    anonymous = tmp_path / "evotoken.jsonl"  # no recorded model: candidates show as token ids
    anonymous.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "model"}) + "\n"
                                 for r in lines_of(traces["evotoken"])))
    assert cli("trace", str(anonymous), "--html", str(out)).returncode == 0
    trace = read_trace(anonymous)
    first, second = trace.prompts
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors, requests = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri())
            page.wait_for_load_state("load")
            assert page.locator("td.c").count() == sum(len(q.steps) * q.positions for q in trace.prompts)
            visible = page.locator("section.prompt:not([hidden]) td.c")
            assert visible.count() == len(first.steps) * first.positions
            assert page.locator("td.c:visible").count() == visible.count()

            step, pos = next((s, i) for s in first.steps for i, st in enumerate(s.states) if st == "soft_mask")
            assert not page.locator("#tip").is_visible()
            page.locator(f'section[data-prompt="0"] td.c[data-step="{step.step}"][data-pos="{pos}"]').hover()
            tip = page.locator("#tip")
            assert tip.is_visible()
            shown = tip.inner_text()
            assert f"step {step.step} · position {pos}" in shown and "Soft([MASK]+V)" in shown
            for token, weight in step.candidates[pos]:
                assert f"{weight:.4f}  {'[MASK]' if token == trace.mask_id else token}" in shown

            page.locator("h1").hover()
            assert not tip.is_visible()
            page.select_option("#prompt-select", str(second.index))
            assert page.locator("section.prompt:not([hidden])").get_attribute("data-prompt") == str(second.index)
            assert page.locator("td.c:visible").count() == len(second.steps) * second.positions
            assert errors == []
            assert all(u.startswith(("file://", "data:")) for u in requests), requests
        finally:
            browser.close()
