"""Screenshot an `evotok trace --html` page with the tooltip open on a cell, in headless Chromium.

    python docs/img/screenshot.py PAGE.html OUT.png [--revised | --step S --pos P]

With --revised (the default) the first revised cell (red frame) is hovered. Uses Debian's chromium through
playwright (`pip install playwright`; no `playwright install` needed).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--step", type=int)
    parser.add_argument("--pos", type=int)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000}, device_scale_factor=1)
        page.goto(args.page.resolve().as_uri())
        page.wait_for_load_state("load")
        visible = "section.prompt:not([hidden]) "
        if args.step is not None and args.pos is not None:
            cell = page.locator(f'{visible}td.c[data-step="{args.step}"][data-pos="{args.pos}"]')
        else:
            cell = page.locator(f"{visible}td.c[data-revised]").first
        if cell.count() == 0:
            raise SystemExit(f"{args.page}: no such cell (no revision in this trace?)")
        cell.scroll_into_view_if_needed()
        cell.hover()
        page.wait_for_timeout(200)
        page.screenshot(path=str(args.out), full_page=False)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
