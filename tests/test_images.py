"""Tests for image loading, the loss chart, and the bundled celebrity-name list."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import images as images_module
from core.errors import InputError
from core.images import (
    MIN_SIDE,
    images_to_tensor,
    list_image_paths,
    load_image,
    load_training_images,
    sample_photo_path,
)
from core.plot import loss_curve_png, moving_average

NAMES_FILE = Path(__file__).resolve().parents[1] / "core" / "data" / "celebrity_names.txt"


def _save(image: Image.Image, path: Path, **options: object) -> Path:
    """Save a Pillow image and return its path."""
    image.save(path, **options)
    return path


def _rgb(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (96, 80)) -> Path:
    """Write a solid-colour RGB image at `path` (format from its extension)."""
    return _save(Image.new("RGB", size, colour), path)


def _truncate(path: Path) -> Path:
    """Cut a file's bytes in half."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _centre_pixel(image: Image.Image) -> tuple[int, ...]:
    """The pixel in the middle of an image."""
    return image.getpixel((image.width // 2, image.height // 2))


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    """Whether two colours match channel by channel within a tolerance."""
    return all(abs(int(a) - int(e)) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- listing -------------------------------------------------------------------------------


def test_folder_listing_is_sorted_and_skips_hidden_and_non_images(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpg", "c.webp", "d.Tiff"]:
        _rgb(tmp_path / name)
    _rgb(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    _rgb(tmp_path / "sub" / "nested.png")
    names = [p.name for p in list_image_paths([tmp_path])]
    assert names == ["a.jpg", "b.PNG", "c.webp", "d.Tiff"]


def test_listing_accepts_files_and_folders_together(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    _rgb(folder / "one.png")
    single = _rgb(tmp_path / "two.jpg")
    assert [p.name for p in list_image_paths([folder, single])] == ["one.png", "two.jpg"]


def test_folder_without_images_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    _rgb(tmp_path / ".secret.png")
    with pytest.raises(InputError, match="found no images") as info:
        list_image_paths([tmp_path])
    assert str(tmp_path) in str(info.value)


def test_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError, match="does not exist") as info:
        list_image_paths([missing])
    assert str(missing) in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "absent.png")


# --- unreadable files ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_truncated_file_names_the_file(tmp_path: Path, name: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = _truncate(_save(Image.fromarray(noise), tmp_path / name))
    with pytest.raises(InputError, match="cannot read") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_text_file_with_image_extension(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_text("this is not a PNG")
    with pytest.raises(InputError, match="cannot read") as info:
        load_image(path)
    assert "fake.png" in str(info.value)


def test_too_small_image_reports_size_and_minimum(tmp_path: Path) -> None:
    path = _rgb(tmp_path / "tiny.png", size=(50, 120))
    with pytest.raises(InputError) as info:
        load_image(path)
    message = str(info.value)
    assert "tiny.png" in message and "50x120" in message and str(MIN_SIDE) in message


# --- mode conversion -----------------------------------------------------------------------


def _assert_rgb8(image: Image.Image) -> np.ndarray:
    """Check an image is 8-bit RGB and return it as an array."""
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert array.dtype == np.uint8 and array.shape[2] == 3
    return array


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    image = load_image(_save(Image.new("L", (80, 80), 90), tmp_path / "gray.png"))
    _assert_rgb8(image)
    assert _centre_pixel(image) == (90, 90, 90)


def test_one_bit_becomes_rgb(tmp_path: Path) -> None:
    image = load_image(_save(Image.new("1", (80, 80), 1), tmp_path / "bw.png"))
    _assert_rgb8(image)
    assert _centre_pixel(image) == (255, 255, 255)


def test_rgba_transparent_pixels_become_white(tmp_path: Path) -> None:
    source = Image.new("RGBA", (80, 80), (0, 0, 255, 255))
    source.putpixel((0, 0), (10, 200, 10, 0))
    source.putpixel((1, 0), (0, 0, 0, 128))
    image = load_image(_save(source, tmp_path / "alpha.png"))
    _assert_rgb8(image)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert _close(image.getpixel((1, 0)), (127, 127, 127), 2)
    assert _centre_pixel(image) == (0, 0, 255)


def test_gray_alpha_becomes_rgb(tmp_path: Path) -> None:
    picture = Image.new("LA", (80, 80), (40, 0))
    picture.putpixel((0, 0), (40, 255))  # one opaque pixel: a fully transparent picture is refused
    image = load_image(_save(picture, tmp_path / "la.png"))
    assert _centre_pixel(image) == (255, 255, 255) and image.getpixel((0, 0)) == (40, 40, 40)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.full((80, 80), 32768, dtype=np.uint16)
    values[0, 0] = 65535
    values[0, 1] = 0
    source = Image.fromarray(values)
    assert source.mode.startswith("I")
    path = _save(source, tmp_path / "deep.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really stored as 16-bit
    image = load_image(path)
    _assert_rgb8(image)
    assert _close(_centre_pixel(image), (128, 128, 128), 1)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 0, 0)


def test_float_image_becomes_rgb(tmp_path: Path) -> None:
    values = np.full((80, 80), 0.5, dtype=np.float32)
    image = load_image(_save(Image.fromarray(values, mode="F"), tmp_path / "float.tif"))
    assert _close(_centre_pixel(image), (128, 128, 128), 1)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (80, 80), (0, 255, 255, 0)), tmp_path / "print.jpg", quality=95)
    image = load_image(path)
    _assert_rgb8(image)
    assert _close(_centre_pixel(image), (255, 0, 0), 12)


def test_palette_image_becomes_rgb(tmp_path: Path) -> None:
    source = Image.new("P", (80, 80), 1)
    source.putpalette([0, 0, 0, 20, 160, 60] + [0] * 762)
    image = load_image(_save(source, tmp_path / "palette.png"))
    _assert_rgb8(image)
    assert _centre_pixel(image) == (20, 160, 60)


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    source = Image.new("P", (80, 80), 1)
    source.putpalette([0, 0, 0, 20, 160, 60] + [0] * 762)
    source.putpixel((0, 0), 0)
    image = load_image(_save(source, tmp_path / "gif.png", transparency=0))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert _centre_pixel(image) == (20, 160, 60)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    source = Image.new("RGB", (120, 80), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = load_image(_save(source, tmp_path / "phone.jpg", exif=exif))
    assert image.size == (80, 120)


# --- tensors -------------------------------------------------------------------------------


def test_images_to_tensor_shape_and_range() -> None:
    images = [Image.new("RGB", (100, 100), (255, 0, 0)), Image.new("RGB", (300, 200), (0, 0, 0))]
    batch = images_to_tensor(images, 64)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    assert float(batch.min()) >= -1.0 and float(batch.max()) <= 1.0
    assert torch.allclose(batch[0, :, 32, 32], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(batch[1], torch.full_like(batch[1], -1.0))


def test_non_square_input_is_center_cropped() -> None:
    # A wide image: left third red, middle third green, right third blue; the crop keeps the middle.
    source = np.zeros((96, 288, 3), dtype=np.uint8)
    source[:, :96] = (255, 0, 0)
    source[:, 96:192] = (0, 255, 0)
    source[:, 192:] = (0, 0, 255)
    batch = images_to_tensor([Image.fromarray(source)], 32)
    assert batch.shape == (1, 3, 32, 32)
    green = torch.tensor([-1.0, 1.0, -1.0])
    assert torch.allclose(batch[0, :, 16, 16], green, atol=0.05)
    assert torch.allclose(batch[0, :, 16, 1], green, atol=0.1)
    assert torch.allclose(batch[0, :, 16, 30], green, atol=0.1)


def test_tall_input_is_center_cropped() -> None:
    source = np.zeros((300, 100, 3), dtype=np.uint8)
    source[100:200] = 255
    batch = images_to_tensor([Image.fromarray(source)], 16)
    assert batch.shape == (1, 3, 16, 16)
    assert float(batch.mean()) > 0.9


@pytest.mark.parametrize("resolution", [0, -8, 100, 12, 7.5, True, "512"])
def test_bad_resolution_raises(resolution: object) -> None:
    with pytest.raises(InputError, match="resolution"):
        images_to_tensor([Image.new("RGB", (100, 100))], resolution)  # type: ignore[arg-type]


def test_empty_image_list_raises() -> None:
    with pytest.raises(InputError, match="empty"):
        images_to_tensor([], 64)


def test_load_training_images_combines_listing_and_loading(tmp_path: Path) -> None:
    _rgb(tmp_path / "a.png", (255, 255, 255), size=(128, 96))
    _save(Image.new("L", (70, 90), 0), tmp_path / "b.jpg")
    batch = load_training_images([tmp_path], 64)
    assert batch.shape == (2, 3, 64, 64)
    assert torch.allclose(batch[0], torch.ones_like(batch[0]))
    assert float(batch[1].max()) < -0.9


def test_load_training_images_reports_bad_file(tmp_path: Path) -> None:
    _rgb(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(InputError, match="bad.jpg"):
        load_training_images([tmp_path], 64)


# --- sample photo --------------------------------------------------------------------------


def test_sample_photo_is_a_readable_portrait(tmp_path: Path) -> None:
    path = sample_photo_path(tmp_path)
    assert path.suffix.lower() in {".png", ".jpg", ".jpeg"}
    image = load_image(path)
    assert min(image.size) >= 256
    assert np.asarray(image).std() > 10  # a real photo, not a flat fill


def test_sample_photo_falls_back_to_a_cached_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_module, "_local_sample_photo", lambda data_module: None)
    monkeypatch.setattr(images_module, "_can_download", lambda: False)
    path = sample_photo_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / "astronaut.png"
    assert min(load_image(path).size) >= 256
    assert sorted(p.name for p in path.parent.iterdir()) == ["astronaut.png"]


def test_sample_photo_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_module, "_local_sample_photo", lambda data_module: None)
    monkeypatch.setattr(images_module, "_can_download", lambda: True)
    with pytest.raises(InputError, match="sample photo"):
        sample_photo_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- loss chart ----------------------------------------------------------------------------


def _plot_has_ink(image: Image.Image) -> bool:
    """Whether the chart's plot area (inside the margins) holds non-white pixels."""
    width, height = image.size
    area = np.asarray(image.crop((70, 50, width - 20, height - 34)))
    return bool((area < 250).any())


@pytest.mark.parametrize(
    "losses",
    [
        [],
        [0.42],
        [1.0 / (1 + i) + 0.05 * math.sin(i) for i in range(100)],
        [0.5, math.nan, 0.4, math.inf, 0.3, -math.inf, 0.25, 0.2],
        [math.nan, math.nan],
    ],
    ids=["empty", "one", "hundred", "with-nan", "all-nan"],
)
def test_loss_curve_png_draws_and_saves(tmp_path: Path, losses: list[float]) -> None:
    path = tmp_path / "charts" / "loss.png"
    image = loss_curve_png(losses, path, title="test loss", size=(480, 300))
    assert image.size == (480, 300) and image.mode == "RGB"
    assert _plot_has_ink(image)
    with Image.open(path) as saved:
        assert saved.size == (480, 300)
    assert sorted(p.name for p in path.parent.iterdir()) == ["loss.png"]


def test_loss_curve_without_path_only_returns_image(tmp_path: Path) -> None:
    image = loss_curve_png([3.0, 2.0, 1.0])
    assert image.size == (640, 360)
    assert list(tmp_path.iterdir()) == []


def test_loss_curve_overwrites_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    loss_curve_png([1.0, 0.5], path)
    with Image.open(path) as saved:
        assert saved.format == "PNG"


def test_loss_curve_failed_save_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        loss_curve_png([1.0, 0.5], tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []


def test_moving_average_skips_non_finite_values() -> None:
    result = moving_average([1.0, 2.0, 3.0, math.nan, 5.0, 6.0], 3)
    assert result[:3] == [1.0, 1.5, 2.0]
    assert math.isnan(result[3])
    assert result[4:] == [4.0, 5.5]


def test_loss_curve_rejects_tiny_size() -> None:
    with pytest.raises(InputError, match="size"):
        loss_curve_png([1.0], size=(10, 10))


# --- celebrity names -----------------------------------------------------------------------


def test_names_file_has_enough_unique_names() -> None:
    lines = NAMES_FILE.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() == line and line for line in lines)
    assert len(set(lines)) == len(lines)
    assert len(lines) >= 600
    assert all(len(line.split()) >= 2 for line in lines)
