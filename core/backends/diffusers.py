"""The diffusers backend: transformers CLIP text encoders and a diffusers UNet/VAE/scheduler behind the core protocols."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from ..acceleration import CompileTimer, compiled_forward
from ..checkpointing import diffusers_unet_blocks, gradient_checkpointing
from ..errors import InputError
from ..prompts import PromptCache, in_vocabulary
from ..protocols import Conditioning, EncodedText

# Conditioning layer per family (METHODS.md 0.2): the last layer after final LayerNorm, or the raw penultimate one.
LAYER_FINAL_LN = "final_ln"
LAYER_PENULTIMATE = "penultimate"


class _Stop(Exception):
    """Raised by a hook to end a text encoder's forward once the hidden state it needs has been seen."""


def _encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer layers of a transformers CLIP text model, with or without projection, in any layout."""
    inner = model
    while hasattr(inner, "text_model"):
        inner = inner.text_model
    return inner.encoder.layers


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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the encoder computes in."""
        return self.token_table().dtype

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

    def _splice(self, slots: torch.Tensor, rows: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
        """A hook making the token-embedding output at each slot (index >= 0) the identity row of that index."""

        def replace(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            # Every position gathers a row (index -1 reads row 0, which torch.where then drops): one gather and
            # one select, no mask count read back. The cast to the compute dtype is differentiable, so the gradient
            # reaches the float32 rows.
            source = rows.to(output.dtype)[slots.clamp_min(0)]
            return torch.where((slots >= 0).unsqueeze(-1), source, output)

        return self.model.get_input_embeddings().register_forward_hook(replace)

    def _penultimate(self, captured: list[torch.Tensor], stop: bool) -> torch.utils.hooks.RemovableHandle:
        """A hook keeping the last layer's input (the penultimate hidden state); with stop, the forward ends there."""

        def grab(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            if stop:
                raise _Stop

        return _encoder_layers(self.model)[-1].register_forward_pre_hook(grab, with_kwargs=True)

    def encode(self, prompts: Sequence[str], rows: torch.Tensor | None) -> EncodedText:
        """Encode prompts with rows spliced at SLOT, at the family's conditioning layer."""
        prompts = list(prompts)
        n_rows = 0 if rows is None else int(rows.shape[0])
        device = self.token_table().device
        input_ids, slots = self.prompts.spliced(prompts, n_rows, device)
        handles = []
        if rows is not None and self.prompts.has_rows(prompts, n_rows):
            handles.append(self._splice(slots, rows.to(device)))
        captured: list[torch.Tensor] = []
        if self.layer == LAYER_PENULTIMATE:  # only clip_g's pooled output needs the last layer and the final LayerNorm
            handles.append(self._penultimate(captured, stop=not self.projected_pooled))
        out = None
        try:
            out = self.model(input_ids)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        hidden = captured[0] if self.layer == LAYER_PENULTIMATE else out.last_hidden_state
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
        self._schedule: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._time_ids: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def checkpointing(self) -> AbstractContextManager[None]:
        """While active, the UNet's layers recompute their activations in backward instead of keeping them."""
        return gradient_checkpointing(diffusers_unet_blocks(self.unet))

    def compiled(self, timer: CompileTimer) -> AbstractContextManager[None]:
        """While active, the UNet's forward is torch.compile'd (eager again on any failure)."""
        return compiled_forward(self.unet, timer)

    def memory_modules(self) -> list[torch.nn.Module]:
        """The modules whose weights the run keeps on the device (for the free-memory count)."""
        return [self.unet, self.vae]

    @property
    def device(self) -> torch.device:
        """Where the UNet lives."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet computes in."""
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latent mean and std of images in [-1, 1]."""
        vae_param = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(vae_param.device, vae_param.dtype)).latent_dist
        return (dist.mean.float() * self.scaling_factor, dist.std.float() * self.scaling_factor)

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t), shaped to broadcast over like; the float32 tables go to a device once."""
        if like.device not in self._schedule:
            abar = self.scheduler.alphas_cumprod.to(torch.float32)
            self._schedule[like.device] = (abar.sqrt().to(like.device), (1 - abar).sqrt().to(like.device))
        signal, noise = self._schedule[like.device]
        shape = (-1,) + (1,) * (like.ndim - 1)
        at = timesteps.to(like.device)
        return signal[at].view(shape), noise[at].view(shape)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, as diffusers' DDPMScheduler.add_noise."""
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise for epsilon models; velocity sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 for v-prediction models."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            signal, sigma = self._coefficients(timesteps, latents)
            return signal * noise - sigma * latents
        raise InputError(f"model: prediction type '{self.prediction_type}' is not supported; use an epsilon or v model")

    def _size_ids(self, noisy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's (original size, crop, target size) ids for uncropped images at this latent size, made once."""
        height, width = (int(s) * self.vae_scale for s in noisy.shape[-2:])
        key = (height, width, noisy.device, dtype)
        if key not in self._time_ids:
            self._time_ids[key] = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).to(noisy.device)
        return self._time_ids[key].expand(noisy.shape[0], -1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction in float32; SDXL also gets the pooled vector and size conditioning."""
        dtype = self.dtype
        extra = None
        if self.family == "sdxl":
            extra = {"text_embeds": cond.pooled.to(dtype), "time_ids": self._size_ids(noisy, dtype)}
        out = self.unet(
            noisy.to(dtype), timesteps, encoder_hidden_states=cond.context.to(dtype), added_cond_kwargs=extra
        )
        return out.sample.float()


def place_components(parts: dict[str, object], device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """Freeze every module and put it in dtype on device, text encoders too; SDXL's VAE stays float32 under fp16."""
    for name, part in parts.items():
        if not isinstance(part, torch.nn.Module):
            continue
        part.eval().requires_grad_(False)
        target = dtype
        if name == "vae" and dtype == torch.float16 and getattr(part.config, "force_upcast", False):
            target = torch.float32  # the SDXL VAE overflows in float16
        if next(part.parameters()).dtype != target:
            part.to(dtype=target)
        part.to(device=device)
    return parts
