"""Faces in training photos: detect them offline (OpenCV's bundled Haar cascades), crop square, and make a soft mask.

Detection runs the frontal cascade `haarcascade_frontalface_alt2.xml` on a histogram-equalised grey copy of the photo
(at most 1024 px a side). Only when it finds nothing does it look again for tilted heads (the photo turned by +-20
degrees) and then for faces in profile (`haarcascade_profileface.xml`, on the photo and its mirror image). The
cascades ship inside the `opencv-python-headless` 4.x wheel (`cv2.data.haarcascades`); OpenCV 5 ships none, hence
the `<5` pin. Nothing is downloaded.

The crop is a square `margin` times the face box's side around the face centre. Near an edge the square is shifted to
stay inside the photo (the face is then off-centre, and the mask follows it) and shrunk only when the photo is
smaller than the square, so no pixel of a crop is ever invented by padding. The mask is an ellipse over the face
with a smooth edge: 1 inside, 0 outside, in between across a band of `softness` times the ellipse's radii.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np
from PIL import Image

from .errors import InputError
from .images import MIN_SIDE, to_rgb

log = logging.getLogger(__name__)

INSTALL_OPENCV = 'pip install "opencv-python-headless>=4.10,<5"'
FRONTAL_CASCADE = "haarcascade_frontalface_alt2.xml"  # fewest false faces of the bundled frontal cascades
PROFILE_CASCADE = "haarcascade_profileface.xml"  # faces turned to one side; run on the mirror image for the other
DETECT_SIDE = 1024  # photos are searched at most this large (px, longer side); boxes are mapped back
MIN_FACE = 0.08  # smallest face searched for, as a fraction of the photo's shorter side
TILTS = (20.0, -20.0)  # degrees the photo is turned when no upright face is found
SCALE_STEP = 1.1  # the cascade's search-window growth per scale
MIN_NEIGHBORS = 5  # detections a face needs around it; higher finds fewer false faces and fewer real ones
SAME_FACE = 0.5  # two boxes overlapping by this much of the smaller one are one face
# The face oval within a Haar box (which spans brows to mouth, ear to ear): radii and downward shift, box fractions.
ELLIPSE_RADII = (0.45, 0.56)
ELLIPSE_SHIFT = 0.05
DEFAULT_SIZE = 512
MIN_SIZE = MIN_SIDE  # the smallest photo training takes
DEFAULT_MARGIN = 2.0  # a Haar box spans brows to mouth: 2x shows the whole head and hair, 1.6x cuts the hair
DEFAULT_SOFTNESS = 0.25
OnNoFace = Literal["error", "skip"]
ON_NO_FACE: tuple[str, ...] = ("error", "skip")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels: left, top, width, height."""

    x: int
    y: int
    width: int
    height: int

    @property
    def area(self) -> int:
        """Width times height."""
        return self.width * self.height

    @property
    def centre(self) -> tuple[float, float]:
        """The (x, y) centre."""
        return self.x + self.width / 2, self.y + self.height / 2

    def describe(self) -> str:
        """The box for messages: '180x180 px at 40,60'."""
        return f"{self.width}x{self.height} px at {self.x},{self.y}"


@dataclass(frozen=True)
class CroppedFace:
    """One photo's face crop: image (S, S, 3) and mask (S, S) float32 in [0, 1], the face and crop boxes in the photo."""

    image: np.ndarray
    mask: np.ndarray
    face: Box
    crop: Box
    number: int


def load_cv2() -> ModuleType:
    """Import OpenCV, or raise InputError saying what to install (the pack itself loads without it)."""
    try:
        import cv2
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "cv2":
            raise InputError(
                f"face crop: OpenCV is not installed; run `{INSTALL_OPENCV}` with the Python that runs ComfyUI "
                "(or turn face crop off)"
            ) from exc
        # e.g. an OpenCV before 4.10, built for numpy 1, under numpy 2
        raise InputError(f"face crop: OpenCV failed to import ({exc}); reinstall it with `{INSTALL_OPENCV}`") from exc
    return cv2


def cascade_path(cv2: ModuleType, name: str) -> Path:
    """The bundled cascade file; OpenCV builds without them (OpenCV 5) raise InputError with the fix."""
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder) / name if folder else None
    if path is None or not path.is_file() or not hasattr(cv2, "CascadeClassifier"):
        version = getattr(cv2, "__version__", "?")
        raise InputError(
            f"face crop: OpenCV {version} has no Haar face cascades ({name}; OpenCV 5 dropped them); "
            f"run `{INSTALL_OPENCV}`"
        )
    return path


@lru_cache(maxsize=4)
def _cascade(name: str) -> object:
    """A loaded cv2.CascadeClassifier, read once per process."""
    cv2 = load_cv2()
    classifier = cv2.CascadeClassifier(str(cascade_path(cv2, name)))
    if classifier.empty():
        raise InputError(f"face crop: OpenCV could not read its cascade {name}; reinstall it with `{INSTALL_OPENCV}`")
    return classifier


def rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A photo as an (H, W, 3) float32 array in [0, 1]: PIL images of any mode, uint8 or float arrays, grey or RGB(A)."""
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) == 0:
        raise InputError(f"images: expected an (height, width, 3) RGB photo, got shape {array.shape}")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0)


def _grey(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """The equalised uint8 grey copy the cascades search, at most DETECT_SIDE px, and its scale to the photo."""
    cv2 = load_cv2()
    grey = cv2.cvtColor(np.ascontiguousarray((rgb * 255.0).round().astype(np.uint8)), cv2.COLOR_RGB2GRAY)
    scale = min(1.0, DETECT_SIDE / max(grey.shape))
    if scale < 1.0:
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    return cv2.equalizeHist(grey), scale


def _search(grey: np.ndarray, cascade: str, min_side: int) -> list[Box]:
    """Boxes one cascade finds in a grey image."""
    found = _cascade(cascade).detectMultiScale(
        grey, scaleFactor=SCALE_STEP, minNeighbors=MIN_NEIGHBORS, minSize=(min_side, min_side)
    )
    return [Box(int(x), int(y), int(w), int(h)) for x, y, w, h in found]


def _tilted(grey: np.ndarray, angle: float, min_side: int) -> list[Box]:
    """Frontal faces in the image turned by angle degrees, as boxes of the same size in the unturned image."""
    cv2 = load_cv2()
    height, width = grey.shape
    turn = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    cos, sin = abs(turn[0, 0]), abs(turn[0, 1])
    size = (math.ceil(width * cos + height * sin), math.ceil(width * sin + height * cos))
    turn[:, 2] += (size[0] - width) / 2, (size[1] - height) / 2  # the whole photo stays in view
    turned = cv2.warpAffine(grey, turn, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    back = cv2.invertAffineTransform(turn)
    boxes = []
    for box in _search(turned, FRONTAL_CASCADE, min_side):
        cx, cy = back @ np.array([*box.centre, 1.0])
        boxes.append(Box(round(cx - box.width / 2), round(cy - box.height / 2), box.width, box.height))
    return boxes


def _profiles(grey: np.ndarray, min_side: int) -> list[Box]:
    """Faces in profile, turned either way (the cascade knows one side; the mirror image gives the other)."""
    width = grey.shape[1]
    mirrored = _search(np.ascontiguousarray(grey[:, ::-1]), PROFILE_CASCADE, min_side)
    return _search(grey, PROFILE_CASCADE, min_side) + [Box(width - b.x - b.width, b.y, b.width, b.height) for b in mirrored]


def _overlap(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area."""
    left, top = max(a.x, b.x), max(a.y, b.y)
    right, bottom = min(a.x + a.width, b.x + b.width), min(a.y + a.height, b.y + b.height)
    inter = max(0, right - left) * max(0, bottom - top)
    return inter / max(1, min(a.area, b.area))


def _distinct(boxes: Sequence[Box]) -> list[Box]:
    """Largest first, without boxes that mostly overlap a larger one (one face found twice)."""
    kept: list[Box] = []
    for box in sorted(boxes, key=lambda b: b.area, reverse=True):
        if all(_overlap(box, other) < SAME_FACE for other in kept):
            kept.append(box)
    return kept


def _in_photo(box: Box, scale: float, width: int, height: int) -> Box:
    """A box found on the search copy, in photo pixels and clipped to the photo."""
    x, y = max(0, round(box.x / scale)), max(0, round(box.y / scale))
    right, bottom = min(width, round((box.x + box.width) / scale)), min(height, round((box.y + box.height) / scale))
    return Box(x, y, max(1, right - x), max(1, bottom - y))


def detect_faces(image: Image.Image | np.ndarray, min_face: float = MIN_FACE) -> list[Box]:
    """Face boxes in a photo, largest first: upright faces, else tilted ones, else faces in profile."""
    rgb = rgb_array(image)
    height, width = rgb.shape[:2]
    grey, scale = _grey(rgb)
    min_side = max(20, round(min_face * min(grey.shape)))
    boxes = _search(grey, FRONTAL_CASCADE, min_side)
    for angle in TILTS if not boxes else ():
        boxes += _tilted(grey, angle, min_side)
    if not boxes:
        boxes = _profiles(grey, min_side)
    return _distinct([_in_photo(box, scale, width, height) for box in boxes])


def photo_label(number: int, name: str | None = None) -> str:
    """'photo 2' or 'photo 2 (coffee.png)' for messages; photos count from 1."""
    return f"photo {number} ({name})" if name else f"photo {number}"


def largest_face(faces: Sequence[Box], label: str) -> Box:
    """The largest face box; a warning says so when the photo has several."""
    face = max(faces, key=lambda box: box.area)
    if len(faces) > 1:
        log.warning("images: %d faces in %s; using the largest (%s)", len(faces), label, face.describe())
    return face


def crop_square(face: Box, width: int, height: int, margin: float) -> Box:
    """The square of margin times the face's side around it, shifted (and only if need be shrunk) into the photo."""
    side = min(max(face.width, face.height) * margin, width, height)
    side = max(1, round(side))
    cx, cy = face.centre
    left = min(max(0, round(cx - side / 2)), width - side)
    top = min(max(0, round(cy - side / 2)), height - side)
    return Box(left, top, side, side)


