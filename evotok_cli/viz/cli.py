"""`evotok trace`: pictures of a `generate --trace` file. Only typer loads with the CLI; the tokenizer
(transformers) and matplotlib load inside the command, when they are asked for."""

from __future__ import annotations

from pathlib import Path

import typer

from evotok_cli.base.errors import EvotokError


def trace(
    file: Path = typer.Argument(..., help="trace written by `evotok generate --trace FILE.jsonl`", show_default=False),
    html: Path | None = typer.Option(None, "--html", help="write a self-contained HTML page (hover for candidates)",
                                     show_default=False),
    png: Path | None = typer.Option(None, "--png", help="write a static PNG of one prompt's grid", show_default=False),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="checkpoint folder whose tokenizer turns token ids into text "
                                          "[default: the one the trace recorded, if it is still there]",
                                     show_default=False),
    prompt_index: int | None = typer.Option(None, "--prompt-index",
                                            help="draw only this prompt (the PNG draws the first by default)",
                                            show_default=False),
) -> None:
    """Draw how tokens evolve: a grid of steps x generated positions per prompt, each cell coloured by
    its state ([MASK], Soft([MASK]+V), Soft(V), [Decode]) and showing its token; revisions framed in red;
    for d2f the block pipeline. The HTML shows each cell's candidates and weights on hover. Schema and
    colours: docs/trace.md.

    Example:

    \b
      evotok generate -p $'Sudoku 4x4 (0 = blank):\\n0012|0230|4320|0103' -d evotoken --trace run.jsonl
      evotok trace run.jsonl --html run.html --png run.png
    """
    from evotok_cli.base.console import stderr
    from evotok_cli.viz.trace import read_trace

    if html is None and png is None:
        raise EvotokError("nothing to draw", where="evotok trace", fix="pass --html OUT.html and/or --png OUT.png")
    from evotok_cli.base.files import not_an_input, output_file, same_file

    for path, flag in ((html, "--html"), (png, "--png")):
        if path is not None:
            output_file(path, flag)
            not_an_input(path, flag, {"FILE": file})
    if html is not None and png is not None and same_file(html, png):
        raise EvotokError("--html and --png name the same file", where="--png", fix="give each picture its own path")
    data = read_trace(file)
    data.select(prompt_index)  # a missing prompt fails before any file is written
    from evotok_cli.runtime.tokenizer import has_tokenizer

    if model is None and data.model and has_tokenizer(Path(data.model)):
        model = data.model
    text = _token_text(model, data.mask_id)
    err = stderr()
    if html is not None:
        from evotok_cli.viz.html import write_html
        err.print(f"wrote {write_html(data, html, text, prompt_index)}")
    if png is not None:
        from evotok_cli.viz.png import write_png
        err.print(f"wrote {write_png(data, png, text, prompt_index)}")


def _token_text(model: str | None, mask_id: int):
    from evotok_cli.viz.tokens import TokenText

    if model is None:
        return TokenText(None, mask_id)
    from evotok_cli.base.errors import CheckpointError
    from evotok_cli.runtime.tokenizer import load_tokenizer

    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise CheckpointError("no such folder", where=str(folder), fix="pass a checkpoint folder to --model")
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise CheckpointError("has no tokenizer.json", where=str(folder), fix="drop --model to show token ids")
    return TokenText(tokenizer, mask_id)


def register(app: typer.Typer) -> None:
    """Add `evotok trace` to the main app (called from evotok_cli/cli/app.py)."""
    app.command("trace")(trace)
