"""The vision tower seam: which tower an encoder was trained for, preprocessing, and the hidden states it reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch.nn import functional as F

from ..errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel normalisation (ViT-L/14, ViT-H/14, ...)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSpec:
    """What identifies a vision tower to an encoder: its sizes and its preprocessing."""

    name: str  # e.g. "clip-vit-l-14" or "lab-vit"; informative, the sizes are what is checked
    hidden_size: int
    layers: int  # transformer layers
    image_size: int
    patch_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> VisionSpec:
        """The spec from to_dict's fields."""
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def describe(self) -> str:
        """A short text for messages: name, width, depth, input size."""
        return (
            f"'{self.name}' (width {self.hidden_size}, {self.layers} layers, {self.image_size} px, "
            f"patch {self.patch_size})"
        )

    def mismatch(self, other: VisionSpec) -> str | None:
        """Why other cannot stand in for this tower, or None when the sizes agree."""
        fields = ("hidden_size", "layers", "image_size", "patch_size")
        if all(getattr(self, f) == getattr(other, f) for f in fields):
            return None
        return f"the encoder was trained for the vision tower {self.describe()}, got {other.describe()}"


@runtime_checkable
class VisionTower(Protocol):
    """A frozen CLIP-style vision transformer that gives the hidden states of chosen layers."""

    spec: VisionSpec

    def hidden_states(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """For normalised (N, 3, S, S) pixels: the output of each encoder layer in layers (1-based; layers[i] =
        spec.layers is the last), each (N, 1 + patches, hidden_size), class token first."""
        ...


def square(images: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] as (N, 3, side, side) float32: shorter side resized to side (bicubic,
    antialiased), centre-cropped square, clamped to [0, 1]. A picture already side x side is only clamped."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"image: expected (count, 3, height, width) pictures, got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    pixels = images.float()
    if size != (height, width):
        pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    return pixels[..., top : top + side, left : left + side].clamp(0, 1)


def preprocess(images: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] as the tower's input: square(images, image_size), normalised with the tower's
    mean and std."""
    pixels = square(images, spec.image_size)
    mean = torch.tensor(spec.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


class TransformersTower:
    """A transformers CLIPVisionModel as a VisionTower (the standalone path: the lab's tower, or a local folder)."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        config = model.config
        self.model = model.eval().requires_grad_(False)
        self.spec = VisionSpec(
            name=name,
            hidden_size=config.hidden_size,
            layers=config.num_hidden_layers,
            image_size=config.image_size,
            patch_size=config.patch_size,
        )

    @property
    def device(self) -> torch.device:
        """Where the tower's weights are."""
        return next(self.model.parameters()).device

    def hidden_states(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """hidden_states[i] of transformers is the output of layer i (0: the embeddings after the pre-LayerNorm)."""
        check_layers(layers, self.spec)
        param = next(self.model.parameters())
        out = self.model(pixel_values=pixel_values.to(param.device, param.dtype), output_hidden_states=True)
        return [out.hidden_states[i].float() for i in layers]


def check_layers(layers: Sequence[int], spec: VisionSpec) -> None:
    """Refuse layer numbers the tower does not have."""
    bad = [i for i in layers if not 1 <= i <= spec.layers]
    if bad:
        raise InputError(f"encoder: layers {bad} do not exist in the vision tower {spec.describe()}")


def load_transformers_tower(folder: Path, name: str | None = None) -> TransformersTower:
    """A CLIPVisionModel from a local folder (config.json + weights); never from a hub."""
    from transformers import CLIPVisionModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"vision tower: {folder} has no config.json; give a local CLIPVisionModel folder")
    model = CLIPVisionModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    return TransformersTower(model, name or folder.name)