def face_mask(size: int, face: tuple[float, float, float, float], softness: float) -> np.ndarray:
    """A (size, size) float32 mask in [0, 1]: an ellipse over the face box (x, y, w, h) with a smooth edge."""
    x, y, w, h = face
    rx, ry = max(ELLIPSE_RADII[0] * w, 0.5), max(ELLIPSE_RADII[1] * h, 0.5)
    cx, cy = x + w / 2, y + h / 2 + ELLIPSE_SHIFT * h
    centres = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    radius = np.sqrt(((centres[None, :] - cx) / rx) ** 2 + ((centres[:, None] - cy) / ry) ** 2)
    if softness <= 0:
        return (radius <= 1.0).astype(np.float32)
    t = np.clip((radius - (1.0 - softness)) / (2.0 * softness), 0.0, 1.0)
    return (1.0 - t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep from 1 inside to 0 outside


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """A square crop resized to (size, size): area averaging to shrink, bicubic to enlarge."""
    if pixels.shape[0] == size:
        return pixels.astype(np.float32, copy=True)
    cv2 = load_cv2()
    method = cv2.INTER_AREA if pixels.shape[0] > size else cv2.INTER_CUBIC
    resized = cv2.resize(np.ascontiguousarray(pixels, dtype=np.float32), (size, size), interpolation=method)
    return np.clip(resized, 0.0, 1.0)


def check_crop_options(size: int, margin: float, softness: float) -> int:
    """Validate the crop options up front; returns the size."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE or size % 8:
        raise InputError(f"size: {size!r} is not a multiple of 8 of at least {MIN_SIZE}; use e.g. 512 (or 1024 for SDXL)")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 1.0):
        raise InputError(f"margin: {margin!r} is below 1 or not a number; use e.g. 2.0 (1.0 crops the face box tightly)")
    if not (isinstance(softness, (int, float)) and math.isfinite(softness) and 0.0 <= softness <= 1.0):
        raise InputError(f"mask_softness: {softness!r} is not between 0 and 1; use e.g. 0.25 (0 gives a hard edge)")
    return int(size)


def crop_face(
    image: Image.Image | np.ndarray, number: int = 1, name: str | None = None, size: int = DEFAULT_SIZE,
    margin: float = DEFAULT_MARGIN, softness: float = DEFAULT_SOFTNESS,
) -> CroppedFace | None:
    """The largest face of one photo cropped square, resized and masked; None when the photo has no face."""
    size = check_crop_options(size, margin, softness)
    rgb = rgb_array(image)
    label = photo_label(number, name)
    faces = detect_faces(rgb)
    if not faces:
        return None
    face = largest_face(faces, label)
    crop = crop_square(face, rgb.shape[1], rgb.shape[0], margin)
    if crop.width < size / 2:
        log.warning(
            "images: the face in %s is small (%s); its %d px crop is enlarged to %d px and may look soft; "
            "a closer photo trains better", label, face.describe(), crop.width, size,
        )
    pixels = _resize(rgb[crop.y : crop.y + crop.height, crop.x : crop.x + crop.width], size)
    k = size / crop.width
    in_crop = ((face.x - crop.x) * k, (face.y - crop.y) * k, face.width * k, face.height * k)
    return CroppedFace(pixels, face_mask(size, in_crop, softness), face, crop, number)


def crop_faces(
    images: Sequence[Image.Image | np.ndarray], size: int = DEFAULT_SIZE, margin: float = DEFAULT_MARGIN,
    softness: float = DEFAULT_SOFTNESS, on_no_face: OnNoFace = "error", names: Sequence[str | None] | None = None,
) -> list[CroppedFace]:
    """Face crops of photos of any sizes, all size x size; a photo without a face is an error or skipped (said in the log)."""
    if on_no_face not in ON_NO_FACE:
        raise InputError(f"on_no_face: unknown '{on_no_face}'; choose one of {', '.join(ON_NO_FACE)}")
    if len(images) == 0:
        raise InputError("images: got no photos; connect at least one")
    size = check_crop_options(size, margin, softness)
    names = list(names) if names is not None else [None] * len(images)
    if len(names) != len(images):
        raise ValueError(f"crop_faces: got {len(names)} names for {len(images)} photos")
    crops, missing = [], []
    for number, (image, name) in enumerate(zip(images, names), start=1):
        crop = crop_face(image, number, name, size, margin, softness)
        if crop is not None:
            crops.append(crop)
            continue
        label = photo_label(number, name)
        if on_no_face == "error":
            raise InputError(
                f"images: no face found in {label}; crop it by hand or turn face crop off, "
                "or set on_no_face to skip photos without a face"
            )
        missing.append(label)
        log.warning("images: no face found in %s; skipped it (on_no_face is skip)", label)
    if not crops:
        raise InputError(
            f"images: no face found in any of the {len(images)} photos ({', '.join(missing)}); use photos where the "
            "face is clearly visible, or turn face crop off"
        )
    return crops
