"""Single-file SD1.x / SD2.x / SDXL checkpoints (original LDM / ComfyUI key layout) loaded offline as a Model."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from .backends.diffusers import place_components
from .errors import InputError
from .models import PREDICTION_TYPES
from .pickles import PickleRefused, PickleUnreadable, load_weights_only
from .protocols import Model
from .tiny import model_from_components
from .vocab import load_clip_tokenizer

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_CLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_CLIP_G = "conditioner.embedders.1.model."
REFINER_CLIP_G = "conditioner.embedders.0.model."
log = logging.getLogger(__name__)
V_PRED_NORM_STD = 0.09  # ComfyUI's SD2 rule: v models have a wider norm1 bias in the last output attention block
_OUTPUT_NORM_BIAS = re.compile(r"model\.diffusion_model\.output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias")
V_PRED_MARKER = "v_pred"  # an empty tensor ComfyUI writes into v-prediction checkpoints it saves

# Where each family's text encoders keep their token table, for the width check against the UNet.
TOKEN_TABLES = {
    "sd1": (SD1_CLIP + "text_model.embeddings.token_embedding.weight",),
    "sd2": (SD2_CLIP + "token_embedding.weight",),
    "sdxl": (SDXL_CLIP_L + "text_model.embeddings.token_embedding.weight", SDXL_CLIP_G + "token_embedding.weight"),
}
SUPPORTED = (
    "supported: SD1.x, SD2.x and SDXL base single-file checkpoints with UNet, VAE and text encoder(s) in the "
    "original / ComfyUI key layout, as .safetensors (.ckpt/.pt only where torch.load(weights_only=True) reads them)"
)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a .ckpt/.pt read with torch's weights-only unpickler."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file; check the path or pick a file from the list")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise InputError(f"checkpoint {path}: '{suffix}' files are not read; {SUPPORTED}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error type for damaged headers
        raise InputError(f"checkpoint {path}: not a readable .safetensors file ({error}); re-download it") from error


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a pickle checkpoint, read without running any code it names."""
    try:
        loaded = load_weights_only(path)
    except PickleRefused as refusal:
        raise InputError(
            f"checkpoint {path}: refused; {refusal}, which could run code when read, and nothing in it was run; "
            "use a .safetensors version of this model"
        ) from None
    except PickleUnreadable as damage:
        raise InputError(f"checkpoint {path}: not a readable checkpoint ({damage}); re-download it") from None
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise InputError(f"checkpoint {path}: holds a {type(loaded).__name__}, not a state dict; {SUPPORTED}")
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception message, for short user-facing errors."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def normalize_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old SD1 files name CLIP keys without 'text_model.' (older transformers); add it where missing."""
    inner = SD1_CLIP + "text_model."
    old_roots = tuple(SD1_CLIP + root for root in ("embeddings.", "encoder.", "final_layer_norm."))
    return {(inner + k[len(SD1_CLIP) :] if k.startswith(old_roots) else k): v for k, v in state_dict.items()}


def _has_prefix(keys: Collection[str], prefix: str) -> bool:
    """Whether any key starts with prefix."""
    return any(k.startswith(prefix) for k in keys)


def _key_roots(keys: Collection[str], limit: int = 6) -> str:
    """A short list of the distinct two-part key prefixes, for error messages."""
    roots = sorted({".".join(k.split(".")[:2]) for k in keys})
    shown = ", ".join(f"'{r}'" for r in roots[:limit])
    return shown + (f" and {len(roots) - limit} more" if len(roots) > limit else "") if roots else "no tensors"


def _family_from_text_encoders(keys: Collection[str], source: str) -> str | None:
    """The family its text-encoder keys name, or None when there are none."""
    if _has_prefix(keys, SDXL_CLIP_G) and _has_prefix(keys, SDXL_CLIP_L):
        return "sdxl"
    if _has_prefix(keys, REFINER_CLIP_G):
        raise InputError(
            f"checkpoint {source}: is an SDXL refiner, which has no CLIP-L encoder and is not trained for prompts "
            "alone; use the SDXL base model or a fine-tune of it"
        )
    if _has_prefix(keys, SD2_CLIP):
        return "sd2"
    if _has_prefix(keys, SD1_CLIP):
        return "sd1"
    return None


def _check_parts(keys: Collection[str], source: str) -> None:
    """Raise unless the file holds a UNet and a VAE next to its text encoders."""
    missing = [name for name, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX)) if not _has_prefix(keys, prefix)]
    if missing:
        raise InputError(
            f"checkpoint {source}: has no {' and no '.join(missing)} weights; use a full checkpoint "
            f"(UNet + VAE + text encoders in one file); {SUPPORTED}"
        )


