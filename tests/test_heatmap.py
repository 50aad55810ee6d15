"""The attention heatmap picture: its colormap, the overlay on a photo, the grid's layout and checks, and saving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.heatmap import (
    COLD_WEIGHT,
    LEGEND_HEIGHT,
    LETTERBOX,
    LINE_HEIGHT,
    PAD,
    TITLE_HEIGHT,
    attention_grid,
    heat_colours,
    overlay,
    save_attention_png,
)

LUMA = np.array([0.2126, 0.7152, 0.0722])
TILE = 64


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 luma of uint8 RGB values (..., 3)."""
    return rgb.astype(float) @ LUMA


def _hot_corner(size: int = 8, scale: float = 5.0) -> np.ndarray:
    """A map that is 0 everywhere except its top-left cell."""
    heat = np.zeros((size, size))
    heat[0, 0] = scale
    return heat


def _uniform_photo(colour: tuple[int, int, int], height: int = TILE, width: int = TILE) -> np.ndarray:
    """A photo of one colour."""
    return np.full((height, width, 3), colour, dtype=np.uint8)


def _random_photo(seed: int, size: int = TILE) -> np.ndarray:
    """A photo of random pixels, seeded."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _tile_box(row: int, column: int, tile: int = TILE, note_lines: int = 0) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) of one tile in a grid, from the layout's constants."""
    left = PAD + column * (tile + PAD)
    top = PAD + TITLE_HEIGHT + row * (tile + note_lines * LINE_HEIGHT + PAD)
    return left, top, left + tile, top + tile


