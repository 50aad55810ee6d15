"""The Identity type: learned token rows per text encoder plus provenance metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError

# Encoder keys used across the pack and in SDXL files (ComfyUI's embedding keys).
ENCODER_KEYS = ("clip_l", "clip_h", "clip_g")

# Real-model widths, used to guess the encoder of a foreign single-tensor file.
WIDTH_TO_ENCODER = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}


class IdentityError(InputError):
    """A user-facing problem with an identity, its file, or its use; the message says the fix."""


@dataclass
class Identity:
    """Token rows per text encoder, each a float32 CPU tensor of shape (n_tokens, width)."""

    rows: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rows:
            raise IdentityError("identity: it holds no token rows; train or load one first")
        counts = {key: int(value.shape[0]) for key, value in self.rows.items()}
        for key, value in self.rows.items():
            if value.ndim != 2:
                raise IdentityError(
                    f"identity: rows for '{key}' have shape {tuple(value.shape)}; expected (n_tokens, width)"
                )
        if len(set(counts.values())) != 1:
            raise IdentityError(
                f"identity: encoders disagree on the token count {counts}; every encoder needs the same n"
            )
        self.rows = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in self.rows.items()}
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}

    @property
    def n_tokens(self) -> int:
        """How many token vectors the identity puts into a prompt."""
        return int(next(iter(self.rows.values())).shape[0])

    @property
    def encoders(self) -> tuple[str, ...]:
        """The encoder keys the identity has rows for, in a stable order."""
        return tuple(sorted(self.rows))

    def rows_for(self, encoder_key: str, width: int) -> torch.Tensor:
        """The rows for one encoder, checked against its width; a lone tensor serves any matching encoder."""
        value = self.rows.get(encoder_key)
        if value is None and len(self.rows) == 1:
            value = next(iter(self.rows.values()))
        if value is None:
            raise IdentityError(
                f"identity: no rows for text encoder '{encoder_key}' (it has {', '.join(self.encoders)}); "
                "use an identity trained for this model family"
            )
        if int(value.shape[1]) != width:
            raise IdentityError(
                f"identity: rows are {int(value.shape[1])} wide but text encoder '{encoder_key}' takes {width}; "
                "this identity was made for another model family, train or load one for this model"
            )
        return value
