"""The identity encoder: features of several vision-tower layers through a small mapper to identity rows.

The design follows ELITE's global mapper (METHODS.md 4.2): per tower layer, MLP(class token) + mean(MLP(patch
tokens)); the layers' features are concatenated and a linear head per text encoder gives n rows of its width. The
rows are an offset added to base rows (the text encoder's Cross-Init start, stored in the encoder file), with the
head zero-initialised, so an untrained encoder gives exactly the Cross-Init start and training moves away from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..identity import Identity
from .vision import VisionSpec, VisionTower, check_layers, preprocess, square

METHOD = "encoder"  # the identity's recorded method


@dataclass(frozen=True)
class EncoderSpec:
    """Every size of an encoder, and what it was trained for (the vision tower and the text encoders)."""

    vision: VisionSpec
    widths: dict[str, int]  # identity key -> text embedding width, e.g. {"clip_l": 768}
    family: str  # the model family the base rows come from: sd1, sd2, sdxl
    layers: tuple[int, ...] = ()  # tower layers read, 1-based; () = five evenly spaced ones ending with the last
    n_tokens: int = 2
    hidden: int = 256  # the mapper's width per layer
    base_model: str = ""  # what the base rows were taken from (informative)
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Fill the default layers and check them against the tower."""
        if not self.layers:
            count = min(5, self.vision.layers)
            step = self.vision.layers / count
            object.__setattr__(self, "layers", tuple(round(self.vision.layers - i * step) for i in range(count)))
        check_layers(self.layers, self.vision)
        if self.n_tokens < 1 or not self.widths:
            raise ValueError("encoder: needs at least one token and one text encoder width")

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        values = asdict(self)
        values["vision"] = self.vision.to_dict()
        values["layers"] = list(self.layers)
        return values

    @classmethod
    def from_dict(cls, values: Mapping) -> EncoderSpec:
        """The spec from to_dict's fields."""
        fields = dict(values)
        fields["vision"] = VisionSpec.from_dict(fields["vision"])
        fields["layers"] = tuple(fields["layers"])
        fields["widths"] = {str(k): int(v) for k, v in fields["widths"].items()}
        return cls(**fields)


def _mlp(width_in: int, hidden: int) -> nn.Sequential:
    """Linear-LayerNorm-LeakyReLU twice (ELITE's per-level block)."""
    return nn.Sequential(
        nn.Linear(width_in, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
    )


class IdentityEncoder(nn.Module):
    """Vision features -> identity rows per text encoder key (base rows + a learned offset)."""

    def __init__(self, spec: EncoderSpec, base_rows: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.spec = spec
        self.levels = nn.ModuleList(_mlp(spec.vision.hidden_size, spec.hidden) for _ in spec.layers)
        joined = spec.hidden * len(spec.layers)
        self.norm = nn.LayerNorm(joined)
        self.heads = nn.ModuleDict({key: nn.Linear(joined, spec.n_tokens * width) for key, width in spec.widths.items()})
        for head in self.heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        for key, width in spec.widths.items():
            rows = base_rows[key].detach().float()
            if tuple(rows.shape) != (spec.n_tokens, width):
                raise ValueError(f"base rows of {key}: shape {tuple(rows.shape)}, expected ({spec.n_tokens}, {width})")
            self.register_buffer(f"base_{key}", rows.clone())

    def base(self, key: str) -> torch.Tensor:
        """The (n, width) rows an untrained encoder gives."""
        return getattr(self, f"base_{key}")

    def features(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, layers x hidden): per layer MLP(class token) + mean of MLP(patch tokens), concatenated, normalised."""
        parts = []
        for level, hidden in zip(self.levels, states):
            mapped = level(hidden.float())
            parts.append(mapped[:, 0] + mapped[:, 1:].mean(dim=1))
        return self.norm(torch.cat(parts, dim=-1))

    def offsets(self, states: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per key, the (N, n, width) offsets from the base rows."""
        joined = self.features(states)
        n = self.spec.n_tokens
        return {key: head(joined).view(joined.shape[0], n, -1) for key, head in self.heads.items()}

    def forward(self, states: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per key, each image's (N, n, width) rows."""
        return {key: self.base(key) + delta for key, delta in self.offsets(states).items()}

    def encode_images(self, tower: VisionTower, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) pictures in [0, 1] -> each image's rows per key (tower frozen, no gradient to it)."""
        check_tower(self.spec, tower)
        device = self.base(next(iter(self.spec.widths))).device
        pixels = preprocess(images.to(device), self.spec.vision)
        with torch.no_grad():
            states = tower.hidden_states(pixels, self.spec.layers)
        return self(states)


def check_tower(spec: EncoderSpec, tower: VisionTower) -> None:
    """Refuse a tower of other sizes than the encoder was trained for."""
    from ..errors import InputError

    problem = spec.vision.mismatch(tower.spec)
    if problem:
        raise InputError(f"clip_vision: {problem}; load the vision model the encoder names, or train an encoder for yours")


@torch.no_grad()
def encode_identity(
    encoder: IdentityEncoder, tower: VisionTower, images: torch.Tensor, token: str = "<identity>"
) -> Identity:
    """One identity from one or more photos of a subject: the mean of each photo's rows (one forward pass)."""
    was_training = encoder.training
    encoder.eval()
    try:
        rows = encoder.encode_images(tower, images)
    finally:
        encoder.train(was_training)
    spec = encoder.spec
    metadata = {
        "method": METHOD,
        "base_family": spec.family,
        "vision_tower": spec.vision.name,
        "images": str(images.shape[0]),
        "n_tokens": str(spec.n_tokens),
        "token": token,
    }
    return Identity(rows={k: v.mean(dim=0).float().cpu() for k, v in rows.items()}, metadata=metadata)


def encode_photos(
    encoder: IdentityEncoder, tower: VisionTower, photos: Sequence[torch.Tensor], token: str = "<identity>"
) -> Identity:
    """encode_identity of photos of any sizes, each a (1, 3, H, W) picture in [0, 1]: each one's centre square at the
    tower's input size."""
    side = encoder.spec.vision.image_size
    return encode_identity(encoder, tower, torch.cat([square(photo, side) for photo in photos]), token)
