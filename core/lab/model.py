"""The lab model: a small SD1-family text-to-image model (CLIP text encoder with the real vocabulary, UNet, VAE).

Sizes (one place: LabSpec): 32 px pictures; an AutoencoderKL with two levels (32, 64 channels) to 16 x 16 x 4
latents; a UNet with channels (64, 128), cross-attention at both levels and in the middle, head size 32; a CLIP
text transformer of width 64, 3 layers, 4 heads, the real 49,408-entry vocabulary. The pack pretrains it itself on
the lab's world (core.lab.pretrain) and ships the weights in fp16 as a diffusers folder (core/lab/data/lab_model),
which core.models loads like any other diffusers folder (`--model lab`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..vocab import load_clip_tokenizer

VOCAB_SIZE = 49408
MODEL_FOLDER = Path(__file__).parent / "data" / "lab_model"
NAMES_FILE = "celebrity_names.txt"  # the names Cross-Init averages for a model folder (core.models reads it)
MARKER = "lab.json"  # written into the folder beside model_index.json: the recipe, and that this is the lab model


@dataclass(frozen=True)
class LabSpec:
    """Every size of the lab model, and its noise schedule."""

    resolution: int = 32
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 1
    head_size: int = 32
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4
    norm_groups: int = 16
    prediction_type: str = "v_prediction"  # the UNet's output; v, because a zero-terminal-SNR schedule needs it
    zero_terminal_snr: bool = True  # the last timestep is pure noise (Lin et al. 2023), sampled with trailing spacing

    def __post_init__(self) -> None:
        """Refuse a schedule the lab cannot train: pure noise at the last step has no epsilon-prediction target."""
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type: '{self.prediction_type}' is not epsilon or v_prediction")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr: needs prediction_type v_prediction (epsilon is undefined at SNR 0)")

    @property
    def latent_size(self) -> int:
        """The latent side: one halving per VAE level after the first."""
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


def text_encoder(spec: LabSpec) -> torch.nn.Module:
    """The CLIP text transformer (SD1's layout: quick GELU, final LayerNorm output, 77 positions)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.text_width,
        intermediate_size=4 * spec.text_width,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        projection_dim=spec.text_width,
    )
    return CLIPTextModel(config)


def vae(spec: LabSpec, scaling_factor: float = 1.0) -> torch.nn.Module:
    """The AutoencoderKL: resolution px RGB to latent_size^2 x latent_channels."""
    from diffusers import AutoencoderKL

    levels = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=spec.latent_channels,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=spec.norm_groups,
        sample_size=spec.resolution,
        scaling_factor=scaling_factor,
    )


def unet(spec: LabSpec) -> torch.nn.Module:
    """The UNet2DConditionModel with cross-attention at every level (SD1 names the head count attention_head_dim)."""
    from diffusers import UNet2DConditionModel

    levels = len(spec.unet_channels)
    return UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=spec.text_width,
        attention_head_dim=tuple(c // spec.head_size for c in spec.unet_channels),
        norm_num_groups=spec.norm_groups,
    )


def scheduler(spec: LabSpec = LabSpec()):  # noqa: ANN201 - diffusers type
    """SD1's scaled-linear betas 0.00085..0.012 over 1000 steps; with zero_terminal_snr rescaled so the last step is
    pure noise (and sampled from there: trailing spacing), else SD1's own schedule (leading spacing).

    Why: on SD1's schedule the last step keeps sqrt(abar) = 0.07 of the picture, and at 16 x 16 latents a region's
    colour (hair, say) still shows through the noise there, so the model never needs the caption for it and, when
    sampling from pure noise, reads it from the noise instead (measured: hair colour followed the caption at chance).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=spec.prediction_type,
        rescale_betas_zero_snr=spec.zero_terminal_snr,
        timestep_spacing="trailing" if spec.zero_terminal_snr else "leading",
        clip_sample=False,
    )


def build_components(spec: LabSpec = LabSpec(), seed: int = 0) -> dict[str, object]:
    """Fresh random-weight components, the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {
            "text_encoder": text_encoder(spec),
            "tokenizer": load_clip_tokenizer(),
            "unet": unet(spec),
            "vae": vae(spec),
            "scheduler": scheduler(spec),
        }


def parameter_counts(parts: dict[str, object]) -> dict[str, int]:
    """Parameters per module."""
    return {
        name: sum(p.numel() for p in part.parameters())
        for name, part in parts.items()
        if isinstance(part, torch.nn.Module)
    }


def save_folder(
    parts: dict[str, object],
    folder: Path,
    recipe: dict,
    names: Sequence[str] = (),
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write parts as a diffusers folder (safetensors, dtype) with the recipe in lab.json and the world's famous names
    in celebrity_names.txt; atomic: a temporary folder is renamed into place (the caller decides on replacing one)."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.0"}
    for name in ("text_encoder", "unet", "vae"):
        module = parts[name]
        original = next(module.parameters()).dtype
        module.to(dtype)
        try:
            module.save_pretrained(tmp / name, safe_serialization=True)
        finally:
            module.to(original)
        library = "transformers" if name == "text_encoder" else "diffusers"
        index[name] = [library, type(module).__name__]
    parts["scheduler"].save_pretrained(tmp / "scheduler")
    index["scheduler"] = ["diffusers", type(parts["scheduler"]).__name__]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")
    (tmp / MARKER).write_text(json.dumps(recipe, indent=1) + "\n")
    if names:
        (tmp / NAMES_FILE).write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    old = folder.with_name(folder.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)  # a crash from here on leaves the old folder beside, never no model at all
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def is_lab_folder(folder: Path) -> bool:
    """Whether a diffusers folder is the lab model (it carries lab.json)."""
    return (Path(folder) / MARKER).is_file()


def spec_dict(spec: LabSpec) -> dict:
    """The spec as plain JSON values."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}
