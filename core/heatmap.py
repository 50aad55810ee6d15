"""Attention heatmaps drawn with numpy and Pillow: where the identity token looks, over each training photo."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import InputError
from .images import save_png_atomic
from .plot import BACKGROUND, TEXT_COLOUR, default_font

# Dark-to-bright anchors (position, RGB) close to matplotlib's "inferno"; luma rises strictly from one to the next.
COLORMAP_ANCHORS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.00, (0, 0, 4)),
    (0.25, (87, 16, 110)),
    (0.50, (188, 55, 84)),
    (0.75, (249, 142, 9)),
    (1.00, (252, 255, 164)),
)
LUMA_WEIGHTS = np.array([0.2126, 0.7152, 0.0722])  # Rec. 709, on the sRGB values
COLD_WEIGHT = 0.4  # share of `alpha` the colour keeps where the map is 0, so cold parts dim but the photo shows

PAD = 8  # margin around the grid and gap between tiles and rows
TITLE_HEIGHT = 20  # band for the column titles
LINE_HEIGHT = 16  # one line of note or footer text
LEGEND_HEIGHT = 38  # colour bar with its "low"/"high" labels, and the line saying how maps are scaled
BAR_HEIGHT = 10
MAX_BAR_WIDTH = 200
MAX_NOTE_LINES = 3
MAX_ROWS = 8
MIN_TILE = 32
LETTERBOX = (60, 60, 60)
FONT_SIZE = 12
SCALE_NOTE = "each map scaled to its own peak"

_Colour = tuple[int, int, int]


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape; clipped, NaN as 0) as uint8 RGB (..., 3): near-black, purple, orange, yellow."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    values = np.clip(values, 0.0, 1.0)
    positions = [position for position, _ in COLORMAP_ANCHORS]
    channels = [np.interp(values, positions, [colour[c] for _, colour in COLORMAP_ANCHORS]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def normalise_heat(heat: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] by its own peak; negative and non-finite values count as 0; an all-zero map stays 0."""
    heat = np.asarray(heat, dtype=np.float64)
    heat = np.where(np.isfinite(heat), np.maximum(heat, 0.0), 0.0)
    peak = float(heat.max()) if heat.size else 0.0
    return heat / peak if peak > 0.0 else np.zeros_like(heat)


def _photo_array(photo: np.ndarray, what: str) -> np.ndarray:
    """A photo as uint8 (H, W, 3); floats are read as 0..1; anything else raises InputError naming `what`."""
    array = np.asarray(photo)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"{what}: expected an RGB array (height, width, 3), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        return np.rint(np.clip(np.nan_to_num(array), 0.0, 1.0) * 255).astype(np.uint8)
    if array.dtype != np.uint8:
        raise InputError(f"{what}: expected uint8 (0..255) or float (0..1) pixels, got {array.dtype}")
    return array


def _heat_array(heat: np.ndarray, what: str) -> np.ndarray:
    """An attention map as a non-empty 2-D float array; anything else raises InputError naming `what`."""
    array = np.asarray(heat)
    if array.ndim != 2 or array.size == 0 or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{what}: expected a 2-D attention map (h, w) of numbers, got shape {array.shape}")
    return array.astype(np.float64)


def upsample(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 2-D map resized smoothly (bilinear) to (height, width) as float32."""
    image = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(photo: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The map, scaled to its peak and upsampled, coloured over the photo (weight `alpha` at the peak, less if cold)."""
    photo = _photo_array(photo, "overlay photo")
    heat = normalise_heat(_heat_array(heat, "overlay heat"))
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"overlay: alpha {alpha} is outside 0..1")
    height, width = photo.shape[:2]
    smooth = np.clip(upsample(heat, height, width), 0.0, 1.0)
    weight = (alpha * (COLD_WEIGHT + (1.0 - COLD_WEIGHT) * smooth))[..., None]
    blended = (1.0 - weight) * photo + weight * heat_colours(smooth)
    return np.rint(blended).clip(0, 255).astype(np.uint8)


def fit_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) of a picture scaled to fit a tile x tile square without distortion."""
    scale = tile / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _tile(photo: np.ndarray, heat: np.ndarray | None, tile: int) -> Image.Image:
    """One square tile: the photo (with the map over it, if given) fitted and letterboxed to tile x tile."""
    height, width = fit_size(photo.shape[0], photo.shape[1], tile)
    fitted = np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.LANCZOS))
    picture = Image.fromarray(fitted if heat is None else overlay(fitted, heat))
    square = Image.new("RGB", (tile, tile), LETTERBOX)
    square.paste(picture, ((tile - width) // 2, (tile - height) // 2))
    return square


def _text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
    """Width of a text line in pixels in the grid's font."""
    left, _, right, _ = draw.textbbox((0, 0), text, font=default_font(FONT_SIZE))
    return int(right - left)


