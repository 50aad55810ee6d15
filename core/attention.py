"""Cross-attention capture and the face-wise attention losses (SeFi-IDE-style), shared by every backend.

A backend lists its cross-attention layers as AttentionSites and, while an AttentionRecorder is recording, computes
softmax(Q K^T / sqrt(d)) explicitly on the recorder's layers only (every other layer keeps its fast kernel) and hands
each map to the recorder: (B, N, L) float32, averaged over heads, with gradients, N query pixels, L = 77 text tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checkpointing import recomputing
from .errors import InputError

PARTS = ("down", "mid", "up")
LAYER_CHOICES = ("default", "all")  # default: the deepest resolution with cross-attention outside the middle block


@dataclass(frozen=True)
class AttentionSite:
    """One cross-attention layer of a UNet, named as its backend names it."""

    part: str  # down | mid | up
    level: int  # resolution level: 0 at the latent's size, 1 at half of it, 2 at a quarter, ...
    name: str  # diffusers "down_blocks.2.attentions.0.transformer_blocks.0.attn2"; ComfyUI "input.7.0"


def select_sites(sites: Sequence[AttentionSite], choice: str = "default") -> list[AttentionSite]:
    """The sites a layer choice names: 'default' is the deepest level outside the middle block, 'all' every one.

    default is 16x16 at 512 px for SD1.x/SD2.x (down_blocks.2, up_blocks.1) and 32x32 at 1024 px for SDXL
    (down_blocks.2, up_blocks.0): a quarter of the latent's size in both, as METHODS.md 3.3 suggests.
    """
    if choice not in LAYER_CHOICES:
        raise InputError(f"layers: unknown choice '{choice}'; choose one of {', '.join(LAYER_CHOICES)}")
    if not sites:
        raise InputError("model: its UNet has no cross-attention layers, so attention cannot be recorded")
    if choice == "all":
        return list(sites)
    outside = [s for s in sites if s.part != "mid"] or list(sites)
    deepest = max(s.level for s in outside)
    return [s for s in outside if s.level == deepest]


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) per head in float32: q (B, N, H*d), k (B, L, H*d) -> (B, H, N, L)."""
    batch, n_query, inner = q.shape
    dim = inner // heads
    qh = q.float().view(batch, n_query, heads, dim).transpose(1, 2)
    kh = k.float().view(batch, k.shape[1], heads, dim).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(dim), dim=-1)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention computed from its probabilities: the output (B, N, H*d) in q's dtype, and the map (B, N, L) over heads."""
    probs = attention_probabilities(q, k, heads)
    batch, n_query, _ = q.shape
    vh = v.float().view(batch, v.shape[1], heads, -1).transpose(1, 2)
    out = (probs @ vh).transpose(1, 2).reshape(batch, n_query, -1)
    return out.to(q.dtype), probs.mean(dim=1)


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The same attention through torch's fused kernel, for the layers nothing records."""
    batch, n_query, _ = q.shape
    qh, kh, vh = (t.view(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(batch, n_query, -1)


class AttentionRecorder:
    """Which layers to record, and the maps they gave in the current forward (skipped in checkpoint recomputes)."""

    def __init__(self, sites: Sequence[AttentionSite]) -> None:
        self.sites = list(sites)
        self.names = frozenset(s.name for s in sites)
        self.maps: list[torch.Tensor] = []
        self.active = False

    def wants(self, name: str) -> bool:
        """Whether the layer of this name must compute its map explicitly and hand it over now."""
        return self.active and name in self.names and not recomputing()

    def add(self, name: str, probs: torch.Tensor) -> None:
        """Keep one layer's (B, N, L) map."""
        if self.wants(name):
            self.maps.append(probs)

    @contextmanager
    def recording(self) -> Iterator[AttentionRecorder]:
        """While active, the chosen layers record; the maps of one forward are read with take()."""
        self.maps = []
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def take(self) -> list[torch.Tensor]:
        """The maps recorded so far, in layer order, and an empty list for the next forward."""
        maps, self.maps = self.maps, []
        return maps


def spatial_shape(n_query: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with n_query pixels in a UNet whose input latent is latent_hw (each level halves, rounding up)."""
    height, width = latent_hw
    while height * width > n_query and (height > 1 or width > 1):
        height, width = (height + 1) // 2, (width + 1) // 2
    if height * width != n_query:
        raise ValueError(f"attention: {n_query} query pixels fit no level of a {latent_hw} latent")
    return height, width


def identity_mass(probs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, N): each pixel's attention probability summed over the identity's token positions (slots: (B, L) bool)."""
    return (probs * slots.to(probs.dtype).unsqueeze(1)).sum(dim=-1)


def _mask_at(masks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B, h*w) mask weights averaged down to a layer's grid."""
    return F.interpolate(masks.float(), size=shape, mode="area").flatten(1)


def inside_share(maps: Sequence[torch.Tensor], slots: torch.Tensor, masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B,): the share of the identity tokens' attention that lies inside the mask, averaged over the layers.

    Per layer, the identity's map over pixels (identity_mass) is normalised to sum to 1 and weighted by the mask
    (in [0, 1], (B, 1, H, W) at any size, averaged down to the layer's grid). 1 means all of it on the face.
    """
    shares = []
    for probs in maps:
        mass = identity_mass(probs, slots.to(probs.device))
        weights = _mask_at(masks.to(probs.device), spatial_shape(probs.shape[1], latent_hw))
        shares.append((mass * weights).sum(dim=1) / mass.sum(dim=1).clamp_min(1e-12))
    return torch.stack(shares).mean(dim=0)


def mask_attention_loss(
    maps: Sequence[torch.Tensor], slots: torch.Tensor, masks: torch.Tensor, latent_hw: tuple[int, int]
) -> torch.Tensor:
    """The mask mode's loss: 1 - inside_share, averaged over the batch; 0 when all the attention is on the face."""
    return (1 - inside_share(maps, slots, masks, latent_hw)).mean()


def reference_attention_loss(
    maps: Sequence[torch.Tensor], reference_maps: Sequence[torch.Tensor], slots: torch.Tensor, reference_at: torch.Tensor
) -> torch.Tensor:
    """The reference mode's loss: ||identity map - class word's map||^2 over pixels, averaged over layers and batch.

    maps come from the training prompt, reference_maps (no gradient) from the reference prompt on the same noisy
    latent and timestep; reference_at (B,) is the class word's token position in each reference prompt.
    """
    if len(maps) != len(reference_maps):
        raise ValueError(f"attention: {len(maps)} training maps but {len(reference_maps)} reference maps")
    losses = []
    for probs, reference in zip(maps, reference_maps):
        mass = identity_mass(probs, slots.to(probs.device))
        at = reference_at.to(reference.device).view(-1, 1, 1).expand(-1, reference.shape[1], 1)
        target = reference.detach().float().gather(-1, at).squeeze(-1)
        losses.append(((mass - target) ** 2).sum(dim=1).mean())
    return torch.stack(losses).mean()
