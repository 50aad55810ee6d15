"""Load a model for training: a built-in tiny model, a local diffusers folder, or a single-file checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .backends.diffusers import place_components
from .errors import InputError
from .protocols import Model
from .tiny import TINY_FAMILIES, model_from_components, tiny_components
from .vocab import load_clip_tokenizer

NATIVE_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}
TINY_RESOLUTION = 64


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; 'cuda' without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device: CUDA was asked for but no GPU is visible; use --device cpu or auto")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """UNet/VAE precision: bf16 or fp16 on CUDA, fp32 on the CPU (text encoders always stay fp32)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _folder_family(folder: Path) -> str:
    """sd1, sd2 or sdxl from a diffusers folder's model_index.json and text encoder width."""
    index = json.loads((folder / "model_index.json").read_text())
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    encoder_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    return "sd2" if int(encoder_config.get("hidden_size", 768)) == 1024 else "sd1"


def load_diffusers_folder(folder: Path, device: torch.device) -> Model:
    """Components of a local diffusers Stable Diffusion folder, read without any hub access."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family = _folder_family(folder)
    local = {"local_files_only": True}
    parts: dict[str, object] = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **local),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", **local),
        "scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **local),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **local),
    }
    for suffix in ("", "_2"):
        sub = folder / f"tokenizer{suffix}"
        pad = "<|endoftext|>" if suffix == "" and family != "sd2" else "!"
        parts[f"tokenizer{suffix}"] = (
            CLIPTokenizer.from_pretrained(sub, **local) if (sub / "vocab.json").is_file() else load_clip_tokenizer(pad)
        )
    if family == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", **local
        )
    return model_from_components(family, place_components(parts, device, compute_dtype(device)), name=folder.name)


def load_model(spec: str, device: torch.device | None = None) -> Model:
    """A model from 'tiny' (or tiny-sd1/tiny-sd2/tiny-sdxl), a diffusers folder, or a .safetensors/.ckpt file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = device or resolve_device()
    if spec in TINY_FAMILIES:
        family = TINY_FAMILIES[spec]
        return model_from_components(
            family, place_components(tiny_components(family), device, torch.float32), name=spec
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InputError(f"model: {path} is a folder without model_index.json; give a diffusers model folder")
        return load_diffusers_folder(path, device)
    if path.is_file():
        from .checkpoint import load_single_file

        return load_single_file(path, device, compute_dtype(device))
    raise InputError(
        f"model: '{spec}' is not a built-in name, a folder or a file; use 'tiny', a diffusers folder, "
        "or a checkpoint from ComfyUI's models/checkpoints"
    )


def default_resolution(model: Model) -> int:
    """The resolution a model was trained at (tiny models: 64)."""
    if model.name.startswith("tiny"):
        return TINY_RESOLUTION
    return NATIVE_RESOLUTION.get(model.family, 512)
