"""Test helper: a random-weight CLIP ViT-L/14 vision model that ComfyUI's Load CLIP Vision loads (transformers' key
layout, fp16, 303 M parameters, 0.6 GB), written once per machine into the cache like tests/tiny_sd15.py's checkpoint.

ComfyUI picks a CLIP vision config by the keys it finds (layer 22 present: ViT-L/14, 224 px) and loads the rest with
strict=False, so a smaller model would run on uninitialised weights: the file must have ViT-L/14's real sizes.
Weights are N(0, 0.02), biases 0, every LayerNorm weight 1. The key/shape table is written from transformers'
CLIPVisionModelWithProjection layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.comfyui_env import CACHE
from tests.tiny_sd15 import save_once

VERSION = "1"  # bump when the layout or the weights change; the cache file name carries it
WIDTH, LAYERS, MLP, PATCH, IMAGE, PROJECTION = 1024, 24, 4096, 14, 224, 768
PREFIX = "vision_model."


def shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape."""
    table: dict[str, tuple[int, ...]] = {
        f"{PREFIX}embeddings.class_embedding": (WIDTH,),
        f"{PREFIX}embeddings.patch_embedding.weight": (WIDTH, 3, PATCH, PATCH),
        f"{PREFIX}embeddings.position_embedding.weight": ((IMAGE // PATCH) ** 2 + 1, WIDTH),
        "visual_projection.weight": (PROJECTION, WIDTH),
    }
    for norm in ("pre_layrnorm", "post_layernorm"):
        table.update({f"{PREFIX}{norm}.weight": (WIDTH,), f"{PREFIX}{norm}.bias": (WIDTH,)})
    linears = {"self_attn.q_proj": (WIDTH, WIDTH), "self_attn.k_proj": (WIDTH, WIDTH), "self_attn.v_proj": (WIDTH, WIDTH),
               "self_attn.out_proj": (WIDTH, WIDTH), "mlp.fc1": (MLP, WIDTH), "mlp.fc2": (WIDTH, MLP)}
    for layer in range(LAYERS):
        base = f"{PREFIX}encoder.layers.{layer}."
        for name, shape in linears.items():
            table.update({f"{base}{name}.weight": shape, f"{base}{name}.bias": (shape[0],)})
        for norm in ("layer_norm1", "layer_norm2"):
            table.update({f"{base}{norm}.weight": (WIDTH,), f"{base}{norm}.bias": (WIDTH,)})
    return table


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The random weights in fp16."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for name, shape in shapes().items():
        if "norm" in name and name.endswith("weight"):
            value = torch.ones(shape)
        elif name.endswith("bias"):
            value = torch.zeros(shape)
        else:
            value = torch.randn(shape, generator=gen) * 0.02
        values[name] = value.half()
    return values


def write_clip_vision(path: Path | None = None, seed: int = 0) -> Path:
    """Write the model to `path` (default: the per-machine cache) unless it is already there; return the path."""
    path = Path(path) if path is not None else CACHE / "random_clip_vision" / f"clip_vit_l_14-v{VERSION}.safetensors"
    return save_once(path, lambda: state_dict(seed), {"format": "pt", "random_clip_vision_version": VERSION})
