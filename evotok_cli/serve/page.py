"""GET /: one self-contained page (no network beyond this server, nothing external) that sends a chat
prompt with `"stream_mode": "evolve"` and draws each forward pass's canvas as it arrives, in the trace
viewer's colours (`viz/style.py`). Cells carry `data-pos` and `data-state` for scripts and tests."""

from __future__ import annotations

import html
from typing import Any

from evotok_cli.viz.style import PAPER_NAMES, REVISED_COLOUR, STATE_COLOURS, STATES, TEXT_COLOURS

# the page talks to this server only: no other origin, no plugins, no frames
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def render_page(model: str, decoders: list[str], defaults: dict[str, Any], decoder: str) -> str:
    options = "".join(f"<option{' selected' if d == decoder else ''}>{html.escape(d)}</option>" for d in decoders)
    legend = "".join(f"<span class=\"key\"><i class=\"sw s-{s}\"></i>{html.escape(PAPER_NAMES[s])}</span>"
                     for s in STATES)
    return _TEMPLATE.format(
        title=html.escape(f"evotok serve · {model}"), css=_css(), legend=legend, decoders=options,
        max_tokens=int(defaults["gen_length"]), script=_SCRIPT)


def _css() -> str:
    states = "".join(f".s-{s}{{background:{STATE_COLOURS[s]};color:{TEXT_COLOURS[s]}}}" for s in STATES)
    return (
        "body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px;color:#222;background:#fff;"
        "max-width:1100px}h1{font-size:18px;margin:0 0 8px}"
        "form{display:grid;grid-template-columns:1fr auto;gap:8px;margin:8px 0}"
        "textarea{font:13px ui-monospace,Menlo,Consolas,monospace;min-height:70px;padding:6px}"
        ".controls{display:flex;flex-direction:column;gap:6px;min-width:190px}.controls label{display:flex;"
        "justify-content:space-between;gap:6px}.controls input,.controls select{width:100px}"
        "button{padding:6px 14px;font-weight:600}"
        ".legend{margin:6px 0;display:flex;gap:14px;flex-wrap:wrap;color:#444}"
        ".sw{display:inline-block;width:22px;height:14px;margin-right:5px;vertical-align:-2px}"
        "#canvas{display:flex;flex-wrap:wrap;gap:2px;margin:10px 0;"
        "font:12px/1.2 ui-monospace,Menlo,Consolas,monospace}"
        ".cell{min-width:24px;padding:3px 4px;text-align:center;border:2px solid transparent;box-sizing:border-box;"
        "white-space:pre;border-radius:2px}"
        f".cell.rv{{border-color:{REVISED_COLOUR}}}.cell.cm{{font-weight:700}}.cell.ob{{opacity:.38}}"
        + states +
        "#status{color:#555}#status[data-state=error]{color:#b00020}"
        "#answer{background:#f6f6f6;padding:8px;white-space:pre-wrap;min-height:1.4em;"
        "font:13px ui-monospace,Menlo,Consolas,monospace}"
    )


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body>
<h1>{title}</h1>
<form id="form">
<textarea id="prompt" placeholder="Ask something" required></textarea>
<div class="controls">
<label>decoder <select id="decoder">{decoders}</select></label>
<label>max tokens <input id="max-tokens" type="number" min="1" value="{max_tokens}"></label>
<label>temperature <input id="temperature" type="number" min="0" step="0.1" value="0"></label>
<label>API key <input id="api-key" type="password" autocomplete="off"></label>
<div><button id="send" type="submit">Send</button> <button id="stop" type="button" disabled>Stop</button></div>
</div>
</form>
<div class="legend">{legend}<span class="key"><i class="sw cell rv"></i>revised</span></div>
<p id="status" data-state="idle">idle</p>
<div id="canvas" data-frames="0"></div>
<pre id="answer"></pre>
<script>{script}</script>
</body></html>
"""

_SCRIPT = r"""
(() => {
  const $ = (id) => document.getElementById(id);
  const visible = (t) => t === null ? '[MASK]' :
    (t.replace(/ /g, '\u2423').replace(/\n/g, '\u23ce').replace(/\t/g, '\u21e5') || '\u2205');
  let controller = null;

  function status(state, text) {
    const el = $('status');
    el.dataset.state = state;
    el.textContent = text;
  }

  function draw(frame) {
    const canvas = $('canvas');
    const [start, end] = frame.block;
    const committed = new Set(frame.committed), revised = new Set(frame.revised);
    const cells = canvas.children;
    while (cells.length < frame.tokens.length) canvas.appendChild(document.createElement('span'));
    while (cells.length > frame.tokens.length) canvas.lastChild.remove();
    frame.tokens.forEach((token, i) => {
      const cell = cells[i], state = frame.states[i];
      cell.className = 'cell s-' + state + (committed.has(i) ? ' cm' : '') + (revised.has(i) ? ' rv' : '') +
        (i < start || i >= end ? ' ob' : '');
      cell.dataset.pos = i;
      cell.dataset.state = state;
      cell.textContent = visible(token);
      const conf = frame.confidence[i];
      const cands = frame.candidates && frame.candidates[i] ?
        frame.candidates[i].map(([t, w]) => w.toFixed(3) + ' ' + visible(t)).join('\n') : '';
      cell.title = 'position ' + i + ' \u00b7 ' + state + (conf === null ? '' : ' \u00b7 confidence ' +
        conf.toFixed(3)) + (cands ? '\n' + cands : '');
    });
    canvas.dataset.frames = String(Number(canvas.dataset.frames) + 1);
    canvas.dataset.step = frame.step;
    status('running', 'step ' + frame.step);
  }

  function handle(data) {
    if (data === '[DONE]') return true;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message);
    if (chunk.evotok) draw(chunk.evotok);
    for (const choice of chunk.choices || []) {
      const text = choice.delta ? choice.delta.content : choice.text;
      if (text) $('answer').textContent += text;
      if (choice.finish_reason) $('answer').dataset.finish = choice.finish_reason;
    }
    return false;
  }

  async function send(event) {
    event.preventDefault();
    controller = new AbortController();
    $('send').disabled = true;
    $('stop').disabled = false;
    $('answer').textContent = '';
    $('canvas').textContent = '';
    $('canvas').dataset.frames = '0';
    status('running', 'waiting for the model');
    const headers = {'Content-Type': 'application/json'};
    if ($('api-key').value) headers.Authorization = 'Bearer ' + $('api-key').value;
    const body = {messages: [{role: 'user', content: $('prompt').value}], stream: true, stream_mode: 'evolve',
                  decoder: $('decoder').value, max_tokens: Number($('max-tokens').value),
                  temperature: Number($('temperature').value)};
    try {
      const res = await fetch('v1/chat/completions', {method: 'POST', headers, body: JSON.stringify(body),
                                                       signal: controller.signal});
      if (!res.ok) {
        const err = await res.json().catch(() => null);
        throw new Error(err && err.error ? err.error.message : res.status + ' ' + res.statusText);
      }
      const reader = res.body.getReader(), decoder = new TextDecoder();
      let buffer = '', finished = false;
      while (!finished) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while (!finished && (cut = buffer.indexOf('\n\n')) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split('\n'))
            if (line.startsWith('data: ') && handle(line.slice(6))) finished = true;
        }
      }
      status('done', 'done in ' + ($('canvas').dataset.step || 0) + ' passes (' +
             ($('answer').dataset.finish || 'no finish reason') + ')');
    } catch (err) {
      const aborted = err.name === 'AbortError';
      status(aborted ? 'stopped' : 'error', aborted ? 'stopped' : String(err.message));
    } finally {
      $('send').disabled = false;
      $('stop').disabled = true;
    }
  }

  $('form').addEventListener('submit', send);
  $('stop').addEventListener('click', () => controller && controller.abort());
})();
"""
