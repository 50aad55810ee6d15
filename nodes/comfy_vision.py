"""ComfyUI's CLIP_VISION (comfy.clip_vision.ClipVisionModel) as core's VisionTower: sizes read from the model, the
hidden states of any encoder layers caught by forward hooks.

Both cores build the same modules (comfy.clip_model.CLIPVisionModelProjection: vision_model.embeddings with a class
token, vision_model.encoder.layers, each a CLIPLayer). What differs: the March-2024 core keeps no config on the
ClipVisionModel and always preprocesses to 224 px with OpenAI's mean/std; today's keeps image_size, image_mean and
image_std (from the model's JSON config) and also builds SigLIP and DINOv2 encoders, which have no class token.
ComfyUI's own encode_image returns only the penultimate layer; the hooks here read any layer, so nothing depends on
that. The pixels come normalised by core's preprocess (the encoder's own preprocessing), not by ComfyUI's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.encoders.mapper import EncoderSpec, check_tower
from ..core.encoders.vision import CLIP_MEAN, CLIP_STD, VisionSpec, VisionTower, check_layers
from ..core.errors import InputError

# Names of the towers ComfyUI users load, by (width, layers, image size, patch); any other is "comfy-clip-vision".
KNOWN_TOWERS = {
    (1024, 24, 224, 14): "clip-vit-l-14",
    (1024, 24, 336, 14): "clip-vit-l-14-336",
    (1280, 32, 224, 14): "clip-vit-h-14",
    (1664, 48, 224, 14): "clip-vit-bigg-14",
}
OTHER_TOWER = "comfy-clip-vision"


def _vision_transformer(clip_vision: object) -> torch.nn.Module:
    """The CLIPVision module of a CLIP_VISION, or an InputError saying why this one is not a CLIP ViT."""
    model = getattr(clip_vision, "model", None)
    vision = getattr(model, "vision_model", None)
    embeddings = getattr(vision, "embeddings", None)
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if embeddings is None or layers is None or not hasattr(clip_vision, "patcher"):
        raise InputError(
            f"clip_vision: a {type(model).__name__} is not a CLIP vision transformer; identity encoders read CLIP "
            "ViTs (e.g. ViT-L/14): connect a Load CLIP Vision node with the model the encoder names"
        )
    if getattr(embeddings, "class_embedding", None) is None:
        raise InputError(
            "clip_vision: this vision model has no class token (a SigLIP model); identity encoders read CLIP ViTs "
            "(e.g. ViT-L/14): connect a Load CLIP Vision node with the model the encoder names"
        )
    return vision


class ComfyVisionTower:
    """A CLIP_VISION as a VisionTower. hidden_states(pixels, layers) gives the output of encoder layer i (1-based,
    class token first), as transformers' hidden_states[i], in float32 on the pixels' device."""

    def __init__(self, clip_vision: object) -> None:
        vision = _vision_transformer(clip_vision)
        self.clip_vision = clip_vision
        self.vision = vision
        self.layers = vision.encoder.layers
        embeddings = vision.embeddings
        conv = embeddings.patch_embedding
        patch = int(conv.kernel_size[0])
        side = math.isqrt(int(embeddings.position_embedding.weight.shape[0]) - 1)  # positions: patches + class token
        size = side * patch
        self.spec = VisionSpec(
            name=KNOWN_TOWERS.get((int(conv.out_channels), len(self.layers), size, patch), OTHER_TOWER),
            hidden_size=int(conv.out_channels),
            layers=len(self.layers),
            image_size=size,
            patch_size=patch,
            mean=tuple(float(v) for v in getattr(clip_vision, "image_mean", CLIP_MEAN)),
            std=tuple(float(v) for v in getattr(clip_vision, "image_std", CLIP_STD)),
        )

    def hidden_states(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Run the tower where ComfyUI loads it (as its encode_image does) with hooks on the wanted layers."""
        import comfy.model_management

        check_layers(layers, self.spec)
        comfy.model_management.load_model_gpu(self.clip_vision.patcher)
        caught: dict[int, torch.Tensor] = {}

        def catch(number: int) -> object:
            def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                # A copy: ComfyUI's CLIPLayer adds its residuals in place, so the next layer overwrites this tensor.
                caught[number] = hidden.detach().to(pixel_values.device, torch.float32, copy=True)

            return hook

        handles = [self.layers[number - 1].register_forward_hook(catch(number)) for number in sorted(set(layers))]
        try:
            self.vision(pixel_values=pixel_values.to(self.clip_vision.load_device, torch.float32))
        finally:
            for handle in handles:
                handle.remove()
        return [caught[number] for number in layers]


def _lab_tower() -> VisionTower:
    """The pack's shipped lab vision tower (core/lab/data/vision_tower)."""
    from ..core.lab import vision as lab

    if not (lab.FOLDER / "config.json").is_file():
        raise InputError(
            f"clip_vision: the encoder reads the pack's lab vision tower '{lab.NAME}', but {lab.FOLDER} is missing; "
            "reinstall the pack"
        )
    return lab.load_tower(lab.FOLDER)


def vision_tower(spec: EncoderSpec, clip_vision: object | None) -> VisionTower:
    """The tower an encoder reads: the connected CLIP_VISION, or for lab encoders ('lab-vit') the pack's lab tower;
    refused (check_tower's message) when its sizes are not those the encoder was trained for."""
    from ..core.lab.vision import NAME as LAB_TOWER

    if clip_vision is not None:
        tower = ComfyVisionTower(clip_vision)
    elif spec.vision.name == LAB_TOWER:
        tower = _lab_tower()
    else:
        raise InputError(
            f"clip_vision: the encoder reads the vision tower {spec.vision.describe()}; connect a Load CLIP Vision "
            "node with that model (from models/clip_vision) to clip_vision"
        )
    check_tower(spec, tower)
    return tower