def _check_shapes(family: str, shapes: Mapping[str, tuple], source: str) -> None:
    """Raise when the UNet's input channels or cross-attention width do not fit the family's text encoders."""
    first = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if first is not None and len(first) == 4 and int(first[1]) != 4:
        raise InputError(
            f"checkpoint {source}: its UNet takes {int(first[1])} input channels (an inpainting or instruct model); "
            "use a plain text-to-image checkpoint"
        )
    widths = [shapes.get(key) for key in TOKEN_TABLES[family]]
    cross = next((s for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith(".attn2.to_k.weight")), None)
    if cross is None or any(w is None or len(w) != 2 for w in widths) or len(cross) != 2:
        return
    text_width = sum(int(w[1]) for w in widths)
    if text_width != int(cross[1]):
        raise InputError(
            f"checkpoint {source}: its {family} text encoders give {text_width}-wide context but the UNet takes "
            f"{int(cross[1])}; the file mixes model families or is damaged; use an unmodified checkpoint"
        )


def detect_family(state_dict_keys: Iterable[str], shapes: Mapping[str, tuple], source: str = "checkpoint") -> str:
    """'sd1', 'sd2' or 'sdxl' from LDM / ComfyUI checkpoint keys (SD2 v vs eps is not told here: see prediction_type_for)."""
    keys = set(state_dict_keys)
    family = _family_from_text_encoders(keys, source)
    if family is None:
        if _has_prefix(keys, UNET_PREFIX):
            raise InputError(
                f"checkpoint {source}: has UNet weights but no text encoder this pack knows (SD1 CLIP-L, SD2 OpenCLIP-H "
                f"or SDXL CLIP-L + OpenCLIP-bigG); {SUPPORTED}"
            )
        raise InputError(f"checkpoint {source}: unknown key layout (keys start with {_key_roots(keys)}); {SUPPORTED}")
    _check_parts(keys, source)
    _check_shapes(family, shapes, source)
    return family


def _name_hints_v(name: str) -> bool:
    """Whether a file name marks an SD2 768 / v-prediction model (e.g. v2-1_768-ema-pruned, 768-v-ema)."""
    lowered = name.lower()
    return "768" in lowered or any(tag in lowered for tag in ("v-pred", "vpred", "v_pred", "v-prediction"))


def _last_attention_norm_bias(checkpoint: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The first LayerNorm bias of the UNet's last output attention block (output_blocks.11.1 in a real SD2)."""
    found = {}
    for key, value in checkpoint.items():
        match = _OUTPUT_NORM_BIAS.fullmatch(key)
        if match is not None:
            found[int(match.group(1))] = value
    return found[max(found)] if found else None


def prediction_type_for(
    family: str, checkpoint: Mapping[str, torch.Tensor], name: str, requested: str | None = None
) -> tuple[str | None, str]:
    """(type, why): the requested one; else v for ComfyUI's 'v_pred' key; else, for SD2, ComfyUI's rule on the weights
    (the last output attention block's norm1 bias has std > 0.09 in v models); a '768'/'vpred' name only when the
    weights cannot tell. None means the shipped config's (epsilon)."""
    if requested is not None:
        if requested not in PREDICTION_TYPES:
            raise InputError(f"prediction_type: '{requested}' is not known; use one of {', '.join(PREDICTION_TYPES)}")
        return requested, "as requested"
    if V_PRED_MARKER in checkpoint:
        return "v_prediction", "from the checkpoint's v_pred marker"
    if family != "sd2":
        return None, "the family's default"
    bias = _last_attention_norm_bias(checkpoint)
    if bias is not None and bias.numel() > 1:
        spread = float(bias.float().std(unbiased=False))
        kind = "v_prediction" if spread > V_PRED_NORM_STD else "epsilon"
        return kind, f"from the weights (norm bias std {spread:.3f}, v above {V_PRED_NORM_STD}, as ComfyUI decides)"
    if _name_hints_v(name):
        return "v_prediction", "from the file name (the weights have no block to tell by)"
    return None, "the family's default"


def shipped_config_dir(family: str, prediction_type: str | None) -> Path:
    """The shipped diffusers config folder for a family; SD2 v-prediction uses the 768 (sd2_v) one."""
    name = "sd2_v" if family == "sd2" and prediction_type == "v_prediction" else family
    return CONFIG_ROOT / name


def _check_config_dir(folder: Path, family: str) -> None:
    """Raise unless the folder has the config files a family needs."""
    needed = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]
    if family == "sdxl":
        needed.append("text_encoder_2/config.json")
    missing = [rel for rel in needed if not (folder / rel).is_file()]
    if missing:
        raise InputError(
            f"config_dir {folder}: lacks {', '.join(missing)}; point it at a diffusers-layout config folder "
            f"for {family} or leave it empty to use the shipped one"
        )


@contextmanager
def _offline() -> Iterator[None]:
    """Within the block, Hugging Face libraries are told not to reach the network."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _DropDtypeWarning(logging.Filter):
    """Drops diffusers' 'modules ... should be kept in float32: []' warning, which it logs on every .to(dtype)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for that one warning."""
        return "should be kept in float32" not in record.getMessage()


