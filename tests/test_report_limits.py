"""`evotok bench report`'s plot shows every error bar whole (issue 31, item 6: the axis followed the values
alone and cut the bars of small runs off)."""

from __future__ import annotations

import pytest

from evotok_cli.bench.report import y_limits


@pytest.mark.parametrize("spans", [
    [(50.0, 10.0), (52.0, 1.0)],  # a wide bar: the old axis (45..57) cut it at both ends
    [(98.0, 4.0), (100.0, 0.0)],  # near the top: the bar above 100 stays visible
    [(2.0, 3.0)],  # near zero
    [(0.0, 0.0), (100.0, 0.0)],
    [(33.3, 21.1)],  # n = 6
])
def test_every_bar_is_inside_the_axis(spans):
    bottom, top = y_limits(spans)
    for value, error in spans:
        assert bottom < value - error and value + error < top
    assert bottom <= max(-2.0, min(v for v, _ in spans) - 5) and top >= min(102.0, max(v for v, _ in spans) + 5)


def test_the_usual_room_when_bars_are_small():
    assert y_limits([(60.0, 2.0), (70.0, 2.0)]) == (55.0, 75.0)
