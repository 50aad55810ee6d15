"""The loss chart draws what it says: the status message when there is nothing to plot, the curves when there is."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.plot import AVERAGE_COLOUR, RAW_COLOUR, loss_curve_png

SIZE = (480, 300)
PLOT_INSIDE = (70, 50, SIZE[0] - 20, SIZE[1] - 34)  # inside the plot area, clear of its axes and the legend above it
CURVE_BOX = (65, 40, SIZE[0] - 10, SIZE[1] - 30)  # where curve points may land (a point at the top reaches y 43)
HUNDRED = [1.0 / (1 + i) + 0.05 * math.sin(i) for i in range(100)]
WITH_GAPS = [0.5, math.nan, 0.4, math.inf, 0.3, -math.inf, 0.25, 0.2]


def _inside(image: Image.Image) -> np.ndarray:
    """The plot area's pixels as an (h, w, 3) array."""
    return np.asarray(image.crop(PLOT_INSIDE)).astype(int)


def _pixels_of(image: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    """(row, column) in CURVE_BOX of every pixel of exactly this colour."""
    return np.argwhere((np.asarray(image.crop(CURVE_BOX)).astype(int) == np.array(colour)).all(axis=-1))


def _ink_box(image: Image.Image) -> tuple[int, int, int, int]:
    """The bounding box (left, top, right, bottom) of the dark pixels in the plot area, in image coordinates."""
    dark = np.argwhere(_inside(image).max(axis=-1) < 160)
    assert dark.size, "no dark pixels in the plot area"
    x0, y0 = PLOT_INSIDE[:2]
    return int(dark[:, 1].min()) + x0, int(dark[:, 0].min()) + y0, int(dark[:, 1].max()) + x0, int(dark[:, 0].max()) + y0


@pytest.mark.parametrize(("losses", "message"), [([], "no steps yet"), ([math.nan, math.nan], "no finite loss values")])
def test_chart_without_finite_losses_writes_its_message(tmp_path: Path, losses: list[float], message: str) -> None:
    """The message is written as one line in the middle of the chart, and nothing else is drawn in the plot area."""
    path = tmp_path / "loss.png"
    image = loss_curve_png(losses, path, title="test loss", size=SIZE)
    with Image.open(path) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
    left, top, right, bottom = _ink_box(image)
    assert SIZE[0] / 3 < (left + right) / 2 < 2 * SIZE[0] / 3, (left, right)
    assert SIZE[1] / 3 < (top + bottom) / 2 < 2 * SIZE[1] / 3, (top, bottom)
    assert 4.5 * len(message) < right - left < 6.5 * len(message)  # one 12 px glyph per character
    assert bottom - top < 30  # one line of text
    assert len(_pixels_of(image, RAW_COLOUR)) == 0 and len(_pixels_of(image, AVERAGE_COLOUR)) == 0


def test_the_two_messages_differ_only_in_the_plot_area() -> None:
    """'no steps yet' and 'no finite loss values' are different texts: pixels differ inside the plot, nowhere else."""
    empty = np.asarray(loss_curve_png([], size=SIZE))
    all_nan = np.asarray(loss_curve_png([math.nan], size=SIZE))
    rows, columns = np.nonzero((empty != all_nan).any(axis=-1))
    assert rows.size > 50
    assert PLOT_INSIDE[0] <= columns.min() and columns.max() < PLOT_INSIDE[2]
    assert PLOT_INSIDE[1] <= rows.min() and rows.max() < PLOT_INSIDE[3]


def _column_runs(pixels: np.ndarray) -> int:
    """How many separate runs of consecutive columns the pixels occupy."""
    columns = np.unique(pixels[:, 1])
    return int(1 + (np.diff(columns) > 1).sum()) if columns.size else 0


def test_curves_are_drawn_in_their_colours() -> None:
    """Raw loss and its moving average draw lines of their own colours across the plot; the average is unbroken."""
    image = loss_curve_png(HUNDRED, size=SIZE)
    raw, average = _pixels_of(image, RAW_COLOUR), _pixels_of(image, AVERAGE_COLOUR)
    width = CURVE_BOX[2] - CURVE_BOX[0]
    assert len(raw) > 100 and np.ptp(raw[:, 1]) > 0.8 * width  # the thin raw line shows around the average
    assert len(average) > 200 and np.ptp(average[:, 1]) > 0.8 * width and _column_runs(average) == 1


def test_non_finite_steps_leave_gaps() -> None:
    """Finite steps 1, 3, 5 and 7-8 of WITH_GAPS are drawn as three dots and one segment, with gaps between."""
    average = _pixels_of(loss_curve_png(WITH_GAPS, size=SIZE), AVERAGE_COLOUR)
    assert _column_runs(average) == 4


def test_a_single_step_is_a_dot() -> None:
    """One loss value is drawn as a small dot of the average colour (covering the raw dot) in the middle."""
    dot = _pixels_of(loss_curve_png([0.42], size=SIZE), AVERAGE_COLOUR)
    assert 5 < len(dot) < 80
    assert np.ptp(dot[:, 0]) <= 8 and np.ptp(dot[:, 1]) <= 8
    assert abs(dot[:, 1].mean() + CURVE_BOX[0] - SIZE[0] / 2) < 0.1 * SIZE[0]


def test_a_falling_loss_is_drawn_falling() -> None:
    """The average line of a decreasing loss starts high on the left and ends low on the right."""
    average = _pixels_of(loss_curve_png(HUNDRED, size=SIZE), AVERAGE_COLOUR)
    columns = average[:, 1]
    first = average[columns < columns.min() + 20, 0].mean()  # rows grow downwards
    last = average[columns > columns.max() - 20, 0].mean()
    assert first < last - 0.5 * (CURVE_BOX[3] - CURVE_BOX[1])