def _crop(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels of a box of an image as an int array (h, w, 3)."""
    return np.asarray(image.crop(box)).astype(int)


def test_colormap_brightens_strictly_from_dark_to_bright() -> None:
    """Luma rises at every step across [0, 1] (up to uint8 rounding on a fine grid); 0 is near black and 1 is bright."""
    luma = _luma(heat_colours(np.linspace(0.0, 1.0, 65)))
    assert np.all(np.diff(luma) > 0), np.diff(luma)
    fine = _luma(heat_colours(np.linspace(0.0, 1.0, 1001)))
    assert np.diff(fine).min() > -0.5  # on a fine grid it may dip only by uint8 rounding (one step of a channel)
    assert np.all(np.diff(fine[::20]) > 0)
    assert luma[0] < 10 and luma[-1] > 230
    colours = heat_colours(np.zeros((2, 3)))
    assert colours.shape == (2, 3, 3) and colours.dtype == np.uint8


def test_colormap_clips_values_outside_the_range_and_nan() -> None:
    """Below 0 and NaN take the colour of 0, above 1 the colour of 1."""
    low, high = heat_colours(np.array([0.0, 1.0]))
    assert heat_colours(np.array([-3.0, np.nan, 7.0])).tolist() == [low.tolist(), low.tolist(), high.tolist()]


def test_overlay_is_brightest_and_warmest_where_the_map_peaks() -> None:
    """A map hot in its top-left corner makes that corner of a grey photo brighter and redder than the opposite one."""
    out = overlay(_uniform_photo((128, 128, 128)), _hot_corner()).astype(int)
    assert out.shape == (TILE, TILE, 3) and overlay(_uniform_photo((1, 1, 1)), _hot_corner()).dtype == np.uint8
    hot, cold = out[0, 0], out[-1, -1]
    assert _luma(hot) > _luma(cold) + 40
    assert hot[0] - hot[2] > 30 and abs(cold[0] - cold[2]) <= 1  # warm (red over blue) only where it is hot
    top_row = _luma(out[0])
    between = (top_row > _luma(cold) + 5) & (top_row < _luma(hot) - 5)
    assert between.sum() >= 4  # upsampled smoothly: a ramp of in-between shades, not one hard block edge


def test_overlay_scales_each_map_by_its_own_peak() -> None:
    """Any positive scale of the same map gives the same picture."""
    photo = _random_photo(1)
    heat = np.random.default_rng(2).random((16, 16))
    assert np.array_equal(overlay(photo, heat), overlay(photo, heat * 1e-6))
    assert np.array_equal(overlay(photo, heat), overlay(photo, heat * 1e6))


def test_overlay_leaves_the_photo_visible_where_the_map_is_zero() -> None:
    """Far from the peak the photo only dims by the cold colour's small weight; at alpha 0 it is unchanged."""
    photo = _random_photo(3)
    alpha = 0.55
    out = overlay(photo, _hot_corner(), alpha=alpha).astype(int)
    far = (slice(TILE // 2, None), slice(TILE // 2, None))
    expected = np.rint((1 - alpha * COLD_WEIGHT) * photo[far])
    assert np.abs(out[far] - expected).max() <= 1
    assert np.corrcoef(out[far].ravel(), photo[far].ravel())[0, 1] > 0.999
    assert np.array_equal(overlay(photo, _hot_corner(), alpha=0.0), photo)


@pytest.mark.parametrize(
    "heat",
    [np.zeros((8, 8)), np.full((8, 8), np.nan), np.full((8, 8), -2.0)],
    ids=["zeros", "nan", "negative"],
)
def test_a_map_without_attention_gives_a_valid_dim_picture(heat: np.ndarray) -> None:
    """All-zero (or NaN, or negative) maps divide by nothing: the photo dimmed by the cold colour, no NaN, no error."""
    photo = _random_photo(4)
    with np.errstate(all="raise"):
        out = overlay(photo, heat)
    assert out.dtype == np.uint8 and out.shape == photo.shape
    assert np.abs(out.astype(int) - np.rint((1 - 0.55 * COLD_WEIGHT) * photo)).max() <= 1
    grid = attention_grid([photo], [("start", [heat])], tile=TILE)
    assert np.isfinite(np.asarray(grid, dtype=float)).all()


def test_overlay_refuses_a_map_that_is_not_2d() -> None:
    """A (1, h, w) map is a caller bug: InputError (a ValueError) saying what shape it got."""
    with pytest.raises(ValueError, match=r"overlay heat.*\(1, 8, 8\)"):
        overlay(_random_photo(5), np.zeros((1, 8, 8)))


def test_grid_size_is_tiles_plus_title_notes_and_legend() -> None:
    """Width: pad + 3 x (tile + pad). Height: pad + title + rows x (tile + note lines + pad) + legend + pad."""
    photos = [_random_photo(i) for i in range(3)]
    columns = [("start", [np.ones((8, 8))] * 3), ("end (step 320)", [_hot_corner()] * 3)]
    plain = attention_grid(photos, columns, tile=TILE)
    assert plain.size == (8 + 3 * (64 + 8), 8 + 20 + 3 * (64 + 8) + 38 + 8) == (224, 290)
    noted = attention_grid(photos, columns, notes=["photo 1: 41%", "photo 2: 50%", ""], tile=TILE)
    assert noted.size == (224, 8 + 20 + 3 * (64 + 16 + 8) + 38 + 8)
    assert attention_grid(photos, columns, tile=100).size == (8 + 3 * 108, 8 + 20 + 3 * 108 + 38 + 8)
    assert (PAD, TITLE_HEIGHT, LINE_HEIGHT, LEGEND_HEIGHT) == (8, 20, 16, 38)


def test_grid_puts_the_photo_first_and_each_maps_overlay_after_it() -> None:
    """Row 2's photo column is that photo; its map columns are the overlays, hot in the corner the map says."""
    photos = [_uniform_photo((200, 40, 40)), _uniform_photo((40, 200, 40))]
    hot_bottom_right = _hot_corner()[::-1, ::-1]
    grid = attention_grid(
        photos, [("start", [_hot_corner(), _hot_corner()]), ("end", [_hot_corner(), hot_bottom_right])], tile=TILE
    )
    photo_tile = _crop(grid, _tile_box(1, 0))
    assert np.all(photo_tile == (40, 200, 40))
    start_tile, end_tile = _crop(grid, _tile_box(1, 1)), _crop(grid, _tile_box(1, 2))
    assert np.array_equal(start_tile, overlay(photos[1], _hot_corner()))
    assert _luma(start_tile[2, 2]) > _luma(start_tile[-3, -3]) + 40
    assert _luma(end_tile[-3, -3]) > _luma(end_tile[2, 2]) + 40


def test_grid_writes_column_titles_and_notes() -> None:
    """Text (dark pixels) appears in the title band over each column and in the note line under a noted row only."""
    photos = [_uniform_photo((255, 255, 255)), _uniform_photo((255, 255, 255))]
    grid = attention_grid(
        photos, [("start", [np.ones((4, 4))] * 2)], notes=["photo 1: 41% inside the face", ""], tile=TILE
    )
    for column in range(2):
        left, top, right, _ = _tile_box(0, column, note_lines=1)
        assert (_crop(grid, (left, top - TITLE_HEIGHT, right, top)).max(axis=-1) < 128).any(), column
    for row, noted in [(0, True), (1, False)]:
        left, _, _, bottom = _tile_box(row, 0, note_lines=1)
        band = _crop(grid, (left, bottom, grid.width - PAD, bottom + LINE_HEIGHT))
        assert (band.max(axis=-1) < 128).any() == noted, row


def test_long_notes_wrap_onto_more_lines_up_to_three() -> None:
    """A note wider than the row adds one line height per extra line; beyond three lines it is cut."""
    photos = [_random_photo(6)]
    columns = [("start", [np.ones((8, 8))])]
    one = attention_grid(photos, columns, notes=["short"], tile=TILE)
    two = attention_grid(photos, columns, notes=["photo 1: 41% inside the face mask"], tile=TILE)
    many = attention_grid(photos, columns, notes=[" ".join(["word"] * 200)], tile=TILE)
    assert two.height - one.height == LINE_HEIGHT
    assert many.height - one.height == 2 * LINE_HEIGHT
    assert one.width == two.width == many.width == 8 + 2 * 72


def test_non_square_photos_are_letterboxed_without_distortion() -> None:
    """A 2:1 photo fills the tile's width and half its height, centred between two letterbox bands."""
    grid = attention_grid(
        [_uniform_photo((200, 40, 40), height=50, width=100)], [("start", [np.ones((4, 4))])], tile=TILE
    )
    tile = _crop(grid, _tile_box(0, 0))
    assert np.all(tile[:16] == LETTERBOX) and np.all(tile[-16:] == LETTERBOX)
    assert np.all(tile[16:-16] == (200, 40, 40))


def test_legend_shows_the_colour_bar_from_low_to_high() -> None:
    """The legend band holds the colormap's darkest and brightest colours, and they are not in the rows above it."""
    grid = attention_grid([_uniform_photo((128, 128, 128))], [("start", [np.zeros((4, 4))])], tile=TILE)
    legend = _crop(grid, (0, grid.height - PAD - LEGEND_HEIGHT, grid.width, grid.height)).reshape(-1, 3)
    rows = _crop(grid, (0, 0, grid.width, grid.height - PAD - LEGEND_HEIGHT)).reshape(-1, 3)
    for colour in heat_colours(np.array([0.0, 1.0])).astype(int):
        assert (legend == colour).all(axis=1).any(), colour
        assert not (rows == colour).all(axis=1).any(), colour


@pytest.mark.parametrize(
    ("columns", "notes", "message"),
    [
        (
            [("start", [np.ones((8, 8))] * 3), ("end (step 320)", [np.ones((8, 8))] * 2)],
            None,
            r"'end \(step 320\)' has 2 maps for 3 photos",
        ),
        ([("start", [np.ones((8, 8))] * 4)], None, r"'start' has 4 maps for 3 photos"),
        ([("start", [np.ones((8, 8)), np.ones((8, 8)), np.ones((2, 8, 8))])], None, r"'start', map 3.*\(2, 8, 8\)"),
        ([("start", [np.ones((8, 8))] * 3)], ["a", "b"], r"notes has 2 notes for 3 photos"),
        ([], None, r"no map columns"),
    ],
    ids=["short-column", "long-column", "map-not-2d", "notes", "no-columns"],
)
def test_grid_refuses_inputs_that_do_not_line_up(columns: list, notes: list[str] | None, message: str) -> None:
    """A column with the wrong number of maps, a bad map, or the wrong number of notes: ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        attention_grid([_random_photo(i) for i in range(3)], columns, notes=notes, tile=TILE)


def test_grid_refuses_no_photos_and_bad_photos() -> None:
    """No photos, or a photo that is not (H, W, 3): ValueError naming the photo."""
    with pytest.raises(ValueError, match="no photos"):
        attention_grid([], [("start", [])], tile=TILE)
    with pytest.raises(ValueError, match=r"photo 2.*\(64, 64\)"):
        attention_grid([_random_photo(0), np.zeros((64, 64), np.uint8)], [("start", [np.ones((4, 4))] * 2)], tile=TILE)


def test_more_photos_than_rows_shown_adds_a_footer() -> None:
    """Ten photos show eight rows plus one '+2 more' line; the eight rows are the same as for eight photos."""
    photos = [_random_photo(i) for i in range(10)]
    maps = [np.random.default_rng(i).random((8, 8)) for i in range(10)]
    eight = attention_grid(photos[:8], [("start", maps[:8])], tile=TILE)
    ten = attention_grid(photos, [("start", maps)], tile=TILE)
    assert eight.height == 8 + 20 + 8 * (64 + 8) + 38 + 8
    assert ten.size == (eight.width, eight.height + LINE_HEIGHT)
    rows_end = _tile_box(7, 0)[3] + PAD
    assert np.array_equal(_crop(ten, (0, 0, ten.width, rows_end)), _crop(eight, (0, 0, eight.width, rows_end)))
    footer = _crop(ten, (0, rows_end, ten.width, rows_end + LINE_HEIGHT))
    assert (footer.max(axis=-1) < 128).any()
    three = attention_grid(photos[:3], [("start", maps[:3])], tile=TILE, max_rows=2)
    assert three.height == 8 + 20 + 2 * (64 + 8) + LINE_HEIGHT + 38 + 8


def test_saving_writes_a_readable_png_and_replaces_an_old_one(tmp_path: Path) -> None:
    """The PNG reads back as the same pixels (folders made as needed); saving again overwrites; no temp files stay."""
    first = attention_grid([_random_photo(7)], [("start", [np.ones((4, 4))])], tile=TILE)
    second = attention_grid([_random_photo(8)], [("start", [_hot_corner()])], tile=TILE)
    path = tmp_path / "run" / "attention.png"
    assert save_attention_png(first, path) == path
    save_attention_png(second, path)
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(second))
    assert os.listdir(path.parent) == ["attention.png"]


def test_a_failed_save_leaves_the_old_png_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If writing stops half-way, the file already there is untouched and no partial file is left beside it."""
    path = tmp_path / "attention.png"
    save_attention_png(attention_grid([_random_photo(9)], [("start", [np.ones((4, 4))])], tile=TILE), path)
    before = path.read_bytes()

    def half_write(self: Image.Image, stream: object, *args: object, **kwargs: object) -> None:
        stream.write(b"\x89PNG half")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_attention_png(Image.new("RGB", (40, 40)), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["attention.png"]
