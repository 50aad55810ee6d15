"""The diffusers backend: transformers CLIP text encoders and a diffusers UNet/VAE/scheduler behind the core protocols."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..errors import InputError
from ..prompts import PromptCache, in_vocabulary
from ..protocols import Conditioning, EncodedText

# Conditioning layer per family (METHODS.md 0.2): the last layer after final LayerNorm, or the raw penultimate one.
LAYER_FINAL_LN = "final_ln"
LAYER_PENULTIMATE = "penultimate"


class DiffusersTextEncoder:
    """A transformers CLIP text model whose input embeddings get identity rows spliced in by a forward hook."""

    def __init__(self, key: str, tokenizer, model: torch.nn.Module, layer: str, projected_pooled: bool = False) -> None:
        self.key = key
        self.tokenizer = tokenizer
        self.model = model
        self.layer = layer
        self.projected_pooled = projected_pooled
        self.width = int(model.get_input_embeddings().weight.shape[1])
        self.prompts = PromptCache(self)

    def token_ids(self, text: str) -> list[int]:
        """BPE ids of text, without BOS/EOS."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []

    def in_vocabulary(self, word: str) -> bool:
        """Whether word is one vocabulary entry already (as a whole word or a word piece)."""
        return in_vocabulary(self.tokenizer.get_vocab(), word)

    def token_table(self) -> torch.Tensor:
        """The frozen input token-embedding table."""
        return self.model.get_input_embeddings().weight

    def special_ids(self) -> tuple[int, int, int]:
        """(BOS, EOS, PAD) ids."""
        tok = self.tokenizer
        return int(tok.bos_token_id), int(tok.eos_token_id), int(tok.pad_token_id)

    @contextmanager
    def _spliced(self, mask: torch.Tensor, rows: torch.Tensor) -> Iterator[None]:
        """Within the block, token-embedding outputs at mask positions are the identity rows."""

        def replace(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            source = rows.to(output.dtype).repeat(output.shape[0], 1)
            return output.masked_scatter(mask.unsqueeze(-1), source)

        handle = self.model.get_input_embeddings().register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def encode(self, prompts: Sequence[str], rows: torch.Tensor | None) -> EncodedText:
        """Encode prompts with rows spliced at SLOT, at the family's conditioning layer."""
        n_rows = 0 if rows is None else int(rows.shape[0])
        device = self.model.get_input_embeddings().weight.device
        input_ids, mask = self.prompts.batch(list(prompts), n_rows, device)
        if rows is None or not bool(mask.any()):
            out = self.model(input_ids, output_hidden_states=True)
        else:
            with self._spliced(mask, rows.to(device)):
                out = self.model(input_ids, output_hidden_states=True)
        hidden = out.last_hidden_state if self.layer == LAYER_FINAL_LN else out.hidden_states[-2]
        pooled = out.text_embeds if self.projected_pooled else None
        return EncodedText(hidden=hidden, pooled=pooled)


class DiffusersDenoiser:
    """A diffusers UNet with its VAE and DDPM-style noise schedule."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module, scheduler, family: str) -> None:
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.family = family
        self.prediction_type = str(scheduler.config.prediction_type)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        """Where the UNet lives."""
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latent mean and std of images in [-1, 1]."""
        vae_param = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(vae_param.device, vae_param.dtype)).latent_dist
        return (dist.mean.float() * self.scaling_factor, dist.std.float() * self.scaling_factor)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t under the model's schedule."""
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise for epsilon models, velocity for v-prediction models."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise InputError(f"model: prediction type '{self.prediction_type}' is not supported; use an epsilon or v model")

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction; SDXL also gets the pooled vector and size conditioning."""
        dtype = next(self.unet.parameters()).dtype
        extra = None
        if self.family == "sdxl":
            height, width = (int(s) * self.vae_scale for s in noisy.shape[-2:])
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=noisy.device, dtype=dtype)
            extra = {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids.repeat(noisy.shape[0], 1)}
        out = self.unet(
            noisy.to(dtype), timesteps, encoder_hidden_states=cond.context.to(dtype), added_cond_kwargs=extra
        )
        return out.sample.float()


def place_components(parts: dict[str, object], device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """Freeze every module; UNet/VAE go to dtype on device, text encoders stay float32 (and SDXL's VAE in fp16)."""
    for name, part in parts.items():
        if not isinstance(part, torch.nn.Module):
            continue
        part.eval().requires_grad_(False)
        target = dtype if name in ("unet", "vae") else torch.float32
        if name == "vae" and dtype == torch.float16 and getattr(part.config, "force_upcast", False):
            target = torch.float32  # the SDXL VAE overflows in float16
        if next(part.parameters()).dtype != target:
            part.to(dtype=target)
        part.to(device=device)
    return parts
