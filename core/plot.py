"""Loss curve chart drawn with Pillow: raw loss, its moving average, axes and labels."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import InputError
from .images import save_png_atomic

BACKGROUND = (255, 255, 255)
AXIS_COLOUR = (90, 90, 90)
GRID_COLOUR = (232, 232, 232)
TEXT_COLOUR = (40, 40, 40)
RAW_COLOUR = (160, 190, 230)
AVERAGE_COLOUR = (20, 70, 160)
MIN_SIZE = (200, 120)

_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
_Box = tuple[int, int, int, int]


def default_font(size: int) -> _Font:
    """Pillow's bundled font at a pixel size (offline); the fixed bitmap font where FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def format_value(value: float) -> str:
    """A short label for a loss value (4 significant digits)."""
    return f"{value:.4g}"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the finite values among the last `window` steps; NaN where the step itself is not finite."""
    window = max(1, int(window))
    sums, counts = [0.0], [0]
    for value in values:
        finite = math.isfinite(value)
        sums.append(sums[-1] + (value if finite else 0.0))
        counts.append(counts[-1] + int(finite))
    result: list[float] = []
    for index, value in enumerate(values):
        start = max(0, index - window + 1)
        count = counts[index + 1] - counts[start]
        result.append((sums[index + 1] - sums[start]) / count if math.isfinite(value) else math.nan)
    return result


def step_ticks(n_steps: int, max_ticks: int = 6) -> list[int]:
    """Round step numbers (1-based) to label on the x axis, always including the first and last step."""
    if n_steps <= 0:
        return []
    raw = max(1.0, n_steps / max_ticks)
    magnitude = 10 ** math.floor(math.log10(raw))
    spacing = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    ticks = [1] + [int(t) for t in range(int(spacing), n_steps + 1, int(spacing)) if t > 1]
    if ticks[-1] != n_steps:
        if n_steps - ticks[-1] < spacing / 2 and len(ticks) > 1:
            ticks[-1] = n_steps
        else:
            ticks.append(n_steps)
    return ticks


def _value_range(finite: Sequence[float]) -> tuple[float, float]:
    """The y range to plot: the data min/max, widened when they are equal."""
    low, high = min(finite), max(finite)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        pad = abs(high) * 0.1 or 0.5
        return low - pad, high + pad
    return low, high


def _segments(points: Sequence[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """Split a point list at the missing (None) entries into runs of consecutive points."""
    runs: list[list[tuple[float, float]]] = [[]]
    for point in points:
        if point is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(point)
    return [run for run in runs if run]


def _draw_series(
    draw: ImageDraw.ImageDraw, points: Sequence[tuple[float, float] | None], colour: tuple, width: int
) -> None:
    """Draw a line through consecutive points, leaving gaps at missing ones; lone points become dots."""
    for run in _segments(points):
        if len(run) == 1:
            x, y = run[0]
            radius = width + 1
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        else:
            draw.line(run, fill=colour, width=width, joint="curve")


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: _Font) -> tuple[int, int]:
    """Width and height of a text label in pixels."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _centered_text(draw: ImageDraw.ImageDraw, box: _Box, text: str, font: _Font) -> None:
    """Write a text label centered in a box."""
    width, height = _text_size(draw, text, font)
    x = box[0] + (box[2] - box[0] - width) // 2
    y = box[1] + (box[3] - box[1] - height) // 2
    draw.text((x, y), text, fill=TEXT_COLOUR, font=font)


def _draw_axes(draw: ImageDraw.ImageDraw, plot: _Box) -> None:
    """The left and bottom axis lines of the plot area."""
    left, top, right, bottom = plot
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS_COLOUR, width=1)


def _draw_y_ticks(draw: ImageDraw.ImageDraw, plot: _Box, low: float, high: float, font: _Font) -> None:
    """Horizontal grid lines with value labels, from the lowest to the highest plotted value."""
    left, top, right, bottom = plot
    count = 5 if bottom - top >= 120 else 3
    for i in range(count):
        value = low + (high - low) * i / (count - 1)
        y = bottom - (bottom - top) * i / (count - 1)
        if 0 < i:
            draw.line([(left + 1, y), (right, y)], fill=GRID_COLOUR, width=1)
        draw.line([(left - 4, y), (left, y)], fill=AXIS_COLOUR, width=1)
        label = format_value(value)
        width, height = _text_size(draw, label, font)
        draw.text((left - 7 - width, y - height / 2 - 1), label, fill=TEXT_COLOUR, font=font)


