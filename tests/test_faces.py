"""Face detection, square crops and soft masks (core.faces) on scikit-image's bundled photos; offline, CPU only."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from core import faces
from core.errors import InputError
from core.faces import Box, crop_face, crop_faces, detect_faces, face_mask

ROOT = Path(__file__).resolve().parents[1]
# Eileen Collins' face in the 512x512 astronaut photo, hairline to chin and cheek to cheek, read off the picture.
ASTRONAUT_FACE = Box(175, 60, 90, 105)
# The cameraman's head (in profile, looking right) in scikit-image's 512x512 camera photo.
CAMERAMAN_HEAD = Box(160, 65, 110, 135)


def _iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    left, top = max(a.x, b.x), max(a.y, b.y)
    right, bottom = min(a.x + a.width, b.x + b.width), min(a.y + a.height, b.y + b.height)
    inter = max(0, right - left) * max(0, bottom - top)
    return inter / (a.area + b.area - inter)


def _inside(point: tuple[float, float], box: Box) -> bool:
    """Whether an (x, y) point lies in a box."""
    return box.x <= point[0] <= box.x + box.width and box.y <= point[1] <= box.y + box.height


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """The 512x512 RGB astronaut portrait (uint8)."""
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    """The 400x600 RGB coffee-cup photo: no face."""
    return skimage.data.coffee()


def _two_faces() -> tuple[Image.Image, Box, Box]:
    """A grey canvas with the astronaut's head pasted twice, at full and at 0.6 scale; the two faces' true boxes."""
    head = Image.fromarray(skimage.data.astronaut()).crop((120, 10, 330, 230))
    canvas = Image.new("RGB", (640, 400), (128, 128, 128))
    canvas.paste(head, (20, 90))
    canvas.paste(head.resize((126, 132), Image.Resampling.LANCZOS), (420, 40))
    large = Box(ASTRONAUT_FACE.x - 100, ASTRONAUT_FACE.y + 80, ASTRONAUT_FACE.width, ASTRONAUT_FACE.height)
    small = Box(420 + round(55 * 0.6), 40 + round(50 * 0.6), round(90 * 0.6), round(105 * 0.6))
    return canvas, large, small


# --- detection ---------------------------------------------------------------------------------------------------


def test_finds_the_astronaut_face(astronaut: np.ndarray) -> None:
    (face,) = detect_faces(astronaut)
    assert _iou(face, ASTRONAUT_FACE) > 0.6, face
    assert _inside(face.centre, Box(195, 90, 50, 45)), face  # around her nose
    assert 70 <= face.width <= 120 and face.width == face.height
    assert detect_faces(Image.fromarray(astronaut)) == [face]  # PIL or array, same answer
    assert detect_faces(astronaut.astype(np.float32) / 255) == [face]


def test_no_face_in_the_coffee_photo(astronaut: np.ndarray, coffee: np.ndarray) -> None:
    assert detect_faces(coffee) == []
    assert crop_face(coffee) is None
    expected = (
        "images: no face found in photo 2 (coffee.png); crop it by hand or turn face crop off, "
        "or set on_no_face to skip photos without a face"
    )
    with pytest.raises(InputError) as caught:
        crop_faces([astronaut, coffee], size=64, names=["astronaut.png", "coffee.png"])
    assert str(caught.value) == expected


def test_photos_without_a_face_can_be_skipped(
    astronaut: np.ndarray, coffee: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        crops = crop_faces([coffee, astronaut], size=64, on_no_face="skip")
    assert [crop.number for crop in crops] == [2]
    assert "images: no face found in photo 1; skipped it (on_no_face is skip)" in caplog.messages
    with pytest.raises(InputError, match=r"^images: no face found in any of the 1 photos \(photo 1\)"):
        crop_faces([coffee], size=64, on_no_face="skip")


def test_several_faces_use_the_largest_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    canvas, large, small = _two_faces()
    found = detect_faces(canvas)
    assert len(found) == 2 and found[0].area > found[1].area  # largest first
    assert _iou(found[0], large) > 0.5 and _iou(found[1], small) > 0.4, found
    with caplog.at_level(logging.WARNING):
        (crop,) = crop_faces([np.asarray(canvas)], size=128)
    assert crop.face == found[0]
    assert f"images: 2 faces in photo 1; using the largest ({found[0].describe()})" in caplog.messages
    assert found[0].describe() == f"{found[0].width}x{found[0].height} px at {found[0].x},{found[0].y}"


@pytest.mark.parametrize("angle", [30, -30])
def test_finds_tilted_faces(astronaut: np.ndarray, angle: int) -> None:
    centre = ASTRONAUT_FACE.centre
    tilted = np.asarray(Image.fromarray(astronaut).rotate(angle, resample=Image.Resampling.BICUBIC, center=centre))
    grey, _ = faces._grey(faces.rgb_array(tilted))
    assert faces._search(grey, faces.FRONTAL_CASCADE, 40) == []  # the upright search misses a head tilted this far
    (face,) = detect_faces(tilted)  # the search on the photo turned by 20 degrees finds it
    assert _iou(face, ASTRONAUT_FACE) > 0.5, face


def test_finds_faces_in_profile() -> None:
    (head,) = detect_faces(skimage.data.camera())  # grey, and in profile
    assert _inside(head.centre, CAMERAMAN_HEAD), head


# --- crops and masks ---------------------------------------------------------------------------------------------


def test_photos_of_three_sizes_give_crops_of_one_size(astronaut: np.ndarray) -> None:
    photo = Image.fromarray(astronaut)
    photos = [photo, photo.resize((300, 300)).crop((0, 0, 300, 220)), photo.resize((900, 900)).crop((0, 0, 900, 700))]
    crops = crop_faces(photos, size=128)
    assert [c.image.shape for c in crops] == [(128, 128, 3)] * 3 and [c.mask.shape for c in crops] == [(128, 128)] * 3
    assert all(c.image.dtype == np.float32 and c.mask.dtype == np.float32 for c in crops)
    assert all(0 <= c.image.min() and c.image.max() <= 1 for c in crops)
    sides = [c.crop.width / c.face.width for c in crops]
    assert all(1.9 <= s <= 2.1 for s in sides), sides  # the default margin: twice the face box
    big = crops[2]
    assert _iou(Box(*(round(v * 900 / 512) for v in (178, 69, 92, 92))), big.face) > 0.6  # found at any scale


def test_mask_is_soft_and_lies_over_the_face(astronaut: np.ndarray) -> None:
    (crop,) = crop_faces([astronaut], size=256)
    mask = crop.mask
    k = 256 / crop.crop.width
    face = Box(*(round(v) for v in ((ASTRONAUT_FACE.x - crop.crop.x) * k, (ASTRONAUT_FACE.y - crop.crop.y) * k,
                                     ASTRONAUT_FACE.width * k, ASTRONAUT_FACE.height * k)))
    centre = (round(face.centre[1]), round(face.centre[0]))
    assert mask.min() == 0.0 and mask.max() == 1.0 and mask[centre] == 1.0
    assert mask[:8].max() == 0 and mask[:, :8].max() == 0 and mask[-8:].max() == 0  # nothing at the crop's borders
    row = mask[centre[0]]
    edge = row[(row > 0) & (row < 1)]
    assert len(edge) >= 10, "the edge is a band of partial values, not a step"
    inside = mask[face.y : face.y + face.height, face.x : face.x + face.width]
    assert inside.mean() > 0.6  # an oval in its box covers pi/4 of it, less the soft edge
    assert inside.sum() > 0.9 * mask.sum()  # the mask's weight lies on the face, not the hair or the background
    (hard,) = crop_faces([astronaut], size=256, softness=0.0)
    assert set(np.unique(hard.mask)) == {0.0, 1.0}


def test_face_mask_geometry() -> None:
    mask = face_mask(100, (30.0, 20.0, 40.0, 40.0), 0.25)
    assert mask.shape == (100, 100) and mask[42, 50] == 1.0  # centre (shifted down by 5% of the box)
    assert mask[42, 0] == 0.0 and mask[0, 50] == 0.0
    assert 0.0 < mask[42, 50 + 18] < 1.0  # the edge of the oval, 0.45 box widths out
    assert np.all(np.diff(mask[42, 50:]) <= 1e-6)  # falls off monotonically from the centre


def test_face_at_the_edge_shifts_the_square_into_the_photo(astronaut: np.ndarray) -> None:
    edge = astronaut[:, 165:]  # the face's left cheek 10 px from the left border
    (crop,) = crop_faces([edge], size=128)
    assert crop.crop.x == 0 and crop.crop.width == round(crop.face.width * 2.0)  # shifted, not shrunk, not padded
    np.testing.assert_allclose(  # every pixel comes from the photo: the crop is the photo's square, resized
        crop.image, faces._resize(faces.rgb_array(edge)[crop.crop.y : crop.crop.y + crop.crop.width, : crop.crop.width], 128)
    )
    columns = crop.mask.sum(axis=0)
    assert (columns * np.arange(128)).sum() / columns.sum() < 64 - 10  # the mask follows the off-centre face
    tight = astronaut[40:200, 150:300]  # a photo smaller than the square: the square is the photo's shorter side
    (small,) = crop_faces([tight], size=128)
    assert small.crop.width == 150 and small.crop.x == 0 and 0 <= small.crop.y <= 10
    assert small.mask.max() == 1.0


def test_small_face_is_said_in_the_log(astronaut: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        crop_faces([astronaut], size=512)
    assert any("is small" in m and "enlarged to 512 px" in m for m in caplog.messages), caplog.messages


# --- bad input and a missing OpenCV ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": 500}, r"^size: 500 is not a multiple of 8"),
        ({"size": 32}, r"^size: 32 "),
        ({"margin": 0.5}, r"^margin: 0.5 is below 1"),
        ({"margin": math.nan}, r"^margin: nan "),
        ({"softness": 1.5}, r"^mask_softness: 1.5 is not between 0 and 1"),
        ({"softness": math.nan}, r"^mask_softness: nan "),
        ({"on_no_face": "ignore"}, r"^on_no_face: unknown 'ignore'; choose one of error, skip"),
    ],
)
def test_bad_options_name_the_input(astronaut: np.ndarray, options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        crop_faces([astronaut], **options)


def test_bad_photos_are_input_errors() -> None:
    with pytest.raises(InputError, match=r"^images: got no photos"):
        crop_faces([])
    with pytest.raises(InputError, match=r"^images: expected an \(height, width, 3\) RGB photo, got shape \(4, 5, 6, 3\)"):
        detect_faces(np.zeros((4, 5, 6, 3)))


def test_missing_opencv_says_what_to_install(astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now fails as if it were not installed
    with pytest.raises(InputError) as caught:
        crop_faces([astronaut])
    assert str(caught.value).startswith("face crop: OpenCV is not installed; run `pip install")
    assert 'pip install "opencv-python-headless>=4.10,<5"' in str(caught.value)


def test_opencv_without_cascades_says_to_pin_below_5(tmp_path: Path) -> None:
    opencv5 = types.SimpleNamespace(__version__="5.0.0", data=types.SimpleNamespace(haarcascades=str(tmp_path) + "/"))
    with pytest.raises(InputError, match=r"^face crop: OpenCV 5.0.0 has no Haar face cascades .*opencv-python-headless>=4.10,<5"):
        faces.cascade_path(opencv5, faces.FRONTAL_CASCADE)


def test_importing_faces_needs_no_opencv() -> None:
    code = "import sys; sys.modules['cv2'] = None; import core.faces, core.images; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
