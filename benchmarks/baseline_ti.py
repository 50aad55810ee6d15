"""A baseline Textual Inversion loop with the semantics of diffusers' example trainer, written for this repository.

What it does, step for step, is what `examples/textual_inversion/textual_inversion.py` (diffusers @000280f,
METHODS.md 1.3) does with `accelerate launch`, one process, gradient accumulation 1, constant learning rate:

* set-up: the placeholder token and `<token>_1 ... <token>_{n-1}` are added to the tokenizer, the text encoder's
  token-embedding table is resized to `len(tokenizer)` and the new rows are copies of the initializer word's row;
  the text encoder stays float32 (it is what is trained), only its token-embedding table requires grad, and the
  WHOLE table is given to `torch.optim.AdamW` (betas 0.9/0.999, weight decay 1e-2, eps 1e-8). A float32 copy of
  the table is kept to restore from.
* `--mixed_precision no|fp16|bf16`: the UNet and the VAE get their *weights* cast to the weight dtype (the example's
  `unet.to(device, dtype=weight_dtype)`, `vae.to(...)`; they are not given to `accelerator.prepare`, so they run in
  that dtype without autocast). The text encoder is prepared, so accelerate runs its forward under
  `torch.autocast(device, weight_dtype)` and returns float32 outputs; with fp16 accelerate's `GradScaler` scales the
  loss, unscales before the step and skips steps with inf/nan gradients. Off ("no"), everything is float32 and TF32
  stays as torch's default (the example's `--allow_tf32` is off).
* every step: a batch from the dataset (per sample a shuffled image, a horizontal flip with p 0.5, a template
  formatted with the placeholder tokens, tokenized to 77 ids with padding), the VAE encodes the pixels
  (`latent_dist.sample() * scaling_factor`), noise `randn_like`, integer timesteps uniform in [0, 1000), the DDPM
  scheduler's `add_noise`, the text encoder's output `[0]` cast to the weight dtype, the UNet, MSE in float32 against
  the noise (or the velocity for v-prediction), backward, `optimizer.step()`, `zero_grad()`, then every row of the table
  outside the placeholder range is written back from the float32 copy, and `loss.item()` for the progress bar.
* SDXL (the layout of diffusers' `textual_inversion_sdxl.py`): two tokenizers and text encoders, both get the tokens;
  the context is both encoders' penultimate hidden states joined, the pooled vector is the second encoder's projected
  output, the size ids are (res, res, 0, 0, res, res). Both tables are in the one AdamW and restored, as the pack
  trains rows for both encoders (README_sdxl: "Training of both text encoders is supported"); the script's version at
  01db9ac optimises only the first encoder's table.

Not copied from the example: image files, PIL resizing and the DataLoader (the images are a tensor in [-1, 1] at the
training resolution, which only makes the baseline faster), logging, saving, validation. The modules given to
`BaselineTI` are used as they are: pass UNet/VAE already in the weight dtype (`cast_copy`) and text encoders/tokenizers
the baseline may change (it deep-copies them itself).
"""

from __future__ import annotations

import copy
import inspect
import random
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import core
from core.tiny import TINY_FAMILIES, tiny_components
from core.vocab import load_clip_tokenizer

CONFIG_ROOT = Path(core.__file__).resolve().parent / "configs"  # the real architectures (core/configs/<family>)
MIXED_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ADAMW = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}  # the example's argparse defaults


def family_of(name: str) -> str:
    """sd1 / sd2 / sdxl for a model name: tiny, tiny-sd1, tiny-sd2, tiny-sdxl, or a folder of core/configs."""
    if name in TINY_FAMILIES:
        return TINY_FAMILIES[name]
    if not (CONFIG_ROOT / name).is_dir():
        known = ", ".join(sorted([*TINY_FAMILIES, *(p.name for p in CONFIG_ROOT.iterdir() if p.is_dir())]))
        raise ValueError(f"model: '{name}' is not one of {known}")
    return "sd2" if name.startswith("sd2") else name


