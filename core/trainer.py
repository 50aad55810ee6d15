"""One training loop for Textual Inversion and Cross Initialization: only the identity rows are optimised."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from . import __version__
from .cross_init import initial_rows
from .errors import InputError
from .identity import Identity
from .protocols import MAX_TOKENS, SLOT, Denoiser, Model, condition
from .templates import training_prompts


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; PRESETS hold the reference defaults of each method."""

    method: str = "cross_init"  # recorded in the file: textual_inversion | cross_init
    token: str = "<identity>"  # the placeholder name; must not be a word CLIP already knows
    n_tokens: int = 2  # vectors per identity; each takes one of the 75 prompt tokens
    steps: int = 320
    batch_size: int = 8
    learning_rate: float = 0.005
    scale_lr: bool = False  # multiply the learning rate by the batch size (the references' --scale_lr)
    weight_decay: float = 0.01  # AdamW decoupled decay on the identity rows, as the references apply it
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    reg_weight: float = 1e-5  # Cross-Init: weight of the non-squared L2 pull towards the initial rows
    init: str = "celebrity"  # celebrity (Cross-Init) | words (Cross-Init of init_text) | word (plain TI)
    init_text: str = ""
    templates: str = "face"  # face: "... face of {} person" (Cross-Init) | object: "a photo of a {}" (TI)
    flip_p: float = 0.5  # probability of a horizontal flip per sample
    resolution: int = 512
    seed: int = 0

    @property
    def effective_lr(self) -> float:
        """The learning rate AdamW runs with."""
        return self.learning_rate * (self.batch_size if self.scale_lr else 1)


PRESETS: dict[str, dict[str, object]] = {
    # diffusers' textual_inversion.py defaults (METHODS.md 1.3), with 'person' as the initializer word.
    "textual_inversion": {
        "method": "textual_inversion",
        "n_tokens": 1,
        "steps": 5000,
        "batch_size": 16,
        "learning_rate": 1e-4,
        "reg_weight": 0.0,
        "init": "word",
        "init_text": "person",
        "templates": "object",
    },
    # Cross Initialization's README command (METHODS.md 2.4): lr 0.000625 x batch 8 = 0.005.
    "cross_init": {
        "method": "cross_init",
        "n_tokens": 2,
        "steps": 320,
        "batch_size": 8,
        "learning_rate": 0.005,
        "reg_weight": 1e-5,
        "init": "celebrity",
        "templates": "face",
    },
    "cross_init_fast": {
        "method": "cross_init",
        "n_tokens": 2,
        "steps": 25,
        "batch_size": 8,
        "learning_rate": 0.005,
        "reg_weight": 1e-5,
        "init": "celebrity",
        "templates": "face",
    },
}


