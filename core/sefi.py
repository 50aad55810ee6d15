"""SeFi-IDE-style training parts: the face-wise attention loss, per-stage key/value conditioning, attention snapshots.

Choices the paper does not fix (METHODS.md 3.3, written down in the README):
* mask mode: loss = 1 - (share of the identity tokens' attention inside the face mask), per layer, averaged;
* reference mode: ||identity map - class word's map||^2 summed over pixels, the class word's map taken from the same
  UNet pass (same noisy latent and timestep, no gradient) with the reference prompt: the training prompt with the
  identity's slot replaced by the class word; the identity's map is the sum of its tokens' maps;
* layers: the deepest resolution with cross-attention outside the middle block (core.attention.select_sites);
* per-stage tokens are optimised directly (no token-generator network): one key and one value row set per stage;
  the pooled vector (SDXL) comes from the middle stage's value prompt, as the CONDITIONING at sampling carries it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .attention import (
    LAYER_CHOICES,
    AttentionRecorder,
    identity_mass,
    inside_share,
    mask_attention_loss,
    reference_attention_loss,
    select_sites,
    spatial_shape,
)
from .errors import InputError
from .protocols import SLOT, Conditioning, Model, condition, encode_distinct

FACE_LOSS_MODES = ("mask", "reference")
DEFAULT_WEIGHT = 0.003  # SeFi-IDE's best lambda (METHODS.md 3.1)
DEFAULT_REFERENCE_WORD = "person"
SNAPSHOT_TIMESTEPS = (250, 500, 750)  # the heatmap averages the maps at these timesteps (of 1000)
SNAPSHOT_SEED_SALT = 0xA77E_0000  # the heatmap's noise comes from seed ^ salt, apart from the training draws


@dataclass(frozen=True)
class FaceLoss:
    """The face-wise attention loss setting: mode, weight, layers and (reference mode) the class word."""

    mode: str = "mask"
    weight: float = DEFAULT_WEIGHT
    layers: str = "default"
    reference_word: str = DEFAULT_REFERENCE_WORD

    def check(self) -> FaceLoss:
        """Refuse an unknown mode or layer choice and a weight that is negative or not a number."""
        if self.mode not in FACE_LOSS_MODES:
            raise InputError(f"face loss: unknown mode '{self.mode}'; choose {' or '.join(FACE_LOSS_MODES)}")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight < 0:
            raise InputError(
                f"face loss weight: got {self.weight}; use a number of 0 or more ({DEFAULT_WEIGHT} is SeFi-IDE's)"
            )
        if self.layers not in LAYER_CHOICES:
            raise InputError(f"face loss layers: unknown '{self.layers}'; choose one of {', '.join(LAYER_CHOICES)}")
        if self.mode == "reference" and (not self.reference_word.strip() or " " in self.reference_word.strip()):
            raise InputError(
                f"reference word: got '{self.reference_word}'; give one class word such as '{DEFAULT_REFERENCE_WORD}'"
            )
        return self


def check_reference_word(model: Model, word: str) -> None:
    """The class word must be one token in every text encoder, so the two prompts line up position by position."""
    for enc in model.encoders:
        ids = enc.token_ids(word)
        if len(ids) != 1:
            raise InputError(
                f"reference word: '{word}' is {len(ids)} CLIP tokens; the reference mode needs a one-token class word "
                f"such as '{DEFAULT_REFERENCE_WORD}', 'man', 'woman' or 'face'"
            )


def check_face_masks(masks: torch.Tensor | None, n_images: int) -> torch.Tensor:
    """The mask mode's masks: one per photo, each with some face in it."""
    if masks is None:
        raise InputError(
            "mask: the face loss's mask mode needs a face mask per photo; connect Face Crop's masks (or draw one "
            "with the mask editor), use --face-crop on the command line, or choose the reference mode"
        )
    if masks.shape[0] != n_images:
        raise InputError(f"mask: got {masks.shape[0]} face masks for {n_images} photos; give one per photo")
    for number, mask in enumerate(masks, start=1):
        if not float(mask.float().max()) > 0:
            raise InputError(
                f"mask: the face mask of photo {number} is empty (all zero); draw the face on it or use Face Crop's mask"
            )
    return masks


def identity_slots(model: Model, prompts: Sequence[str], n_rows: int, device: torch.device) -> torch.Tensor:
    """(B, 77) bool: where the identity's rows sit in each prompt (every encoder of a family tokenizes alike)."""
    _, slots = model.encoders[0].prompts.spliced(list(prompts), n_rows, device)
    return slots >= 0


def reference_prompts(prompts: Sequence[str], word: str) -> list[str]:
    """The training prompts with the identity's slot replaced by the class word."""
    return [p.replace(SLOT, word) for p in prompts]


def reference_positions(model: Model, prompts: Sequence[str]) -> list[int]:
    """The class word's token position in each training prompt's reference: where its slot starts (same prefix)."""
    return [model.encoders[0].prompts.ids(p, 1)[1][0] for p in prompts]


