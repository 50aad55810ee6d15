"""Load a model for training: a built-in tiny model, a local diffusers folder, or a single-file checkpoint."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .backends.diffusers import place_components
from .cross_init import read_names
from .errors import InputError
from .lab.model import MODEL_FOLDER as LAB_FOLDER
from .lab.model import NAMES_FILE as NAMES_FILE_NAME
from .lab.model import is_lab_folder
from .protocols import Model
from .tiny import TINY_FAMILIES, model_from_components, tiny_components
from .vocab import load_clip_tokenizer

PREDICTION_TYPES = ("epsilon", "v_prediction")
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}  # eps models; SD2 v-prediction (768-v) is 768
SD2_V_RESOLUTION = 768
TINY_RESOLUTION = 64
LAB_NAME = "lab"  # the built-in lab model (core/lab): a diffusers folder the pack pretrains and ships
LAB_RESOLUTION = 32


DEVICE_RULE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; a device that is unknown or not on this machine is an InputError."""
    usage = "use auto, cpu, cuda or cuda:N (N a GPU index)"
    if not isinstance(name, str) or not DEVICE_RULE.fullmatch(name):
        hint = f" (did you mean '{name.strip().lower()}'?)" if DEVICE_RULE.fullmatch(str(name).strip().lower()) else ""
        raise InputError(f"device: '{name}' is not a device the pack trains on{hint}; {usage}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("device: CUDA was asked for but no GPU is visible; use --device cpu or auto")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(
                f"device: {name} does not exist, this machine has {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); {usage}"
            )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device: mps (Apple GPU) is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """UNet/VAE precision: bf16 or fp16 on CUDA, fp32 on the CPU (text encoders too; the identity rows stay fp32)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


FOLDER_PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def check_diffusers_folder(folder: Path) -> None:
    """Refuse a model folder that lacks a part diffusers would need, naming the missing files, before loading any."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise InputError(f"model: {folder} is a folder without model_index.json; give a diffusers model folder")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"model: {index_path} is not readable JSON ({error}); copy the model folder again") from None
    needed = dict(FOLDER_PARTS)
    if "text_encoder_2" in index:
        needed["text_encoder_2"] = "config.json"
    missing = []
    for part, config in needed.items():
        sub = folder / part
        if not (sub / config).is_file():
            missing.append(f"{part}/{config}")
        elif not any(p.suffix in WEIGHT_SUFFIXES for p in sub.iterdir() if p.is_file()):
            missing.append(f"{part}/ weights (.safetensors or .bin)")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    if missing:
        raise InputError(
            f"model: the diffusers folder {folder} is incomplete, missing {', '.join(missing)}; copy or download "
            "the whole model folder, or give a single-file .safetensors checkpoint instead"
        )


def _folder_family(folder: Path) -> str:
    """sd1, sd2 or sdxl from a diffusers folder's model_index.json and text encoder width."""
    index = json.loads((folder / "model_index.json").read_text())
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    encoder_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    return "sd2" if int(encoder_config.get("hidden_size", 768)) == 1024 else "sd1"


def load_diffusers_folder(folder: Path, device: torch.device, prediction_type: str | None = None) -> Model:
    """Components of a local diffusers Stable Diffusion folder, read without any hub access."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check_diffusers_folder(folder)
    family = _folder_family(folder)
    local = {"local_files_only": True}
    parts: dict[str, object] = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **local),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", **local),
        "scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **local, **_overrides(prediction_type)),
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
    model = model_from_components(family, place_components(parts, device, compute_dtype(device)), name=folder.name)
    names_path = folder / NAMES_FILE_NAME
    if names_path.is_file():
        model.celebrity_names = tuple(read_names(names_path))
    if is_lab_folder(folder):
        model.name = LAB_NAME
    return model


def _overrides(prediction_type: str | None) -> dict[str, str]:
    """Scheduler config overrides for an explicitly chosen prediction type (none for auto)."""
    return {"prediction_type": prediction_type} if prediction_type else {}


def check_model_spec(spec: str) -> None:
    """Refuse a --model that cannot load (unknown name, missing path, incomplete folder) before any weights are read."""
    if spec in TINY_FAMILIES:
        return
    if spec == LAB_NAME:
        if not (LAB_FOLDER / "model_index.json").is_file():
            raise InputError(
                f"model: the lab model is not in {LAB_FOLDER}; reinstall the pack, or build it with "
                "python -m core.lab.pretrain (see README, Likeness lab)"
            )
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        check_diffusers_folder(path)
    elif not path.is_file():
        raise InputError(
            f"model: '{spec}' is not a built-in name, a folder or a file; use 'tiny', a diffusers folder, "
            "or a checkpoint from ComfyUI's models/checkpoints"
        )


def load_model(spec: str, device: torch.device | None = None, prediction_type: str | None = None) -> Model:
    """A model from 'tiny' (or tiny-sd1/tiny-sd2/tiny-sdxl), 'lab', a diffusers folder, or a .safetensors/.ckpt file.

    prediction_type (epsilon | v_prediction) overrides what the model's files say; None keeps (or detects) it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InputError(f"prediction type: '{prediction_type}' is not known; use {' or '.join(PREDICTION_TYPES)}")
    device = device or resolve_device()
    check_model_spec(spec)
    path = Path(spec).expanduser()
    if spec in TINY_FAMILIES:
        family = TINY_FAMILIES[spec]
        parts = tiny_components(family)
        if prediction_type:
            parts["scheduler"] = type(parts["scheduler"]).from_config(parts["scheduler"].config, prediction_type=prediction_type)
        return model_from_components(family, place_components(parts, device, torch.float32), name=spec)
    if spec == LAB_NAME:
        path = LAB_FOLDER
    if path.is_dir():
        return load_diffusers_folder(path, device, prediction_type)
    from .checkpoint import load_single_file

    return load_single_file(path, device, compute_dtype(device), prediction_type=prediction_type)


def native_resolution(family: str, prediction_type: str = "epsilon") -> int:
    """The size a family was trained at: SD1.x 512, SD2.x 512 (eps) or 768 (v-prediction), SDXL 1024."""
    if family == "sd2" and prediction_type == "v_prediction":
        return SD2_V_RESOLUTION
    return NATIVE_RESOLUTION.get(family, 512)


def default_templates(model: Model) -> str | None:
    """The training captions a model wants instead of the preset's: the lab model's own ('lab'); None elsewhere."""
    return "lab" if model.name == LAB_NAME else None


def default_resolution(model: Model) -> int:
    """The resolution a model was trained at (tiny models: 64, the lab model: 32)."""
    if model.name.startswith("tiny"):
        return TINY_RESOLUTION
    if model.name == LAB_NAME:
        return LAB_RESOLUTION
    return native_resolution(model.family, model.denoiser.prediction_type)