def random_components(name: str, seed: int = 0, device: torch.device | str | None = None) -> dict[str, object]:
    """Random-weight float32 diffusers components of a family, built from its config (nothing is downloaded).

    Real architectures come from core/configs/<name> via from_config (built directly on `device`); tiny-* are
    core.tiny's. Keys as core.tiny.tiny_components: unet, vae, scheduler, text_encoder, tokenizer (+ _2 for SDXL).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = family_of(name)
    if name in TINY_FAMILIES:
        parts = tiny_components(family, seed)
        if device is not None:
            for part in parts.values():
                if isinstance(part, torch.nn.Module):
                    part.to(device)
        return parts
    folder = CONFIG_ROOT / name
    place = torch.device(device) if device is not None else nullcontext()
    with torch.random.fork_rng(devices=[]), place:
        torch.manual_seed(seed)
        parts: dict[str, object] = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet"))),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae"))),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_json_file(str(folder / "text_encoder" / "config.json"))),
        }
        if family == "sdxl":
            config = CLIPTextConfig.from_json_file(str(folder / "text_encoder_2" / "config.json"))
            parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
    parts["scheduler"] = DDPMScheduler.from_config(DDPMScheduler.load_config(str(folder / "scheduler")))
    parts["tokenizer"] = load_clip_tokenizer(pad_token="!" if family == "sd2" else "<|endoftext|>")
    if family == "sdxl":
        parts["tokenizer_2"] = load_clip_tokenizer(pad_token="!")
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.eval().requires_grad_(False)
    return parts


def cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a frozen module with floating parameters/buffers in dtype; no second float32 copy is made on the way.

    Where dtype is the module's own the copy shares the tensors (frozen weights, so nothing writes to them) but has
    its own Parameter objects, so a later `.to()` of either module leaves the other as it was.
    """
    memo: dict[int, object] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        data = tensor.detach()
        data = data.to(dtype) if data.is_floating_point() else data
        memo[id(tensor)] = torch.nn.Parameter(data, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else data
    return copy.deepcopy(module, memo)


def _autocast(device: torch.device, dtype: torch.dtype):  # noqa: ANN202 - a context manager
    """What accelerate wraps a prepared model's forward in for --mixed_precision fp16/bf16 (nothing for 'no')."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def tf32(allowed: bool):  # noqa: ANN201 - a context manager
    """torch.backends.cuda.matmul.allow_tf32 set for the block (the example's --allow_tf32), put back after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _resize(encoder: torch.nn.Module, size: int) -> None:
    """resize_token_embeddings as the example calls it; the new rows are overwritten with the initializer's row next,
    so transformers' mean/covariance init of new rows (4.46+, not in the example's time) is turned off."""
    if "mean_resizing" in inspect.signature(encoder.resize_token_embeddings).parameters:
        encoder.resize_token_embeddings(size, mean_resizing=False)
    else:
        encoder.resize_token_embeddings(size)


class BaselineTI:
    """The diffusers Textual Inversion example's training step (see the module docstring), one call per step."""

    def __init__(
        self,
        family: str,
        parts: dict[str, object],
        images: torch.Tensor,
        templates: Sequence[str],
        *,
        mixed_precision: str = "no",
        placeholder: str = "<baseline>",
        initializer: str = "person",
        num_vectors: int = 1,
        batch_size: int = 8,
        learning_rate: float = 5e-3,
        seed: int = 0,
        allow_tf32: bool = False,
    ) -> None:
        """parts: components as random_components gives them; UNet and VAE must already be in the weight dtype."""
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: '{mixed_precision}'; use {', '.join(MIXED_PRECISION)}")
        self.family = family
        self.mixed_precision = mixed_precision
        self.weight_dtype = MIXED_PRECISION[mixed_precision]
        self.unet, self.vae = parts["unet"], parts["vae"]
        self.device = next(self.unet.parameters()).device
        for name, module in (("unet", self.unet), ("vae", self.vae)):
            if next(module.parameters()).dtype != self.weight_dtype:
                raise ValueError(f"{name}: pass it in {self.weight_dtype} (cast_copy) for --mixed_precision {mixed_precision}")
        self.scheduler = copy.deepcopy(parts["scheduler"])
        self.images = images
        self.templates = list(templates)
        self.batch_size = batch_size
        self.allow_tf32 = allow_tf32
        self.rng = random.Random(seed)  # the DataLoader's shuffle, the flip and the template choice
        self.steps_done = 0
        suffixes = ("", "_2") if family == "sdxl" else ("",)
        self.tokenizers = [copy.deepcopy(parts[f"tokenizer{s}"]) for s in suffixes]
        self.text_encoders = [copy.deepcopy(parts[f"text_encoder{s}"]).to(self.device, torch.float32) for s in suffixes]
        tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]
        self.placeholder_ids: list[list[int]] = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            if tokenizer.add_tokens(tokens) != num_vectors:
                raise ValueError(f"placeholder: the tokenizer already has '{placeholder}'; pick another name")
            init_ids = tokenizer.encode(initializer, add_special_tokens=False)
            if len(init_ids) != 1:
                raise ValueError(f"initializer: '{initializer}' is {len(init_ids)} tokens; it must be one")
            ids = tokenizer.convert_tokens_to_ids(tokens)
            _resize(encoder, len(tokenizer))
            table = encoder.get_input_embeddings().weight
            with torch.no_grad():
                for token_id in ids:
                    table[token_id] = table[init_ids[0]].clone()
            encoder.requires_grad_(False)  # the example freezes encoder layers, final LayerNorm, position embedding
            encoder.get_input_embeddings().requires_grad_(True)
            encoder.train()  # text_encoder.train() every epoch (CLIP has no dropout)
            self.placeholder_ids.append(ids)
        self.slot_text = " ".join(self.tokenizers[0].convert_ids_to_tokens(self.placeholder_ids[0]))
        self.tables = [enc.get_input_embeddings().weight for enc in self.text_encoders]
        self.original_tables = [t.detach().clone() for t in self.tables]
        self.optimizer = torch.optim.AdamW(self.tables, lr=learning_rate, **ADAMW)
        fp16 = self.weight_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.vae_calls = 0  # batches the VAE encoded (once per step, as the example)

    def _batch(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The example's collated batch: pixel values (B, 3, H, W) on the device and 77 ids per tokenizer."""
        n = self.images.shape[0]
        pixels, texts = [], []
        for _ in range(self.batch_size):
            image = self.images[self.rng.randrange(n)]
            pixels.append(image.flip(-1) if self.rng.random() < 0.5 else image)
            texts.append(self.rng.choice(self.templates).replace("{}", self.slot_text, 1))
        ids = []
        for tokenizer in self.tokenizers:  # the dataset tokenizes each sample in __getitem__
            rows = [
                tokenizer(t, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
                for t in texts
            ]
            ids.append(torch.stack(rows).to(self.device))
        return torch.stack(pixels).to(self.device), ids

    def _context(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, dict | None]:
        """Encoder hidden states (in the weight dtype) and, for SDXL, the added conditioning."""
        with _autocast(self.device, self.weight_dtype):
            outputs = [enc(i, output_hidden_states=self.family == "sdxl") for enc, i in zip(self.text_encoders, ids)]
        if self.family != "sdxl":
            return outputs[0][0].float().to(self.weight_dtype), None  # accelerate returns fp32 outputs
        context = torch.cat([o.hidden_states[-2].float() for o in outputs], dim=-1).to(self.weight_dtype)
        res = self.images.shape[-1]
        time_ids = torch.tensor([[res, res, 0, 0, res, res]] * ids[0].shape[0], device=self.device, dtype=self.weight_dtype)
        return context, {"text_embeds": outputs[1][0].float(), "time_ids": time_ids}

    def step(self) -> float:
        """One training step; returns loss.item() as the example's progress bar reads it."""
        pixel_values, ids = self._batch()
        with tf32(self.allow_tf32):
            latents = self.vae.encode(pixel_values.to(self.weight_dtype)).latent_dist.sample().detach()
            self.vae_calls += 1
            latents = latents * self.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
            noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
            context, added = self._context(ids)
            kwargs = {} if added is None else {"added_cond_kwargs": added}
            model_pred = self.unet(noisy_latents, timesteps, context, **kwargs).sample
            if self.scheduler.config.prediction_type == "epsilon":
                target = noise
            else:
                target = self.scheduler.get_velocity(latents, noise, timesteps)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            if self.scaler is None:
                loss.backward()
                self.optimizer.step()
            else:  # accelerator.backward + AcceleratedOptimizer.step under fp16
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.optimizer.zero_grad()
            self._restore_other_rows()
        self.steps_done += 1
        return loss.detach().item()

    def _restore_other_rows(self) -> None:
        """Every row outside min..max of the placeholder ids back to its original value (a fresh mask each step)."""
        for table, original, ids, tokenizer in zip(self.tables, self.original_tables, self.placeholder_ids, self.tokenizers):
            keep = torch.ones((len(tokenizer),), dtype=torch.bool)
            keep[min(ids) : max(ids) + 1] = False
            with torch.no_grad():
                table[keep] = original[keep]
