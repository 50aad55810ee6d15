"""The seams between the trainer and a model backend: text encoders, the denoiser, and the conditioning they share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

SLOT = "{}"  # where identity rows go in a prompt given to TextEncoder.encode
MAX_TOKENS = 77  # CLIP context: BOS + 75 prompt tokens + EOS

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass
class EncodedText:
    """One text encoder's output for a batch of prompts."""

    hidden: torch.Tensor  # (B, 77, width) at the model family's conditioning layer
    pooled: torch.Tensor | None  # (B, P) projected pooled output where the family uses it (SDXL clip_g)


@dataclass
class Conditioning:
    """What the denoiser is conditioned on: cross-attention context and, for SDXL, the pooled vector."""

    context: torch.Tensor  # (B, 77, D): what cross-attention keys (and, without value_context, values) come from
    pooled: torch.Tensor | None = None
    # (B, 77, D) or None: a per-stage identity's value prompt; cross-attention values then come from it, keys from
    # context (SeFi-IDE-style key/value split, METHODS.md 3.3)
    value_context: torch.Tensor | None = None

    def select(self, index: Sequence[int]) -> Conditioning:
        """The conditioning of rows index, in that order."""
        if list(index) == list(range(self.context.shape[0])):
            return self
        at = index_on(self.context.device, index)
        pooled = None if self.pooled is None else self.pooled.index_select(0, at.to(self.pooled.device))
        value = None if self.value_context is None else self.value_context.index_select(0, at)
        return Conditioning(context=self.context.index_select(0, at), pooled=pooled, value_context=value)


def index_on(device: torch.device, index: Sequence[int]) -> torch.Tensor:
    """index as a long tensor on device; on CUDA it goes from pinned memory without waiting (a plain copy syncs)."""
    host = torch.tensor(list(index), dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@runtime_checkable
class TextEncoder(Protocol):
    """A CLIP text encoder that splices identity rows into its input embeddings, with gradients."""

    key: str  # "clip_l", "clip_h" or "clip_g": the encoder's key in identity files
    width: int  # input embedding width
    # Optional `dtype: torch.dtype`: the dtype it computes in (core.precision.part_dtype reads float32 when absent).

    def token_ids(self, text: str) -> list[int]:
        """BPE ids of text, without BOS/EOS."""
        ...

    def in_vocabulary(self, word: str) -> bool:
        """Whether word is already a single entry of the vocabulary (with or without the end-of-word mark)."""
        ...

    def token_table(self) -> torch.Tensor:
        """The frozen input token-embedding table, (vocab, width)."""
        ...

    def special_ids(self) -> tuple[int, int, int]:
        """(BOS, EOS, PAD) ids."""
        ...

    def encode(self, prompts: Sequence[str], rows: torch.Tensor | None) -> EncodedText:
        """Encode prompts whose SLOT is replaced by rows; gradients flow to rows.

        rows: (n, width), the same n rows in every prompt, or (B, n, width) with B = len(prompts), each prompt's own.
        """
        ...


@runtime_checkable
class Denoiser(Protocol):
    """A latent diffusion denoiser with its VAE and noise schedule."""

    prediction_type: str  # "epsilon" or "v_prediction"
    num_train_timesteps: int
    device: torch.device
    # Optional `dtype: torch.dtype`: the dtype the UNet computes in; float16 turns on loss scaling (core.precision).

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latent mean and std of images in [-1, 1], (N, 3, H, W) -> two (N, C, h, w)."""
        ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t for integer timesteps under the model's schedule."""
        ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The training target: the noise (epsilon) or the velocity (v-prediction)."""
        ...

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's prediction for x_t at timesteps under the conditioning (values from cond.value_context if set)."""
        ...

    # For attention capture (core.attention), both backends also give:
    #   attention_sites() -> list[AttentionSite]: every cross-attention layer of the UNet, in forward order;
    #   recording(recorder: AttentionRecorder) -> context manager: while active, predict computes the layers the
    #   recorder wants explicitly and hands each (B, N, 77) map, with gradients, to recorder.add(name, map).


@dataclass
class Model:
    """A loaded model: family, its text encoders in context order, and the denoiser."""

    family: str
    encoders: list[TextEncoder]
    denoiser: Denoiser
    name: str = ""
    # The names Cross Initialization averages for this model; None: the pack's list of real celebrities. The lab
    # model carries its own world's famous names (celebrity_names.txt in its folder).
    celebrity_names: tuple[str, ...] | None = None

    def encoder(self, key: str) -> TextEncoder:
        """The text encoder with this identity key."""
        for enc in self.encoders:
            if enc.key == key:
                return enc
        raise KeyError(key)


def distinct_prompts(prompts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The distinct prompts in first-seen order, and for each prompt the position of its distinct one."""
    first: dict[str, int] = {}
    inverse = [first.setdefault(p, len(first)) for p in prompts]
    return list(first), inverse


def encode_distinct(model: Model, prompts: Sequence[str], rows: Mapping[str, torch.Tensor] | None) -> Conditioning:
    """Encode prompts (meant to be distinct) with every encoder, rows spliced at SLOT, joined as the family does."""
    outputs = [enc.encode(prompts, None if rows is None else rows[enc.key]) for enc in model.encoders]
    context = outputs[0].hidden if len(outputs) == 1 else torch.cat([o.hidden for o in outputs], dim=-1)
    pooled = next((o.pooled for o in reversed(outputs) if o.pooled is not None), None)
    return Conditioning(context=context, pooled=pooled)


def condition(model: Model, prompts: Sequence[str], rows: Mapping[str, torch.Tensor] | None) -> Conditioning:
    """Encode prompts with every encoder, identity rows spliced at SLOT; each distinct prompt is encoded once."""
    distinct, inverse = distinct_prompts(prompts)
    return encode_distinct(model, distinct, rows).select(inverse)