def _shorten(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """The text, cut and ended with '...' if it is wider than `width` pixels."""
    if _text_width(draw, text) <= width:
        return text
    while text and _text_width(draw, text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..."


def wrap_text(draw: ImageDraw.ImageDraw, text: str, width: int, max_lines: int = MAX_NOTE_LINES) -> list[str]:
    """The text broken into lines at most `width` px wide (at most `max_lines`, the last ending '...' if cut)."""
    lines: list[str] = []
    for paragraph in text.splitlines():
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and _text_width(draw, candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        if line:
            lines.append(line)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1] + " ..."]
    return [_shorten(draw, line, width) for line in lines]


def grid_size(rows: int, tiles_per_row: int, tile: int, note_lines: int, hidden: int) -> tuple[int, int]:
    """(width, height) of a grid: tiles and gaps, title band, note lines per row, '+N more' line, legend."""
    width = PAD + tiles_per_row * (tile + PAD)
    row_height = tile + note_lines * LINE_HEIGHT + PAD
    footer = LINE_HEIGHT if hidden else 0
    return width, PAD + TITLE_HEIGHT + rows * row_height + footer + LEGEND_HEIGHT + PAD


def _check_columns(columns: Sequence[tuple[str, Sequence[np.ndarray]]], n_photos: int) -> list[tuple[str, list]]:
    """The (title, maps) pairs as lists, each with one 2-D map per photo; else InputError naming the column."""
    if not columns:
        raise InputError("attention grid: no map columns; pass at least one (title, maps) pair such as ('start', maps)")
    checked = []
    for number, column in enumerate(columns, start=1):
        if not isinstance(column, (tuple, list)) or len(column) != 2 or not isinstance(column[0], str):
            raise InputError(f"attention grid: column {number} is not a (title, maps) pair")
        title, maps = column[0], list(column[1])
        if len(maps) != n_photos:
            raise InputError(
                f"attention grid: column '{title}' has {len(maps)} maps for {n_photos} photos; pass one map per photo"
            )
        what = f"attention grid: column '{title}', map"
        checked.append((title, [_heat_array(heat, f"{what} {i + 1}") for i, heat in enumerate(maps)]))
    return checked


def _check_notes(notes: Sequence[str] | None, n_photos: int) -> list[str]:
    """One note per photo (empty strings when none are given); a wrong count raises InputError."""
    if notes is None:
        return [""] * n_photos
    if isinstance(notes, str) or len(notes) != n_photos:
        count = "a single string" if isinstance(notes, str) else f"{len(notes)} notes"
        raise InputError(f"attention grid: notes has {count} for {n_photos} photos; pass one note per photo (or None)")
    return [str(note) for note in notes]


def _draw_legend(image: Image.Image, top: int) -> None:
    """A colour bar from 'low' to 'high' centred at `top`, and the scaling note under it."""
    draw, width = ImageDraw.Draw(image), image.width
    font = default_font(FONT_SIZE)
    low_width, high_width = _text_width(draw, "low"), _text_width(draw, "high")
    bar_width = max(20, min(MAX_BAR_WIDTH, width - 2 * PAD - low_width - high_width - 12))
    left = (width - (low_width + bar_width + high_width + 12)) // 2
    bar_left = left + low_width + 6
    bar = heat_colours(np.linspace(0.0, 1.0, bar_width))
    image.paste(Image.fromarray(np.repeat(bar[None], BAR_HEIGHT, axis=0)), (bar_left, top + 3))
    draw.text((left, top), "low", fill=TEXT_COLOUR, font=font)
    draw.text((bar_left + bar_width + 6, top), "high", fill=TEXT_COLOUR, font=font)
    note = _shorten(draw, SCALE_NOTE, width - 2 * PAD)
    draw.text(((width - _text_width(draw, note)) // 2, top + LINE_HEIGHT + 2), note, fill=TEXT_COLOUR, font=font)


def attention_grid(
    photos: Sequence[np.ndarray],
    columns: Sequence[tuple[str, Sequence[np.ndarray]]],
    notes: Sequence[str] | None = None,
    tile: int = 192,
    *,
    max_rows: int = MAX_ROWS,
) -> Image.Image:
    """One row per photo (at most `max_rows`): the photo, then each column's map over it; titles, notes, legend."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < MIN_TILE:
        raise InputError(f"attention grid: tile {tile!r} is not a whole number of pixels >= {MIN_TILE}")
    if len(photos) == 0:
        raise InputError("attention grid: no photos; pass at least one training photo")
    checked_photos = [_photo_array(p, f"attention grid: photo {i + 1}") for i, p in enumerate(photos)]
    checked_columns = _check_columns(columns, len(checked_photos))
    all_notes = _check_notes(notes, len(checked_photos))
    shown = min(len(checked_photos), max(1, int(max_rows)))
    hidden = len(checked_photos) - shown
    tiles_per_row = 1 + len(checked_columns)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = tiles_per_row * (tile + PAD) - PAD
    wrapped = [wrap_text(measure, note, text_width) for note in all_notes[:shown]]
    note_lines = max(len(lines) for lines in wrapped)
    width, height = grid_size(shown, tiles_per_row, tile, note_lines, hidden)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = default_font(FONT_SIZE)
    titles = ["photo"] + [title for title, _ in checked_columns]
    for index, title in enumerate(titles):
        text = _shorten(draw, title, tile)
        x = PAD + index * (tile + PAD) + (tile - _text_width(draw, text)) // 2
        draw.text((x, PAD + 3), text, fill=TEXT_COLOUR, font=font)
    top = PAD + TITLE_HEIGHT
    for row in range(shown):
        photo = checked_photos[row]
        heats = [None] + [maps[row] for _, maps in checked_columns]
        for index, heat in enumerate(heats):
            image.paste(_tile(photo, heat, tile), (PAD + index * (tile + PAD), top))
        for line_number, line in enumerate(wrapped[row]):
            draw.text((PAD, top + tile + 2 + line_number * LINE_HEIGHT), line, fill=TEXT_COLOUR, font=font)
        top += tile + note_lines * LINE_HEIGHT + PAD
    if hidden:
        more = f"+{hidden} more photo{'s' if hidden != 1 else ''} not shown"
        draw.text((PAD, top), _shorten(draw, more, text_width), fill=TEXT_COLOUR, font=font)
        top += LINE_HEIGHT
    _draw_legend(image, top)
    return image


def save_attention_png(image: Image.Image, path: Path) -> Path:
    """Write the grid as a PNG atomically (temp file, then replace); overwrites an existing file like the loss chart."""
    return save_png_atomic(image.convert("RGB"), Path(path))


def _photo_arrays(pixels: object) -> list[np.ndarray]:
    """Training photos (N, 3, H, W) in [-1, 1] (a torch tensor or numpy array) as uint8 (H, W, 3) arrays."""
    values = np.asarray(pixels.detach().float().cpu() if hasattr(pixels, "detach") else pixels, dtype=np.float32)
    return [((np.moveaxis(v, 0, -1) + 1) * 127.5).clip(0, 255).round().astype(np.uint8) for v in values]


def _share_note(number: int, start: float | None, end: float | None) -> str:
    """'photo 1: 41% inside the face mask at the start, 78% at the end'."""
    parts = [f"{start:.0%} inside the face mask at the start"] if start is not None else []
    if end is not None:
        parts.append(f"{end:.0%} at the end")
    return f"photo {number}: " + ", ".join(parts)


def attention_picture(pixels: object, maps: object | None, tile: int = 192) -> Image.Image:
    """The training photos with where the identity looks at the start and the end (a trainer's AttentionMaps).

    Without maps (attention recording off) a small picture says so, so the node's output is always an image.
    """
    if maps is None:
        image = Image.new("RGB", (tile * 2, 48), (30, 30, 30))
        ImageDraw.Draw(image).text((8, 16), "no attention maps were recorded", fill=(220, 220, 220))
        return image
    photos = _photo_arrays(pixels)
    columns = [("start", list(maps.start))]
    if maps.end is not None:
        columns.append((f"end (step {maps.end_step})", list(maps.end)))
    notes = None
    if maps.inside_start is not None:
        ends = list(maps.inside_end) if maps.inside_end is not None else [None] * len(photos)
        notes = [_share_note(n, float(s), None if e is None else float(e))
                 for n, (s, e) in enumerate(zip(maps.inside_start, ends), start=1)]
    return attention_grid(photos, columns, notes, tile=tile)
