"""A trace as a static picture (matplotlib, Agg): the HTML grid of one prompt, for papers and READMEs.

Same palette and marks as the page: cells coloured by input state, cells outside the current block
faded, revisions framed in red, d2f's pipeline as a line under each row (solid: fully activated, dashed:
semi-activated, orange: to cache, grey: cached). Token labels only where they stay legible.
"""

from __future__ import annotations

from pathlib import Path

from evotok_cli.base.errors import EvotokError
from evotok_cli.base.files import atomic_open
from evotok_cli.viz import style
from evotok_cli.viz.tokens import TokenText
from evotok_cli.viz.trace import PromptTrace, Trace

LABEL_MAX_POSITIONS = 48  # beyond this many columns (or LABEL_MAX_STEPS rows) labels would overlap
LABEL_MAX_STEPS = 80
CELL_INCHES = (0.34, 0.24)  # width, height of a labelled cell
SMALL_CELL_INCHES = (0.06, 0.06)  # an unlabelled cell: big traces stay a readable figure
MAX_INCHES = (24.0, 24.0)


def write_png(trace: Trace, out: str | Path, text: TokenText, prompt_index: int | None = None, dpi: int = 150) -> Path:
    """Draw one prompt (`prompt_index`, default the first) into `out`."""
    try:
        import matplotlib
    except ImportError:
        raise EvotokError("--png needs matplotlib", where="evotok trace",
                          fix="pip install matplotlib (or drop --png and use --html)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt = trace.select(prompt_index)[0]
    fig = draw(plt, trace, prompt, text)
    path = Path(out)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def draw(plt, trace: Trace, prompt: PromptTrace, text: TokenText):
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap, to_rgba
    from matplotlib.patches import Rectangle

    steps, n = len(prompt.steps), prompt.positions
    labelled = n <= LABEL_MAX_POSITIONS and steps <= LABEL_MAX_STEPS
    codes = np.array([[style.STATES.index(s) for s in step.states] for step in prompt.steps])  # (steps, n)
    cell = CELL_INCHES if labelled else SMALL_CELL_INCHES
    width = min(MAX_INCHES[0], max(6.0, 1.5 + n * cell[0]))
    height = min(MAX_INCHES[1], max(3.0, 1.8 + steps * cell[1]))
    fig, ax = plt.subplots(figsize=(width, height))
    ax.imshow(codes, cmap=ListedColormap([style.STATE_COLOURS[s] for s in style.STATES]), vmin=-0.5,
              vmax=len(style.STATES) - 0.5, aspect="auto", interpolation="nearest")

    fade = np.zeros((steps, n, 4))  # white veil over cells outside the current block
    for row, step in enumerate(prompt.steps):
        lo, hi = step.block
        fade[row, :lo] = fade[row, hi:] = (1, 1, 1, 0.6)
    ax.imshow(fade, aspect="auto", interpolation="nearest")

    for row, step in enumerate(prompt.steps):
        for pos in step.revised:
            ax.add_patch(Rectangle((pos - 0.5, row - 0.5), 1, 1, fill=False, edgecolor=style.REVISED_COLOUR,
                                   linewidth=1.6))

    pipeline = [(row, b) for row, step in enumerate(prompt.steps) for b in step.blocks or []]
    if pipeline:
        segments, colours, styles = [], [], []
        for row, b in pipeline:
            kind = style.block_kind(b.state, b.fully_activated)
            segments.append([(b.start - 0.5, row + 0.42), (b.end - 0.5, row + 0.42)])
            colours.append(to_rgba(style.BLOCK_COLOURS[kind]))
            styles.append("--" if kind == "semi" else "-")
        ax.add_collection(LineCollection(segments, colors=colours, linestyles=styles, linewidths=1.8))

    if labelled:
        _label_cells(ax, trace, prompt, text, size=6 if n > 24 else 7)

    ax.set_xlabel("generated position")
    ax.set_ylabel("step (forward pass)")
    ax.set_yticks(_ticks(steps), [str(prompt.steps[i].step) for i in _ticks(steps)])
    ax.set_xticks(_ticks(n), [str(i) for i in _ticks(n)])
    ax.set_title(f"{trace.decoder} · prompt {prompt.index} · {steps} passes × {n} positions · "
                 f"{prompt.revisions} revision(s)", fontsize=10)

    ax.legend(handles=_legend(bool(pipeline)), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)
    return fig


def _label_cells(ax, trace: Trace, prompt: PromptTrace, text: TokenText, size: int) -> None:
    """Each decoded cell's token text; bold where the token was committed in that pass."""
    for row, step in enumerate(prompt.steps):
        committed = set(step.committed)
        for pos, token in enumerate(step.tokens):
            if token == trace.mask_id:
                continue
            ax.text(pos, row, text.label(token)[:5], ha="center", va="center", fontsize=size,
                    color=style.TEXT_COLOURS[step.states[pos]], fontweight="bold" if pos in committed else "normal",
                    family="monospace")


def _legend(pipeline: bool) -> list:
    """The four states, revisions, the veil outside the block and, for d2f traces, the block kinds."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=style.STATE_COLOURS[s], edgecolor="#666", label=style.PAPER_NAMES[s])
               for s in style.STATES]
    handles += [Patch(facecolor="none", edgecolor=style.REVISED_COLOUR, linewidth=1.6, label="revised"),
                Patch(facecolor="#f3f3f3", edgecolor="#666", label="outside current block")]
    if pipeline:
        from matplotlib.lines import Line2D
        handles += [Line2D([], [], color=style.BLOCK_COLOURS[k], linestyle="--" if k == "semi" else "-", linewidth=1.8,
                           label=f"d2f: {label}") for k, label in style.BLOCK_LABELS.items()]
    return handles


def _ticks(count: int) -> list[int]:
    """At most ~16 evenly spaced tick indices."""
    every = max(1, -(-count // 16))
    return list(range(0, count, every))