class StagedRows:
    """Per-stage key and value rows per encoder, (2, S, n, width) parameters, turned into a step's conditioning."""

    def __init__(self, rows: Mapping[str, torch.Tensor], schedule: object) -> None:
        self.rows = rows
        self.schedule = schedule

    @property
    def middle(self) -> int:
        """The stage whose value rows a plain prompt carries (the CONDITIONING at sampling)."""
        return self.schedule.count // 2

    def condition(self, model: Model, prompts: Sequence[str], timesteps: torch.Tensor) -> Conditioning:
        """Keys from each sample's stage key rows, values from its stage value rows, pooled from the middle stage."""
        stage = self.schedule.stage_of(timesteps)
        keys = encode_distinct(model, prompts, {k: r[0].index_select(0, stage.to(r.device)) for k, r in self.rows.items()})
        values = encode_distinct(model, prompts, {k: r[1].index_select(0, stage.to(r.device)) for k, r in self.rows.items()})
        pooled = None
        if keys.pooled is not None:
            pooled = condition(model, prompts, {k: r[1, self.middle] for k, r in self.rows.items()}).pooled
        return Conditioning(context=keys.context, pooled=pooled, value_context=values.context)


class AttentionTerm:
    """The face-wise attention loss of one micro-batch, from the maps the backend recorded in its forward."""

    def __init__(self, model: Model, setting: FaceLoss, recorder: AttentionRecorder, n_rows: int) -> None:
        self.model = model
        self.setting = setting
        self.recorder = recorder
        self.n_rows = n_rows
        self._reference: dict[str, Conditioning] = {}

    def reference_condition(self, prompts: Sequence[str]) -> Conditioning:
        """The frozen reference prompts' conditioning, each distinct one encoded once per run."""
        wanted = reference_prompts(prompts, self.setting.reference_word)
        missing = sorted({p for p in wanted if p not in self._reference})
        if missing:
            with torch.no_grad():
                encoded = condition(self.model, missing, None)
            for index, prompt in enumerate(missing):
                self._reference[prompt] = encoded.select([index])
        parts = [self._reference[p] for p in wanted]
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(context=torch.cat([p.context for p in parts]), pooled=pooled)

    def reference_maps(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: Sequence[str]) -> list[torch.Tensor]:
        """The class word's maps on the same noisy latents and timesteps, without gradient and without the K/V split."""
        cond = self.reference_condition(prompts)
        with torch.no_grad(), self.recorder.recording():
            self.model.denoiser.predict(noisy, timesteps, cond)
        return [m.detach() for m in self.recorder.take()]

    def loss(self, maps: list[torch.Tensor], prompts: Sequence[str], masks: torch.Tensor | None,
             latent_hw: tuple[int, int], reference: list[torch.Tensor] | None) -> torch.Tensor:
        """The unweighted loss of a micro-batch: mask mode's 1 - inside share, or the reference mode's squared error."""
        if not maps:
            raise RuntimeError("attention: the backend recorded no maps at the chosen layers")
        device = maps[0].device
        slots = identity_slots(self.model, prompts, self.n_rows, device)
        if self.setting.mode == "mask":
            return mask_attention_loss(maps, slots, masks, latent_hw)
        at = torch.tensor(reference_positions(self.model, prompts))
        return reference_attention_loss(maps, reference, slots, at)


def recorder_for(model: Model, layers: str = "default") -> AttentionRecorder:
    """A recorder of the layers a choice names in this model's UNet."""
    return AttentionRecorder(select_sites(model.denoiser.attention_sites(), layers))


def _pooled_maps(maps: Sequence[torch.Tensor], slots: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h, w): the identity's mass per layer, each brought to the finest recorded grid and averaged."""
    grids = [(identity_mass(m, slots.to(m.device)), spatial_shape(m.shape[1], latent_hw)) for m in maps]
    size = max((shape for _, shape in grids), key=lambda s: s[0] * s[1])
    resized = [F.interpolate(mass.view(-1, 1, *shape), size=size, mode="bilinear", align_corners=False)
               for mass, shape in grids]
    return torch.cat(resized, dim=1).mean(dim=1)


@torch.no_grad()
def attention_snapshot(model: Model, recorder: AttentionRecorder, latents: torch.Tensor, prompt: str,
                       rows: Mapping[str, torch.Tensor], n_rows: int, seed: int, staged: StagedRows | None = None,
                       masks: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Where the identity looks in each photo: (N, h, w) attention mass averaged over SNAPSHOT_TIMESTEPS, and with masks
    the (N,) share inside them. latents: (N, C, h, w) clean latents of the photos (no flips)."""
    den = model.denoiser
    gen = torch.Generator(device=latents.device).manual_seed(seed ^ SNAPSHOT_SEED_SALT)
    prompts = [prompt] * latents.shape[0]
    slots = identity_slots(model, prompts, n_rows, latents.device)
    total, shares = None, []
    scale = den.num_train_timesteps / 1000
    for step in SNAPSHOT_TIMESTEPS:
        t = torch.full((latents.shape[0],), int(step * scale), dtype=torch.long, device=latents.device)
        noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
        cond = staged.condition(model, prompts, t) if staged is not None else condition(model, prompts, rows)
        with recorder.recording():
            den.predict(den.add_noise(latents, noise, t), t, cond)
        maps = recorder.take()
        pooled = _pooled_maps(maps, slots, tuple(latents.shape[-2:]))
        total = pooled if total is None else total + pooled
        if masks is not None:
            shares.append(inside_share(maps, slots, masks, tuple(latents.shape[-2:])))
    heat = (total / len(SNAPSHOT_TIMESTEPS)).float().cpu().numpy()
    share = torch.stack(shares).mean(dim=0).float().cpu().numpy() if shares else None
    return heat, share
