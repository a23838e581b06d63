"""A trace as one self-contained HTML page: steps x positions per prompt, coloured by state.

The grid is static HTML (countable without a browser: every cell is a `td.c` with `data-step`, `data-pos`,
`data-state`, `data-token`), so the page stays readable with scripts off. The one inline script only
fills the hover tooltip from an embedded JSON blob (candidates, confidences, d2f pipeline) and switches
prompts: one tooltip element for the whole page keeps big traces light. No network, nothing external.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from evotok_cli.base.files import atomic_write_text
from evotok_cli.viz.style import (
    BLOCK_COLOURS,
    BLOCK_LABELS,
    PAPER_NAMES,
    REVISED_COLOUR,
    STATE_COLOURS,
    STATES,
    TEXT_COLOURS,
    block_kind,
)
from evotok_cli.viz.tokens import TokenText
from evotok_cli.viz.trace import PromptTrace, Step, Trace


def write_html(trace: Trace, out: str | Path, text: TokenText, prompt_index: int | None = None) -> Path:
    path = Path(out)
    atomic_write_text(path, render_html(trace, text, trace.select(prompt_index)))
    return path


def render_html(trace: Trace, text: TokenText, prompts: list[PromptTrace]) -> str:
    d2f = any(s.blocks is not None for p in prompts for s in p.steps)
    title = f"evotok trace · {trace.decoder} · {Path(trace.path).name}"
    body = [
        f"<header><h1>{_e(title)}</h1>",
        f"<p class=\"meta\">decoder <b>{_e(trace.decoder)}</b> · {len(prompts)} prompt(s) · "
        f"{'token text' if text.has_text else 'token ids (pass --model DIR for text)'} · "
        "hover a cell for its candidates</p>",
        _selector(prompts),
        _legend(d2f),
        "</header>",
        *(_section(p, text, visible=i == 0, d2f=d2f) for i, p in enumerate(prompts)),
        "<div id=\"tip\" role=\"tooltip\"></div>",
        f"<script type=\"application/json\" id=\"trace-data\">{_payload(trace, prompts, text)}</script>",
        f"<script>{_SCRIPT}</script>",
    ]
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_css()}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


# -- page parts ----------------------------------------------------------------------------------
def _selector(prompts: list[PromptTrace]) -> str:
    if len(prompts) < 2:
        return ""
    options = "".join(f"<option value=\"{p.index}\">prompt {p.index} ({len(p.steps)} passes)</option>"
                      for p in prompts)
    return f"<label class=\"pick\">prompt <select id=\"prompt-select\">{options}</select></label>"


def _legend(d2f: bool) -> str:
    items = [f"<span class=\"key\"><i class=\"sw s-{s}\"></i>{_e(PAPER_NAMES[s])} <code>{s}</code></span>"
             for s in STATES]
    items += [
        "<span class=\"key\"><i class=\"sw s-decoded cm\">ab</i>bold: committed in this pass</span>",
        "<span class=\"key\"><i class=\"sw s-soft rv\"></i>red frame: revised in this pass</span>",
        "<span class=\"key\"><i class=\"sw s-soft ob\"></i>faded: outside the current block</span>",
    ]
    if d2f:
        items += [f"<span class=\"key\"><i class=\"sw under p-{k}\"></i>d2f block: {_e(label)}</span>"
                  for k, label in BLOCK_LABELS.items()]
        items.append("<span class=\"key\"><i class=\"sw under p-none\"></i>d2f: not yet added</span>")
    items.append("<span class=\"key\">cell text: the token held after the pass</span>")
    return "<div class=\"legend\">" + "".join(items) + "</div>"


def _section(prompt: PromptTrace, text: TokenText, *, visible: bool, d2f: bool) -> str:
    n = prompt.positions
    final = prompt.steps[-1].tokens
    labels = ["▯" if t == text.mask_id else text.label(t) for t in final]
    answer = ("" if text.has_text else " ").join(labels)
    head = "".join(f"<th>{i}</th>" for i in range(n))
    rows = "\n".join(_row(s, text, d2f) for s in prompt.steps)
    return (f"<section class=\"prompt\" data-prompt=\"{prompt.index}\"{'' if visible else ' hidden'}>"
            f"<h2>prompt {prompt.index} · {len(prompt.steps)} passes × {n} positions · "
            f"{prompt.revisions} revision(s)</h2>"
            f"<p class=\"final\">final canvas: <span>{_e(answer)}</span></p>"
            f"<div class=\"scroll\"><table class=\"grid\"><thead><tr><th class=\"rh\">step</th>{head}"
            f"{'<th>d2f pipeline</th>' if d2f else ''}</tr></thead><tbody>\n{rows}\n</tbody></table></div></section>")


def _row(step: Step, text: TokenText, d2f: bool) -> str:
    committed, revised = set(step.committed), set(step.revised)
    kinds = _block_kinds(step) if d2f else None
    lo, hi = step.block
    cells = []
    for pos, (state, token) in enumerate(zip(step.states, step.tokens)):
        classes = ["c", f"s-{state}"]
        if not lo <= pos < hi:
            classes.append("ob")
        if pos in committed:
            classes.append("cm")
        if pos in revised:
            classes.append("rv")
        if kinds is not None:
            classes.append(f"p-{kinds[pos]}")
        label = "" if token == text.mask_id else text.label(token)
        flags = ((" data-revised=\"1\"" if pos in revised else "")
                 + (" data-committed=\"1\"" if pos in committed else ""))
        cells.append(f"<td class=\"{' '.join(classes)}\" data-step=\"{step.step}\" data-pos=\"{pos}\" "
                     f"data-state=\"{state}\" data-token=\"{token}\"{flags}>{_e(label)}</td>")
    pipe = f"<td class=\"pipe\">{_pipeline(step)}</td>" if d2f else ""
    return f"<tr data-step=\"{step.step}\"><th class=\"rh\">{step.step}</th>{''.join(cells)}{pipe}</tr>"


def _block_kinds(step: Step) -> list[str]:
    kinds = ["none"] * len(step.states)
    for b in step.blocks or []:
        kinds[b.start:b.end] = [block_kind(b.state, b.fully_activated)] * (b.end - b.start)
    return kinds


def _pipeline(step: Step) -> str:
    return "".join(f"<span class=\"pb k-{block_kind(b.state, b.fully_activated)}\">[{b.start},{b.end}) "
                   f"{block_kind(b.state, b.fully_activated)} {round(100 * b.progress)}%</span>"
                   for b in step.blocks or [])


# -- data for the tooltip ------------------------------------------------------------------------
def _payload(trace: Trace, prompts: list[PromptTrace], text: TokenText) -> str:
    ids: set[int] = set()
    data: dict[str, Any] = {}
    for p in prompts:
        steps = {}
        for s in p.steps:
            ids.update(s.tokens)
            for pairs in s.candidates or []:
                ids.update(t for t, _ in pairs)
            steps[str(s.step)] = {
                "block": list(s.block),
                "conf": [_short(c) for c in s.confidence],
                "cand": None if s.candidates is None else [
                    [[t, round(w, 4)] for t, w in pairs] for pairs in s.candidates],
                "blocks": None if s.blocks is None else [
                    [b.start, b.end, BLOCK_LABELS[block_kind(b.state, b.fully_activated)], b.progress]
                    for b in s.blocks],
            }
        data[str(p.index)] = {"steps": steps}
    payload = {"mask_id": trace.mask_id, "names": PAPER_NAMES, "prompts": data,
               "vocab": {str(i): text.label(i) for i in sorted(ids)} if text.has_text else {}}
    raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # inside <script> only "</" could end the element early; escape the three HTML-significant characters
    return raw.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _short(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


# -- style and script ----------------------------------------------------------------------------
def _css() -> str:
    states = "".join(f".s-{s}{{background:{STATE_COLOURS[s]};color:{TEXT_COLOURS[s]}}}" for s in STATES)
    blocks = "".join(f"td.p-{k},.under.p-{k}{{border-bottom:3px {'dashed' if k == 'semi' else 'solid'} {c}}}"
                     f".pb.k-{k}{{border-color:{c};border-style:{'dashed' if k == 'semi' else 'solid'}}}"
                     for k, c in BLOCK_COLOURS.items())
    return (
        "body{font:13px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px;color:#222;background:#fff}"
        "h1{font-size:18px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 4px}.meta,.final{color:#555;margin:2px 0}"
        ".final span{font-family:ui-monospace,Menlo,Consolas,monospace;color:#222}"
        ".legend{display:flex;flex-wrap:wrap;gap:6px 16px;margin:8px 0}"
        ".key{display:inline-flex;align-items:center;gap:5px}"
        ".sw{display:inline-block;width:22px;height:15px;font:bold 10px/15px monospace;text-align:center;"
        "font-style:normal;border:2px solid transparent;box-sizing:border-box}.sw.under{background:#eee}"
        ".scroll{overflow:auto;max-height:80vh;border:1px solid #ddd}"
        "table.grid{border-collapse:separate;border-spacing:1px;font:11px/1.25 ui-monospace,Menlo,Consolas,monospace}"
        "thead th{position:sticky;top:0;background:#fff;z-index:2;font-weight:normal;color:#777}"
        "th.rh{position:sticky;left:0;background:#fff;z-index:1;color:#777;font-weight:normal;padding:0 4px}"
        "thead th.rh{z-index:3}"
        "td.c{min-width:2.6em;max-width:6em;height:1.4em;padding:0 2px;overflow:hidden;white-space:nowrap;"
        "text-overflow:ellipsis;text-align:center;cursor:default;border:0 solid transparent;box-sizing:border-box}"
        + states +
        ".ob{opacity:.38}.cm{font-weight:700}"
        f".rv{{outline:2px solid {REVISED_COLOUR};outline-offset:-2px}}"
        "td.p-none,.under.p-none{border-bottom:3px dotted #ccc}"
        + blocks +
        "td.c:hover{outline:2px solid #000;outline-offset:-2px}"
        "td.pipe{white-space:nowrap;padding-left:8px;font-size:10px}"
        ".pb{display:inline-block;border:1px solid;border-radius:3px;padding:0 3px;margin-right:3px}"
        "#tip{position:fixed;display:none;z-index:10;max-width:360px;background:#fffff4;border:1px solid #888;"
        "box-shadow:0 2px 6px rgba(0,0,0,.25);padding:6px 8px;font:12px/1.35 ui-monospace,Menlo,Consolas,monospace;"
        "pointer-events:none}#tip.on{display:block}#tip .head{font-weight:700;margin-bottom:2px}"
        "#tip .sub{color:#555;margin-top:3px}#tip .cand{padding-left:10px;white-space:pre}"
    )


_SCRIPT = r"""
(() => {
  const data = JSON.parse(document.getElementById("trace-data").textContent);
  const tip = document.getElementById("tip");
  const pick = document.getElementById("prompt-select");
  if (pick) pick.addEventListener("change", () => {
    for (const s of document.querySelectorAll("section.prompt")) s.hidden = s.dataset.prompt !== pick.value;
  });
  const label = id => id === data.mask_id ? "[MASK]" : (data.vocab[id] ?? String(id));
  const line = (text, cls) => {
    const d = document.createElement("div");
    d.textContent = text;
    if (cls) d.className = cls;
    return d;
  };
  function fill(td) {
    const step = data.prompts[td.closest("section.prompt").dataset.prompt].steps[td.dataset.step];
    const pos = +td.dataset.pos, token = +td.dataset.token, state = td.dataset.state;
    const mark = td.dataset.revised ? " · revised in this pass"
               : td.dataset.committed ? " · committed in this pass" : "";
    const out = [line(`step ${td.dataset.step} · position ${pos} · ${data.names[state]}`, "head"),
                 line(token === data.mask_id ? "token: none committed yet"
                                             : `token: ${label(token)} (id ${token})${mark}`)];
    const conf = step.conf[pos];
    if (conf !== null) out.push(line(`confidence: ${conf.toPrecision(4)}`));
    const cands = step.cand ? step.cand[pos] : null;
    if (cands && (state === "soft" || state === "soft_mask")) {
      out.push(line("candidates (soft input weights):", "sub"));
      for (const [id, w] of cands) out.push(line(`${w.toFixed(4)}  ${label(id)}`, "cand"));
    } else {
      out.push(line(state === "mask" ? "input: the hard [MASK] embedding" : "input: the hard token embedding", "sub"));
    }
    out.push(line(`current block: [${step.block[0]}, ${step.block[1]})`, "sub"));
    for (const [s, e, kind, progress] of step.blocks || [])
      if (pos >= s && pos < e)
        out.push(line(`d2f block [${s}, ${e}): ${kind}, ${Math.round(progress * 100)}% decoded`));
    tip.replaceChildren(...out);
  }
  function place(e) {
    const pad = 14, r = tip.getBoundingClientRect();
    let x = e.clientX + pad, y = e.clientY + pad;
    if (x + r.width > innerWidth) x = Math.max(0, e.clientX - r.width - pad);
    if (y + r.height > innerHeight) y = Math.max(0, e.clientY - r.height - pad);
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  document.addEventListener("mouseover", e => {
    const td = e.target.closest ? e.target.closest("td.c") : null;
    if (!td) { tip.classList.remove("on"); return; }
    fill(td);
    tip.classList.add("on");
    place(e);
  });
  document.addEventListener("mousemove", e => { if (tip.classList.contains("on")) place(e); });
})();
"""