def preset_config(name: str, **overrides: object) -> TrainConfig:
    """A TrainConfig from a preset name, with overrides (None values ignored)."""
    if name not in PRESETS:
        raise InputError(f"preset: unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(**values)


@torch.no_grad()
def encode_latents(denoiser: Denoiser, images: torch.Tensor, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean/std of every image and, with flips, of its mirror, laid out [originals, mirrors]; once per run."""
    pixels = torch.cat([images, images.flip(-1)]) if flip else images
    parts = [denoiser.encode_pixels(chunk) for chunk in pixels.split(4)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@dataclass
class Batch:
    """One training batch: clean latents, noise, integer timesteps, and prompts with a SLOT."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompts: list[str]
    weights: torch.Tensor | None = None  # (B, 1, h, w) loss weights from the masks, or None for a plain mean


@dataclass
class TrainResult:
    """The learned identity, the loss per step, and why training stopped early ('' when it ran to the end)."""

    identity: Identity
    losses: list[float] = field(default_factory=list)
    stopped: str = ""


ProgressFn = Callable[[int, int, float], None]
OUT_OF_MEMORY = "out of memory"  # how TrainResult.stopped begins when a step ran out of GPU or CPU memory


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception from a step means the device (or the host) ran out of memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Trainer:
    """Holds the identity rows, their AdamW state, and the cached latents of the training images."""

    def __init__(
        self,
        model: Model,
        images: torch.Tensor,
        config: TrainConfig,
        init: Identity | None = None,
        masks: torch.Tensor | None = None,
        latents: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """masks: optional (N, 1, H, W) weights in [0, 1] at image size that focus the loss (e.g. on the face).

        latents: the (mean, std) that encode_latents gave for these images and config, when the caller encoded them
        already (ComfyUI does so before the UNet is loaded, so the VAE cannot evict it); else they are encoded here.
        """
        self.model = model
        self.config = config
        self.prompts = list(training_prompts(config.templates))
        self._validate(images, init)
        if init is not None:
            self.config = replace(config, n_tokens=init.n_tokens)
            start = {enc.key: init.rows_for(enc.key, enc.width) for enc in model.encoders}
        else:
            start = initial_rows(model, config.init, config.n_tokens, config.init_text)
        device = model.denoiser.device
        self.init_rows = {k: v.to(device) for k, v in start.items()}
        self.rows = {k: torch.nn.Parameter(v.clone()) for k, v in self.init_rows.items()}
        self.optimizer = torch.optim.AdamW(
            list(self.rows.values()),
            lr=self.config.effective_lr,
            betas=self.config.adam_betas,
            eps=self.config.adam_eps,
            weight_decay=self.config.weight_decay,
        )
        self.generator = torch.Generator().manual_seed(self.config.seed)
        if latents is None:
            latents = encode_latents(model.denoiser, images, self.config.flip_p > 0)
        self.latent_mean, self.latent_std = (part.to(device) for part in latents)
        expected = images.shape[0] * (2 if self.config.flip_p > 0 else 1)
        if self.latent_mean.shape[0] != expected:
            raise InputError(f"latents: got {self.latent_mean.shape[0]} for {images.shape[0]} images; encode them with encode_latents")
        self.latent_weights = None if masks is None else self._latent_weights(masks)
        self.steps_done = 0

    def _validate(self, images: torch.Tensor, init: Identity | None) -> None:
        """Check images, token name and vector count before any work is done."""
        cfg = self.config
        if images.ndim != 4 or images.shape[0] == 0:
            raise InputError("images: got 0 images; give at least one photo of the subject")
        for name, value in (("steps", cfg.steps), ("batch size", cfg.batch_size), ("tokens", cfg.n_tokens)):
            if int(value) < 1:
                raise InputError(f"{name}: got {value}; it must be at least 1")
        if not cfg.learning_rate > 0 or not math.isfinite(cfg.learning_rate):
            raise InputError(f"learning rate: got {cfg.learning_rate}; it must be a positive number such as 0.005")
        for enc in self.model.encoders:
            if enc.in_vocabulary(cfg.token):
                raise InputError(
                    f"token: '{cfg.token}' is already a word of the CLIP vocabulary, so prompts could not tell it "
                    f"apart; pick a new name such as '<{cfg.token.strip('<>')}-id>'"
                )
        n_tokens = init.n_tokens if init is not None else cfg.n_tokens
        longest = max(len(self.model.encoders[0].token_ids(p.replace(SLOT, " "))) for p in self.prompts)
        room = MAX_TOKENS - 2 - longest
        if n_tokens > room:
            raise InputError(
                f"tokens: {n_tokens} vectors do not fit; CLIP takes 75 prompt tokens and the longest training prompt "
                f"uses {longest}, leaving room for {room}; use at most {room}"
            )

    def _latent_weights(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks averaged down to latent size, laid out like the cached latents (originals, then mirrors)."""
        if masks.shape[0] != self.latent_mean.shape[0] // (2 if self.config.flip_p > 0 else 1):
            raise InputError(f"mask: got {masks.shape[0]} masks for the images; give one per image")
        small = F.interpolate(masks.float(), size=self.latent_mean.shape[-2:], mode="area")
        small = torch.cat([small, small.flip(-1)]) if self.config.flip_p > 0 else small
        return small.to(self.latent_mean.device)

    def sample_batch(self) -> Batch:
        """Draw images, flips, latent samples, noise, timesteps and templates from the run's seeded generator."""
        cfg, gen = self.config, self.generator
        n_images = self.latent_mean.shape[0] // (2 if cfg.flip_p > 0 else 1)
        index = torch.randint(0, n_images, (cfg.batch_size,), generator=gen)
        if cfg.flip_p > 0:
            index = index + n_images * (torch.rand(cfg.batch_size, generator=gen) < cfg.flip_p).long()
        mean, std = (
            self.latent_mean[index.to(self.latent_mean.device)],
            self.latent_std[index.to(self.latent_std.device)],
        )
        sample = torch.randn(mean.shape, generator=gen).to(mean.device)
        noise = torch.randn(mean.shape, generator=gen).to(mean.device)
        timesteps = torch.randint(0, self.model.denoiser.num_train_timesteps, (cfg.batch_size,), generator=gen)
        choice = torch.randint(0, len(self.prompts), (cfg.batch_size,), generator=gen).tolist()
        weights = None if self.latent_weights is None else self.latent_weights[index.to(self.latent_weights.device)]
        prompts = [self.prompts[i] for i in choice]
        return Batch(mean + std * sample, noise, timesteps.to(mean.device), prompts, weights)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Diffusion MSE (mask-weighted when masks were given) plus the Cross-Init regulariser mean_i ||v_i - v_init,i + 1e-6||."""
        den = self.model.denoiser
        cond = condition(self.model, batch.prompts, self.rows)
        noisy = den.add_noise(batch.latents, batch.noise, batch.timesteps)
        pred = den.predict(noisy, batch.timesteps, cond)
        error = (pred - den.target(batch.latents, batch.noise, batch.timesteps)) ** 2
        if batch.weights is None:
            loss = error.mean()
        else:  # a weighted mean: the masked region counts, the rest does not
            weights = batch.weights.expand_as(error)
            loss = (error * weights).sum() / weights.sum().clamp_min(1e-8)
        if self.config.reg_weight > 0:
            for key, rows in self.rows.items():
                loss = loss + self.config.reg_weight * F.pairwise_distance(rows, self.init_rows[key], p=2).mean()
        return loss

    def step(self, batch: Batch) -> float:
        """One optimiser step on a batch; returns the loss, and leaves the rows untouched if it is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        return value

    def _restore(self, snapshot: dict[str, torch.Tensor], step: int) -> None:
        """Put back rows saved before a step that did not finish cleanly."""
        with torch.no_grad():
            for key, value in snapshot.items():
                self.rows[key].copy_(value)
        self.steps_done = step

    def _free_after_out_of_memory(self) -> None:
        """Drop the failed step's gradients and cached blocks so the rows so far can still be saved."""
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def identity(self, partial: bool = False, **extra: object) -> Identity:
        """The current rows as an Identity with provenance metadata."""
        cfg = self.config
        meta = {
            "method": cfg.method,
            "base_family": self.model.family,
            "base_model": self.model.name,
            "steps": self.steps_done,
            "steps_planned": cfg.steps,
            "n_tokens": cfg.n_tokens,
            "init": cfg.init,
            "init_text": cfg.init_text,
            "seed": cfg.seed,
            "learning_rate": cfg.effective_lr,
            "batch_size": cfg.batch_size,
            "resolution": cfg.resolution,
            "reg_weight": cfg.reg_weight,
            "token": cfg.token,
            "partial": str(partial).lower(),
            "created_by": f"identity-tokens {__version__}",
        }
        return Identity({k: v.detach() for k, v in self.rows.items()}, {**meta, **extra})

    def run(self, on_step: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
        """Train for config.steps; Ctrl-C, a cancel, or a non-finite loss end it early with the last good rows."""
        losses: list[float] = []
        stopped = ""
        snapshot: dict[str, torch.Tensor] = {}
        snapshot_step = self.steps_done
        try:
            while self.steps_done < self.config.steps:
                if should_stop is not None and should_stop():
                    stopped = "cancelled"
                    break
                snapshot = {k: v.detach().clone() for k, v in self.rows.items()}
                snapshot_step = self.steps_done
                value = self.step(self.sample_batch())
                if not math.isfinite(value) or not all(bool(v.isfinite().all()) for v in self.rows.values()):
                    self._restore(snapshot, snapshot_step)
                    stopped = f"loss became {value} at step {snapshot_step + 1}"
                    break
                losses.append(value)
                if on_step is not None:
                    on_step(self.steps_done, self.config.steps, value)
        except KeyboardInterrupt:
            if snapshot and self.steps_done == snapshot_step:  # interrupted inside a step: its update may be half done
                self._restore(snapshot, snapshot_step)
            stopped = "interrupted"
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            self._free_after_out_of_memory()
            if snapshot:
                self._restore(snapshot, snapshot_step)
            stopped = (
                f"{OUT_OF_MEMORY} at step {self.steps_done + 1} (batch size {self.config.batch_size}, "
                f"{self.config.resolution} px)"
            )
        return TrainResult(self.identity(partial=bool(stopped), stopped=stopped), losses, stopped)
