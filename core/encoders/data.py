"""Training data for the encoder: identity folders (two or more photos each) or the lab world's endless people.

A sample is the encoder's input picture and a *different* picture of the same identity as the diffusion target
(cross-reference regularisation, METHODS.md 4.1), with the target's caption ("{}" is the identity) and its optional
loss mask. Every draw depends only on (seed, step, sample index), so any split of a batch over processes, and any
resume, sees the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..protocols import SLOT

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_SUFFIX = ".mask.png"  # photo.mask.png beside photo.png: white where the loss counts (e.g. the face)
CAPTION_SUFFIX = ".txt"  # photo.txt beside photo.png: its caption; "{}" marks the identity, else it is appended


@dataclass
class Sample:
    """One training pair: what the encoder sees, and what the denoiser must draw."""

    source: np.ndarray  # (H, W, 3) uint8, the encoder's input
    target: np.ndarray  # (S, S, 3) uint8 at the training resolution
    caption: str  # with SLOT for the identity
    mask: np.ndarray | None = None  # (S, S) float in [0, 1]


class EncoderData(Protocol):
    """A deterministic source of samples."""

    description: str

    def sample(self, seed: int, step: int, index: int) -> Sample:
        """The index-th sample of a step's batch."""
        ...


def _rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The generator of one sample."""
    return np.random.default_rng([seed, 53, step, index])


class LabData:
    """The lab world: each sample a fresh random anonymous person (never a held-out or the sample subject), two
    renders with other poses, expressions, glasses and scenes; the target's caption states its variable attributes
    (each with probability 0.7), so the identity has no reason to carry them."""

    description = "the lab world's random anonymous people (two renders each)"

    def sample(self, seed: int, step: int, index: int) -> Sample:
        """A person rendered twice."""
        from ..lab import world

        rng = _rng(seed, step, index)
        person = world.anonymous_subject(rng)
        source = world.render(person, world.random_variable(rng), rng)
        variable = world.random_variable(rng)
        target = world.render(person, variable, rng)
        caption, _ = world.describe(variable, SLOT, None, rng, detail=0.7)
        return Sample(source=source, target=target, caption=caption)


def _square(image: Image.Image, size: int) -> np.ndarray:
    """The centre square of an RGB picture, resized to size (Lanczos)."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.LANCZOS))


def _caption(path: Path, templates: Sequence[str], rng: np.random.Generator) -> str:
    """The photo's own caption when it has one (identity at '{}', or after it), else a training template."""
    text_path = path.with_suffix(CAPTION_SUFFIX)
    if text_path.is_file():
        text = text_path.read_text(encoding="utf-8").strip()
        if text:
            return text if SLOT in text else f"{templates[0]}, {text}"
    return templates[int(rng.integers(len(templates)))]


@dataclass
class _Photo:
    """One photo of an identity folder, loaded once."""

    path: Path
    source: np.ndarray  # the whole photo, or its centre square at the tower's size (the tower crops it the same way)
    target: np.ndarray  # centre square at the training resolution
    mask: np.ndarray | None


class FolderData:
    """Identity folders: DATA/<identity>/<photos>, two or more photos each (optional photo.txt captions and
    photo.mask.png loss masks). The encoder sees one photo, the loss targets another of the same identity."""

    def __init__(self, root: Path, resolution: int, templates: Sequence[str], source_size: int | None = None) -> None:
        """source_size: keep each photo as its centre square at this size (the vision tower's input size), not whole."""
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"--data: {root} is not a folder; give a folder of identity folders, or 'lab'")
        self.templates = tuple(templates)
        self.identities: list[list[_Photo]] = []
        thin = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            photos = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
                      and not p.name.endswith(MASK_SUFFIX)]
            if len(photos) < 2:
                thin.append(folder.name)
                continue
            self.identities.append([self._load(p, resolution, source_size) for p in photos])
        if thin:
            raise InputError(
                f"--data: identity folders {thin[:5]} have fewer than 2 photos; cross-reference training needs two "
                "or more of each identity (add photos or remove the folder)"
            )
        if not self.identities:
            raise InputError(f"--data: {root} holds no identity folders with photos; put each identity's photos in "
                             "its own subfolder")
        count = sum(len(i) for i in self.identities)
        self.description = f"{len(self.identities)} identity folders, {count} photos, from {root}"

    @staticmethod
    def _load(path: Path, resolution: int, source_size: int | None) -> _Photo:
        """A photo (whole, or its square at source_size), its training square and its mask."""
        try:
            with Image.open(path) as image:
                source = np.asarray(image.convert("RGB")) if source_size is None else _square(image, source_size)
                target = _square(image, resolution)
        except OSError as error:
            raise InputError(f"--data: cannot read {path} ({error}); remove or replace it") from None
        mask_path = path.with_name(path.stem + MASK_SUFFIX)
        mask = None
        if mask_path.is_file():
            with Image.open(mask_path) as image:
                mask = _square(image, resolution)[..., 0].astype(np.float32) / 255
            if mask.max() <= 0:
                raise InputError(f"--data: the mask {mask_path} is empty (all black); mark the subject in white")
        return _Photo(path, source, target, mask)

    def sample(self, seed: int, step: int, index: int) -> Sample:
        """A random identity; one photo in, another as the target."""
        rng = _rng(seed, step, index)
        photos = self.identities[int(rng.integers(len(self.identities)))]
        first = int(rng.integers(len(photos)))
        second = (first + int(rng.integers(1, len(photos)))) % len(photos)
        target = photos[second]
        return Sample(photos[first].source, target.target, _caption(target.path, self.templates, rng), target.mask)


def to_unit(pictures: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) pictures of one size as a (N, 3, H, W) float batch in [0, 1]."""
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255


def source_batch(samples: Sequence[Sample]) -> list[torch.Tensor]:
    """The encoder inputs, one (1, 3, H, W) tensor each (photos may differ in size)."""
    return [to_unit([s.source]) for s in samples]