def _draw_x_ticks(
    draw: ImageDraw.ImageDraw, plot: _Box, n_steps: int, x_of: Callable[[int], float], font: _Font
) -> None:
    """Tick marks with step-number labels under the plot area."""
    bottom = plot[3]
    for step in step_ticks(n_steps):
        x = x_of(step)
        draw.line([(x, bottom), (x, bottom + 4)], fill=AXIS_COLOUR, width=1)
        label = str(step)
        width, _ = _text_size(draw, label, font)
        draw.text((x - width / 2, bottom + 6), label, fill=TEXT_COLOUR, font=font)


def _draw_legend(draw: ImageDraw.ImageDraw, plot: _Box, summary: str, font: _Font) -> None:
    """Colour keys for the two lines and a last/min summary, above the top-right of the plot area."""
    right, top = plot[2], plot[1]
    items = [("loss", RAW_COLOUR), ("average", AVERAGE_COLOUR)]
    x = right - _text_size(draw, summary, font)[0]
    y = top - 18
    draw.text((x, y), summary, fill=TEXT_COLOUR, font=font)
    keys_width = sum(_text_size(draw, label, font)[0] + 30 for label, _ in items)
    if x - keys_width < 2:
        return
    for label, colour in reversed(items):
        width, _ = _text_size(draw, label, font)
        x -= width + 14
        draw.text((x, y), label, fill=TEXT_COLOUR, font=font)
        draw.line([(x - 14, y + 8), (x - 3, y + 8)], fill=colour, width=3)
        x -= 16


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    """Return (width, height) as ints if the chart fits in it, else raise InputError."""
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"plot: size {size!r} is not (width, height); pass two whole numbers such as (640, 360)"
        ) from exc
    if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
        raise InputError(f"plot: size {width}x{height} is too small; use at least {MIN_SIZE[0]}x{MIN_SIZE[1]}")
    return width, height


def loss_curve_png(
    losses: Sequence[float],
    path: Path | None = None,
    *,
    title: str = "training loss",
    size: tuple[int, int] = (640, 360),
) -> Image.Image:
    """Draw the loss per step (raw and moving average) as an RGB chart; save it as PNG atomically if `path` is given."""
    width, height = check_size(size)
    values = [float(v) for v in losses]
    font = default_font(12)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _centered_text(draw, (0, 4, width, 24), title, default_font(15))
    plot: _Box = (64, 46, width - 16, height - 30)
    _draw_axes(draw, plot)
    finite = [v for v in values if math.isfinite(v)]
    if not values or not finite:
        _centered_text(draw, plot, "no steps yet" if not values else "no finite loss values", font)
    else:
        _draw_curves(draw, plot, values, finite, font)
    if path is not None:
        save_png_atomic(image, Path(path))
    return image


def _draw_curves(draw: ImageDraw.ImageDraw, plot: _Box, values: list[float], finite: list[float], font: _Font) -> None:
    """Ticks, legend, raw loss line and moving-average line inside the plot area."""
    left, top, right, bottom = plot
    low, high = _value_range(finite)
    n_steps = len(values)
    inner_left, inner_right = left + 6, right - 4

    def x_of(step: int) -> float:
        if n_steps == 1:
            return (inner_left + inner_right) / 2
        return inner_left + (inner_right - inner_left) * (step - 1) / (n_steps - 1)

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * (value - low) / (high - low)

    _draw_y_ticks(draw, plot, low, high, font)
    _draw_x_ticks(draw, plot, n_steps, x_of, font)
    window = max(1, n_steps // 20)
    average = moving_average(values, window)
    raw_points = [(x_of(i + 1), y_of(v)) if math.isfinite(v) else None for i, v in enumerate(values)]
    average_points = [(x_of(i + 1), y_of(v)) if math.isfinite(v) else None for i, v in enumerate(average)]
    _draw_series(draw, raw_points, RAW_COLOUR, 1)
    _draw_series(draw, average_points, AVERAGE_COLOUR, 2)
    last = next(v for v in reversed(values) if math.isfinite(v))
    _draw_legend(draw, plot, f"last: {format_value(last)}   min: {format_value(min(finite))}", font)