@contextmanager
def _quiet_dtype_casts() -> Iterator[None]:
    """Within the block, diffusers' empty keep-in-float32 warning is not shown."""
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    drop = _DropDtypeWarning()
    diffusers_log.addFilter(drop)
    try:
        yield
    finally:
        diffusers_log.removeFilter(drop)


def _load_diffusers_model(
    cls: type, checkpoint: dict, folder: Path, subfolder: str, dtype: torch.dtype
) -> torch.nn.Module:
    """A diffusers model (UNet or VAE) from LDM weights via from_single_file, with its config from folder."""
    return cls.from_single_file(
        checkpoint, config=str(folder), subfolder=subfolder, local_files_only=True, torch_dtype=dtype
    )


def _load_text_encoder(cls: type, checkpoint: dict, folder: Path, subfolder: str) -> torch.nn.Module:
    """A transformers CLIP text model from LDM / OpenCLIP weights, with its config from folder, in float32."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    return create_diffusers_clip_model_from_ldm(
        cls, checkpoint, subfolder=subfolder, config=str(folder), torch_dtype=torch.float32, local_files_only=True
    )


def _load_scheduler(folder: Path, prediction_type: str | None):  # noqa: ANN202 - diffusers type
    """The DDPM training scheduler from the folder's schedule, with the prediction type overridden if given."""
    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(str(folder), subfolder="scheduler", local_files_only=True)
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    return DDPMScheduler.from_config(config, **overrides)


def _missing_weights(name: str, source: str, example: str | None = None) -> InputError:
    """The error for a component whose weights are not all in the file."""
    detail = f" (e.g. '{example}')" if example else ""
    return InputError(
        f"checkpoint {source}: some {name} weights are missing{detail}; the file is incomplete or not of the "
        "family its text encoders suggest; use a complete, unmodified checkpoint"
    )


def _check_loaded(module: torch.nn.Module, name: str, source: str) -> None:
    """Raise when some weights of a component were not in the file (they are left on the meta device)."""
    missing = [k for k, p in module.state_dict().items() if p.device.type == "meta"]
    if missing:
        raise _missing_weights(name, source, missing[0])


def _build_parts(
    family: str, checkpoint: dict, folder: Path, prediction_type: str | None, dtype: torch.dtype, source: str
) -> dict:
    """Every diffusers component of a family from one LDM state dict; read in float32, then placed in dtype."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    loaders = {
        "unet": lambda: _load_diffusers_model(UNet2DConditionModel, checkpoint, folder, "unet", dtype),
        "vae": lambda: _load_diffusers_model(AutoencoderKL, checkpoint, folder, "vae", dtype),
        "text_encoder": lambda: _load_text_encoder(CLIPTextModel, checkpoint, folder, "text_encoder"),
    }
    if family == "sdxl":
        loaders["text_encoder_2"] = lambda: _load_text_encoder(
            CLIPTextModelWithProjection, checkpoint, folder, "text_encoder_2"
        )
    parts: dict[str, object] = {}
    for name, load in loaders.items():
        try:
            module = load()
        except InputError:
            raise
        except (ValueError, KeyError, RuntimeError, TypeError) as error:
            if "meta tensor" in str(error):  # a weight the file lacks stayed on the meta device
                raise _missing_weights(name, source) from error
            raise InputError(
                f"checkpoint {source}: its {name} weights do not fit the {family} architecture "
                f"({_first_line(error)}); the file is damaged or mixes families; use an unmodified checkpoint"
            ) from error
        _check_loaded(module, name, source)
        parts[name] = module
    parts["scheduler"] = _load_scheduler(folder, prediction_type)
    parts["tokenizer"] = load_clip_tokenizer(pad_token="!" if family == "sd2" else "<|endoftext|>")
    if family == "sdxl":
        parts["tokenizer_2"] = load_clip_tokenizer(pad_token="!")
    return parts


def load_single_file(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    prediction_type: str | None = None,
    config_dir: Path | None = None,
) -> Model:
    """Load an SD1/SD2/SDXL single-file checkpoint offline as a Model, configs from config_dir or the shipped ones."""
    path = Path(path)
    source = str(path)
    if importlib.util.find_spec("accelerate") is None:  # without it diffusers fills missing weights with noise silently
        raise InputError(
            f"checkpoint {source}: loading single files needs the 'accelerate' package; pip install accelerate"
        )
    checkpoint = normalize_keys(read_state_dict(path))
    shapes = {k: tuple(v.shape) for k, v in checkpoint.items()}
    family = detect_family(checkpoint.keys(), shapes, source)
    prediction, why = prediction_type_for(family, checkpoint, path.stem, prediction_type)
    log.info("model: %s is %s, prediction type %s (%s)", path.name, family, prediction or "epsilon", why)
    folder = Path(config_dir) if config_dir is not None else shipped_config_dir(family, prediction)
    _check_config_dir(folder, family)
    with _offline(), _quiet_dtype_casts():
        parts = _build_parts(family, checkpoint, folder, prediction, dtype, source)
        del checkpoint
        place_components(parts, torch.device(device), dtype)
    return model_from_components(family, parts, name=path.stem)
