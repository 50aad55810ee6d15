"""Built-in random-weight models of the real SD1.x, SD2.x and SDXL architectures at reduced width, for tests and demos."""

from __future__ import annotations

import torch

from .backends.diffusers import LAYER_FINAL_LN, LAYER_PENULTIMATE, DiffusersDenoiser, DiffusersTextEncoder
from .protocols import Model
from .vocab import load_clip_tokenizer

TINY_FAMILIES = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
VOCAB_SIZE = 49408


def _text_model(width: int, layers: int, act: str, projection_dim: int | None = None) -> torch.nn.Module:
    """A CLIP text transformer with the real vocabulary size and a small width."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        projection_dim=projection_dim or width,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def _vae(scaling_factor: float) -> torch.nn.Module:
    """An AutoencoderKL with the real 8x downsampling and 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _unet(context_width: int, sdxl_pooled: int | None = None, linear_projection: bool = False) -> torch.nn.Module:
    """A two-level UNet2DConditionModel; SDXL adds the text_time embedding."""
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl_pooled is not None:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": sdxl_pooled + 6 * 8,
        }
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context_width,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=linear_projection,
        **extra,
    )


def _scheduler(prediction_type: str):  # noqa: ANN202 - diffusers type
    """The SD training schedule: scaled-linear betas over 1000 steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def _mark_v_prediction(unet: torch.nn.Module) -> torch.nn.Module:
    """Give the last up-block attention's first norm a spread bias, as trained SD2 v models have (ComfyUI's v test)."""
    norm = unet.up_blocks[-1].attentions[-1].transformer_blocks[0].norm1
    with torch.no_grad():
        norm.bias.normal_(0.0, 0.2)
    return unet


def tiny_components(family: str, seed: int = 0) -> dict[str, object]:
    """Random-weight diffusers components (unet, vae, scheduler, text encoders, tokenizers) of one family."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd1":
            parts = {
                "text_encoder": _text_model(32, 2, "quick_gelu"),
                "tokenizer": load_clip_tokenizer(),
                "unet": _unet(32),
                "vae": _vae(0.18215),
                "scheduler": _scheduler("epsilon"),
            }
        elif family == "sd2":
            parts = {
                "text_encoder": _text_model(48, 2, "gelu"),
                "tokenizer": load_clip_tokenizer(pad_token="!"),
                "unet": _mark_v_prediction(_unet(48, linear_projection=True)),
                "vae": _vae(0.18215),
                "scheduler": _scheduler("v_prediction"),
            }
        elif family == "sdxl":
            parts = {
                "text_encoder": _text_model(32, 3, "quick_gelu"),
                "tokenizer": load_clip_tokenizer(),
                "text_encoder_2": _text_model(64, 3, "gelu", projection_dim=32),
                "tokenizer_2": load_clip_tokenizer(pad_token="!"),
                "unet": _unet(96, sdxl_pooled=32, linear_projection=True),
                "vae": _vae(0.13025),
                "scheduler": _scheduler("epsilon"),
            }
        else:
            raise ValueError(f"tiny model: unknown family '{family}'; use sd1, sd2 or sdxl")
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.eval().requires_grad_(False)
    return parts


def model_from_components(family: str, parts: dict[str, object], name: str = "") -> Model:
    """Wrap diffusers components of a family in the core protocols, with each family's conditioning layer."""
    if family == "sdxl":
        encoders = [
            DiffusersTextEncoder("clip_l", parts["tokenizer"], parts["text_encoder"], LAYER_PENULTIMATE),
            DiffusersTextEncoder("clip_g", parts["tokenizer_2"], parts["text_encoder_2"], LAYER_PENULTIMATE, True),
        ]
    else:
        key = "clip_l" if family == "sd1" else "clip_h"
        encoders = [DiffusersTextEncoder(key, parts["tokenizer"], parts["text_encoder"], LAYER_FINAL_LN)]
    denoiser = DiffusersDenoiser(parts["unet"], parts["vae"], parts["scheduler"], family)
    return Model(family=family, encoders=encoders, denoiser=denoiser, name=name)


def tiny_model(family: str = "sd1", seed: int = 0) -> Model:
    """A ready tiny model of one family."""
    return model_from_components(family, tiny_components(family, seed), name=f"tiny-{family}")
