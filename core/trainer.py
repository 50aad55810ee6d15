"""One training loop for Textual Inversion and Cross Initialization: only the identity rows are optimised."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from . import __version__
from .acceleration import CompileTimer
from .cross_init import initial_rows
from .errors import InputError
from .identity import Identity
from .memory import MEMORY_MODES, MemoryPlan, free_memory_bytes, select_memory_plan, training_estimator
from .precision import LossScaler, compute_dtype, fast_float32_matmuls, guarded_step, optimizer_options
from .protocols import MAX_TOKENS, SLOT, Conditioning, Denoiser, Model, distinct_prompts, encode_distinct
from .sefi import (
    AttentionTerm,
    FaceLoss,
    StagedRows,
    attention_snapshot,
    check_face_masks,
    check_reference_word,
    recorder_for,
)
from .stages import StageSchedule, check_stage_count
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
    seed: int = 0  # the same seed gives the same identity on the same device type (draws come from its generator)
    # Samples per forward/backward pass; 0 or None: the whole batch at once. Smaller needs less memory and gives the
    # same step (gradients are accumulated over the micro-batches), at some speed.
    micro_batch_size: int | None = None
    # float16 models only: the dynamic loss scale to start from (halved on overflow, doubled after 100 good steps);
    # 0 turns scaling off, which loses most of the gradient to float16 underflow. bfloat16 and float32 need none.
    fp16_loss_scale: float = 2.0**16
    # auto: on CUDA, estimate the peak (core.memory) and add gradient checkpointing, then micro-batches, only when the
    # default does not fit free memory; default: neither; checkpointing: always (about 30% slower, a fraction of the
    # activations); low: checkpointing + micro-batch 1 (the least memory, the slowest). The step is the same in all.
    memory: str = "auto"
    # torch.compile the UNet's forward (off by default): faster steps on a GPU after a compile of tens of seconds,
    # reported apart from the steps; any compile failure falls back to the eager UNet with a warning.
    compile: bool = False
    # The face-wise attention loss (SeFi-IDE-style, core.sefi): None for none. Its mask mode needs face_masks.
    face_loss: FaceLoss | None = None
    # Per-stage key/value tokens (SeFi-IDE-style): None for a plain identity; S stages split the timesteps by
    # floor(t*S/T), each with its own key and value rows. 5 is SeFi-IDE's. The result needs Apply Identity's MODEL.
    stages: int | None = None
    # Record where the identity token looks in each photo at the start and the end (TrainResult.attention).
    attention_maps: bool = True

    @property
    def effective_lr(self) -> float:
        """The learning rate AdamW runs with."""
        return self.learning_rate * (self.batch_size if self.scale_lr else 1)

    @property
    def micro_batch(self) -> int:
        """Samples per forward/backward pass: micro_batch_size, or the whole batch when it is 0, None or larger."""
        size = self.micro_batch_size or self.batch_size
        return min(int(size), self.batch_size)


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
    face_masks: torch.Tensor | None = None  # (B, 1, h, w) face masks for the attention loss's mask mode

    def part(self, start: int, stop: int) -> Batch:
        """Samples start..stop-1 as a batch of their own (views, no copies)."""
        weights = None if self.weights is None else self.weights[start:stop]
        faces = None if self.face_masks is None else self.face_masks[start:stop]
        return Batch(
            self.latents[start:stop], self.noise[start:stop], self.timesteps[start:stop], self.prompts[start:stop],
            weights, faces,
        )


@dataclass
class TrainResult:
    """The learned identity, the loss per step, why training stopped early ('' when it ran to the end), skipped steps."""

    identity: Identity
    losses: list[float] = field(default_factory=list)
    stopped: str = ""
    skipped: int = 0  # fp16 steps whose gradient overflowed: not applied, the loss scale halved, not counted as steps
    attention: AttentionMaps | None = None  # where the identity looked at the start and the end (config.attention_maps)


@dataclass
class AttentionMaps:
    """The identity token's attention over each training photo, (N, h, w), and with face masks the share inside them."""

    start: object  # numpy (N, h, w)
    end: object | None = None  # None when training stopped before the end snapshot could be taken
    inside_start: object | None = None  # numpy (N,) or None without masks
    inside_end: object | None = None
    end_step: int = 0


@dataclass
class _Queued:
    """A step handed to the device whose loss the host has not read yet."""

    number: int  # which step it is (1-based)
    before: dict[str, torch.Tensor]  # the rows before it: put back if it, or a step before it, must be undone
    loss: torch.Tensor | float | None = None  # None while its forward/backward has not returned
    applied: torch.Tensor | None = None  # device bool: the update went in (loss and gradient finite)


ProgressFn = Callable[[int, int, float], None]
log = logging.getLogger(__name__)
OUT_OF_MEMORY = "out of memory"  # how TrainResult.stopped begins when a step ran out of GPU or CPU memory
MAX_SKIPS_IN_A_ROW = 16  # fp16 overflows in a row (the loss scale down 2^16) before training gives up
PROMPT_SEED_SALT = 0x5EED_F00D  # the prompt draws use seed ^ salt, so they are not the image draws' twins


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception from a step means the device (or the host) ran out of memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Trainer:
    """Holds the identity rows, their AdamW state, and the cached latents of the training images.

    Precision: the rows and AdamW state are float32 whatever the model computes in; for a float16 model the loss is
    scaled (core.precision). Speed: a step queues its work on the device without waiting; run() reads each step's loss
    one step later, while the next one runs. Random draws come from a generator on the model's device, so a seed
    gives the same draws on the same device type: CPU runs are exactly reproducible; on CUDA results agree to float
    rounding (some CUDA backward kernels add in a varying order), and a CPU run and a CUDA run differ.
    """

    def __init__(
        self,
        model: Model,
        images: torch.Tensor,
        config: TrainConfig,
        init: Identity | None = None,
        masks: torch.Tensor | None = None,
        latents: tuple[torch.Tensor, torch.Tensor] | None = None,
        face_masks: torch.Tensor | None = None,
    ) -> None:
        """masks: optional (N, 1, H, W) weights in [0, 1] at image size that focus the loss (e.g. on the face).

        face_masks: (N, 1, H, W) face masks at image size for the face loss's mask mode (and the heatmap's shares).

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
        self.device = device = model.denoiser.device
        self.dtype = compute_dtype(model)  # what the UNet and text encoders compute in; the rows stay float32
        self.schedule = self._stage_schedule(init)
        if self.schedule is not None:
            start = self._staged_start(start, init)
        self.init_rows = {k: v.to(device, torch.float32) for k, v in start.items()}
        self.rows = {k: torch.nn.Parameter(v.clone()) for k, v in self.init_rows.items()}
        self.staged = None if self.schedule is None else StagedRows(self.rows, self.schedule)
        self.optimizer = torch.optim.AdamW(
            list(self.rows.values()),
            lr=self.config.effective_lr,
            betas=self.config.adam_betas,
            eps=self.config.adam_eps,
            weight_decay=self.config.weight_decay,
            **optimizer_options(device),
        )
        self.scaler = LossScaler(device, self.dtype == torch.float16, self.config.fp16_loss_scale)
        self.generator = torch.Generator(device=device).manual_seed(self.config.seed)
        self.prompt_generator = random.Random(self.config.seed ^ PROMPT_SEED_SALT)
        if latents is None:
            latents = encode_latents(model.denoiser, images, self.config.flip_p > 0)
        self.latent_mean, self.latent_std = (part.to(device) for part in latents)
        expected = images.shape[0] * (2 if self.config.flip_p > 0 else 1)
        if self.latent_mean.shape[0] != expected:
            raise InputError(f"latents: got {self.latent_mean.shape[0]} for {images.shape[0]} images; encode them with encode_latents")
        self.latent_weights = None if masks is None else self._latent_weights(masks)
        n_images = images.shape[0]
        face = self.config.face_loss
        if face is not None and face.mode == "mask":
            face_masks = check_face_masks(face_masks, n_images)
        self.face_weights = None if face_masks is None else self._latent_weights(face_masks)
        self.recorder = None
        if face is not None or (self.config.attention_maps and hasattr(model.denoiser, "recording")):
            if not hasattr(model.denoiser, "attention_sites"):
                raise InputError("face loss: this model's backend cannot record cross-attention; turn the face loss off")
            self.recorder = recorder_for(model, face.layers if face is not None else "default")
        self.attention_term = None if face is None else AttentionTerm(model, face, self.recorder, self.config.n_tokens)
        self.steps_done = 0  # steps run() has taken, the one in flight included
        self.skipped_steps = 0  # fp16 overflows: steps not applied and not counted in steps_done
        self.last_applied: torch.Tensor | None = None  # device bool left by step(): whether its update went in
        self._skips_in_a_row = 0
        self.compile_timer = CompileTimer()
        self._latest_loss: float | None = None

    def _validate(self, images: torch.Tensor, init: Identity | None) -> None:
        """Check images, token name and vector count before any work is done."""
        cfg = self.config
        if images.ndim != 4 or images.shape[0] == 0:
            raise InputError("images: got 0 images; give at least one photo of the subject")
        for name, value in (("steps", cfg.steps), ("batch size", cfg.batch_size), ("tokens", cfg.n_tokens)):
            if int(value) < 1:
                raise InputError(f"{name}: got {value}; it must be at least 1")
        if cfg.memory not in MEMORY_MODES:
            raise InputError(f"memory: unknown mode '{cfg.memory}'; choose one of {', '.join(MEMORY_MODES)}")
        if cfg.micro_batch_size is not None and int(cfg.micro_batch_size) < 0:
            raise InputError(
                f"micro batch size: got {cfg.micro_batch_size}; use 0 for the whole batch, or 1 to {cfg.batch_size}"
            )
        if not cfg.learning_rate > 0 or not math.isfinite(cfg.learning_rate):
            raise InputError(f"learning rate: got {cfg.learning_rate}; it must be a positive number such as 0.005")
        if cfg.face_loss is not None:
            cfg.face_loss.check()
            if cfg.face_loss.mode == "reference":
                check_reference_word(self.model, cfg.face_loss.reference_word)
        check_stage_count(cfg.stages, cfg.steps)
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

    def _stage_schedule(self, init: Identity | None) -> StageSchedule | None:
        """The stages to train: config.stages uniform ones, or a per-stage init's own; None for a plain identity."""
        steps = self.model.denoiser.num_train_timesteps
        own = init.schedule if init is not None and init.is_staged else None
        if self.config.stages is None:
            if own is not None:
                own.check_covers(steps)
            return own
        wanted = StageSchedule.uniform(int(self.config.stages), steps)
        if own is not None and own != wanted:
            raise InputError(
                f"stages: the init identity has {own.count} stages ({own.text()}) but {self.config.stages} were asked "
                f"for; ask for {own.count} or start from a plain identity"
            )
        return wanted

    def _staged_start(self, start: dict[str, torch.Tensor], init: Identity | None) -> dict[str, torch.Tensor]:
        """(2, S, n, width) start rows: a per-stage init's own, or the plain start rows in every stage's key and value."""
        if init is not None and init.is_staged:
            return {enc.key: init.stage_rows_for(enc.key, enc.width) for enc in self.model.encoders}
        count = self.schedule.count
        return {key: rows.float().unsqueeze(0).unsqueeze(0).expand(2, count, -1, -1).clone() for key, rows in start.items()}

    def plan_memory(self) -> MemoryPlan:
        """Checkpointing and micro-batch for this run (config.memory), with the estimate logged when there is one."""
        cfg, den = self.config, self.model.denoiser
        estimate = free = None
        if self.device.type == "cuda" and not self.model.name.startswith("tiny"):  # tiny models are not real sizes
            estimate = training_estimator(
                self.model.family, cfg.resolution, cfg.batch_size, self.dtype, n_rows=cfg.n_tokens
            )
            free = free_memory_bytes(self.device, getattr(den, "memory_modules", list)())
        plan = select_memory_plan(cfg.memory, cfg.batch_size, cfg.micro_batch_size, estimate, free)
        if estimate is not None:
            log.info("memory: %s (%s mode)", plan.describe(), cfg.memory)
        if not plan.fits and cfg.memory == "auto":
            log.warning("memory: the lowest mode may not fit; lower resolution or batch size if training runs out")
        return plan

    def _acceleration(self) -> ExitStack:
        """TF32 while training, plus the UNet checkpointing and compile this run asked for (undone on exit)."""
        den, stack = self.model.denoiser, ExitStack()
        stack.enter_context(fast_float32_matmuls(self.device))
        if self.memory_plan.checkpointing:
            if not hasattr(den, "checkpointing"):
                raise InputError("memory: this model's backend cannot checkpoint its UNet; use memory 'default'")
            stack.enter_context(den.checkpointing())
        if self.config.compile:
            if not hasattr(den, "compiled"):
                raise InputError("compile: this model's backend cannot compile its UNet; turn compile off")
            stack.enter_context(den.compiled(self.compile_timer))
        if self.recorder is not None:
            stack.enter_context(den.recording(self.recorder))
        return stack

    def attention_snapshot(self) -> tuple[object, object | None]:
        """Where the identity looks now in each training photo (N, h, w), and the share inside the face masks if any."""
        n_images = self.latent_mean.shape[0] // (2 if self.config.flip_p > 0 else 1)
        masks = None if self.face_weights is None else self.face_weights[:n_images]
        return attention_snapshot(
            self.model, self.recorder, self.latent_mean[:n_images], self.prompts[0], self.rows, self.config.n_tokens,
            self.config.seed, self.staged, masks,
        )

    def _snapshot_or_none(self, when: str) -> tuple[object, object | None] | None:
        """attention_snapshot(), or None (logged) when it runs out of memory: the identity matters more than the picture."""
        try:
            return self.attention_snapshot()
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            self._free_after_out_of_memory()
            log.warning("attention maps: out of memory at the %s snapshot; no heatmap this time", when)
            return None

    def _latent_weights(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks averaged down to latent size, laid out like the cached latents (originals, then mirrors)."""
        if masks.shape[0] != self.latent_mean.shape[0] // (2 if self.config.flip_p > 0 else 1):
            raise InputError(f"mask: got {masks.shape[0]} masks for the images; give one per image")
        small = F.interpolate(masks.float(), size=self.latent_mean.shape[-2:], mode="area")
        small = torch.cat([small, small.flip(-1)]) if self.config.flip_p > 0 else small
        return small.to(self.latent_mean.device)

    def sample_batch(self) -> Batch:
        """Draw images, flips, latent samples, noise and timesteps on the device, and templates on the host."""
        cfg, gen, device = self.config, self.generator, self.device
        n_images = self.latent_mean.shape[0] // (2 if cfg.flip_p > 0 else 1)
        index = torch.randint(0, n_images, (cfg.batch_size,), generator=gen, device=device)
        if cfg.flip_p > 0:
            index = index + n_images * (torch.rand(cfg.batch_size, generator=gen, device=device) < cfg.flip_p).long()
        mean, std = self.latent_mean[index], self.latent_std[index]
        sample = torch.randn(mean.shape, generator=gen, device=device, dtype=mean.dtype)
        noise = torch.randn(mean.shape, generator=gen, device=device, dtype=mean.dtype)
        timesteps = torch.randint(0, self.model.denoiser.num_train_timesteps, (cfg.batch_size,), generator=gen, device=device)
        weights = None if self.latent_weights is None else self.latent_weights[index]
        faces = None if self.face_weights is None else self.face_weights[index]
        # Prompts are strings, so they are drawn on the host, from a generator of their own: nothing is read back.
        prompts = [self.prompts[self.prompt_generator.randrange(len(self.prompts))] for _ in range(cfg.batch_size)]
        return Batch(mean + std * sample, noise, timesteps, prompts, weights, faces)

    def _squared_error_sum(self, batch: Batch, cond: Conditioning, noisy: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over the batch of the float32 squared error against the target, weighted by the masks if any."""
        den = self.model.denoiser
        if noisy is None:
            noisy = den.add_noise(batch.latents, batch.noise, batch.timesteps)
        pred = den.predict(noisy, batch.timesteps, cond).float()  # the loss is float32 whatever the model computes in
        error = (pred - den.target(batch.latents, batch.noise, batch.timesteps).float()) ** 2
        return error.sum() if batch.weights is None else (error * batch.weights).sum()

    @staticmethod
    def _error_weight(batch: Batch) -> torch.Tensor | float:
        """What the error sum of the whole batch is divided by: its element count, or the total mask weight.

        Micro-batches divide by the whole batch's value, so that their losses add up to the batch's mean.
        """
        if batch.weights is None:
            return float(batch.latents.numel())
        return (batch.weights.sum() * batch.latents.shape[1]).clamp_min(1e-8)  # weights broadcast over the channels

    def _regulariser(self) -> torch.Tensor:
        """Cross-Init's reg_weight * mean_i ||v_i - v_init,i + 1e-6|| summed over encoders (zero when reg_weight is 0)."""
        total = torch.zeros((), device=self.device)
        if self.config.reg_weight > 0:
            for key, rows in self.rows.items():
                total = total + self.config.reg_weight * F.pairwise_distance(rows, self.init_rows[key], p=2).mean()
        return total

    def _micro_loss(self, micro: Batch, cond: Conditioning, weight: torch.Tensor | float, batch_size: int) -> torch.Tensor:
        """One micro-batch's share of the step loss: its diffusion error and, when set, its face-wise attention loss."""
        if self.attention_term is None:
            return self._squared_error_sum(micro, cond) / weight
        den, face = self.model.denoiser, self.config.face_loss
        noisy = den.add_noise(micro.latents, micro.noise, micro.timesteps)
        reference = None
        if face.mode == "reference":  # same latents and timesteps, the class word in place of the identity
            reference = self.attention_term.reference_maps(noisy, micro.timesteps, micro.prompts)
        with self.recorder.recording():
            error = self._squared_error_sum(micro, cond, noisy)
        maps = self.recorder.take()
        latent_hw = tuple(micro.latents.shape[-2:])
        attention = self.attention_term.loss(maps, micro.prompts, micro.face_masks, latent_hw, reference)
        return error / weight + face.weight * attention * (len(micro.prompts) / batch_size)

    def _encode_step(self, prompts: list[str], timesteps: torch.Tensor) -> tuple[Conditioning, list[int]]:
        """The step's conditioning and, for each sample, its row in it (distinct prompts once; per-stage: one each)."""
        if self.staged is not None:
            return self.staged.condition(self.model, prompts, timesteps), list(range(len(prompts)))
        distinct, inverse = distinct_prompts(prompts)
        return encode_distinct(self.model, distinct, self.rows), inverse

    def loss(self, batch: Batch) -> torch.Tensor:
        """Diffusion MSE (mask-weighted when masks were given), the face loss if set, and the Cross-Init regulariser."""
        encoded, inverse = self._encode_step(batch.prompts, batch.timesteps)
        part = self._micro_loss(batch, encoded.select(inverse), self._error_weight(batch), len(batch.prompts))
        return part + self._regulariser()

    def _backward(self, batch: Batch) -> torch.Tensor:
        """Forward and backward of one step, micro-batch by micro-batch, gradients scaled; the loss, on the device.

        The text encoders run once for the step's distinct prompts. Each micro-batch's UNet backward stops at a
        float32 copy of their output; the gradient gathered there then goes back through the encoders in one pass.
        Gradients are linear in the loss, so the rows get exactly the whole batch's gradient.
        """
        encoded, inverse = self._encode_step(batch.prompts, batch.timesteps)
        held = Conditioning(*(None if part is None else _float_leaf(part) for part in _parts(encoded)))
        weight = self._error_weight(batch)
        total = self._regulariser()  # once per step, not once per micro-batch
        if total.requires_grad:
            self.scaler.scale(total).backward()
        size = self.config.micro_batch
        for start in range(0, len(batch.prompts), size):
            micro = batch.part(start, start + size)
            part = self._micro_loss(micro, held.select(inverse[start : start + size]), weight, len(batch.prompts))
            self.scaler.scale(part).backward()
            total = total + part.detach()
        outputs = [(out, leaf.grad) for out, leaf in zip(_parts(encoded), _parts(held))
                   if out is not None and out.requires_grad and leaf.grad is not None]
        if outputs:
            torch.autograd.backward([out for out, _ in outputs], [grad.to(out.dtype) for out, grad in outputs])
        return total.detach()

    def step(self, batch: Batch) -> torch.Tensor:
        """Queue one optimiser step on the device and return its loss, a device scalar, without waiting for it.

        The rows and AdamW state stay as they were when the loss or a gradient is not finite (for a float16 model
        the loss scale is then halved); last_applied holds, as a device bool, whether the update went in.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._backward(batch)
        finite = self.scaler.unscale_(list(self.rows.values())) & torch.isfinite(loss)
        self.last_applied = guarded_step(self.optimizer, finite)
        self.scaler.update(self.last_applied)
        return loss

    def _restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Put back rows saved before a step that has to be undone."""
        with torch.no_grad():
            for key, value in snapshot.items():
                self.rows[key].copy_(value)

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
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "memory_mode": getattr(getattr(self, "memory_plan", None), "mode", cfg.memory),
            **self._compile_metadata(),
            "skipped_steps": self.skipped_steps,
            "partial": str(partial).lower(),
            **self._face_metadata(),
            "created_by": f"identity-tokens {__version__}",
        }
        if self.staged is not None:
            return Identity.from_stages({k: v.detach() for k, v in self.rows.items()}, self.schedule, {**meta, **extra})
        return Identity({k: v.detach() for k, v in self.rows.items()}, {**meta, **extra})

    def _face_metadata(self) -> dict[str, object]:
        """The face loss's setting, for the file (nothing when off)."""
        face = self.config.face_loss
        if face is None:
            return {}
        meta = {"face_loss": face.mode, "face_loss_weight": face.weight, "face_loss_layers": face.layers}
        if face.mode == "reference":
            meta["face_loss_reference_word"] = face.reference_word
        return meta

    def _compile_metadata(self) -> dict[str, object]:
        """What torch.compile did, for the file: its first-call seconds, or why it fell back (nothing when off)."""
        if not self.config.compile:
            return {}
        timer = self.compile_timer
        if timer.fell_back:
            return {"compile": f"fell back: {timer.fell_back}"[:300]}
        seconds = timer.first_call_seconds
        return {"compile": "on", "compile_first_call_seconds": "" if seconds is None else f"{seconds:.2f}"}

    def _undo(self, queue: list[_Queued]) -> None:
        """Drop every queued step: the rows go back to before the oldest, and none of them counts."""
        self._restore(queue[0].before)
        self.steps_done = queue[0].number - 1
        queue.clear()

    def _settle(self, queue: list[_Queued], losses: list[float], keep: int) -> str:
        """Read queued steps' losses, oldest first, until keep remain; '' or why training must stop (steps undone)."""
        while len(queue) > keep:
            record = queue[0]
            if record.loss is None:  # its forward/backward never returned (Ctrl-C, out of memory): half done at best
                self._undo(queue)
                return ""
            loss, applied = _read(record)  # waits for this step only; the next one is already queued
            if not math.isfinite(loss):
                self._undo(queue)
                return f"loss became {loss} at step {record.number}"
            if not applied and not self.scaler.enabled:
                self._undo(queue)
                return f"gradient became non-finite at step {record.number}"
            self._latest_loss = loss
            queue.pop(0)
            if applied:
                self._skips_in_a_row = 0
                losses.append(loss)
                continue
            # An fp16 overflow: the device skipped the update and halved the loss scale; the step is taken again.
            self.steps_done -= 1
            self.skipped_steps += 1
            self._skips_in_a_row += 1
            for later in queue:
                later.number -= 1
            if self._skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
                if queue:
                    self._undo(queue)
                return (
                    f"float16 overflow: {MAX_SKIPS_IN_A_ROW} steps in a row skipped at step {record.number}; the "
                    "model overflows in float16 at any loss scale, load it in bfloat16 or float32"
                )
        return ""

    def run(self, on_step: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
        """Train for config.steps; Ctrl-C, a cancel, a non-finite loss or running out of memory end it early.

        The host waits once per step, for the previous step's loss, while the device runs the current one; so
        on_step(step, total, loss) comes right after a step is queued, with the latest loss known (the previous
        step's; the first step's own). Stopping keeps every finished step whose loss is finite; a step cut off
        halfway, or one after a non-finite loss, is undone.
        """
        losses: list[float] = []
        stopped = ""
        queue: list[_Queued] = []
        self.memory_plan = self.plan_memory()
        self.config = replace(self.config, micro_batch_size=self.memory_plan.micro_batch)
        maps = None
        with self._acceleration():
            start = self._snapshot_or_none("start") if self._wants_maps() else None
            try:
                while not stopped:
                    if self.steps_done >= self.config.steps:
                        if not queue:
                            break
                        stopped = self._settle(queue, losses, keep=0)  # a skipped last step makes room for one more
                        continue
                    if should_stop is not None and should_stop():
                        stopped = "cancelled"
                        break
                    queue.append(_Queued(self.steps_done + 1, {k: v.detach().clone() for k, v in self.rows.items()}))
                    self.last_applied = None
                    queue[-1].loss = self.step(self.sample_batch())
                    queue[-1].applied = self.last_applied
                    self.steps_done += 1
                    stopped = self._settle(queue, losses, keep=0 if self._latest_loss is None else 1)
                    if not stopped and on_step is not None and self._latest_loss is not None:
                        on_step(self.steps_done, self.config.steps, self._latest_loss)
            except KeyboardInterrupt:
                stopped = "interrupted"
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                self._free_after_out_of_memory()
                micro = f", micro-batch {self.config.micro_batch}" if self.config.micro_batch < self.config.batch_size else ""
                stopped = (
                    f"{OUT_OF_MEMORY} at step {self.steps_done + 1} (batch size {self.config.batch_size}{micro}, "
                    f"{self.config.resolution} px)"
                )
            if queue:  # stopped early: keep the steps that finished cleanly
                late = self._settle(queue, losses, keep=0)
                stopped = stopped or late
            if start is not None:
                end = None if stopped.startswith((OUT_OF_MEMORY, "cancelled")) else self._snapshot_or_none("end")
                maps = AttentionMaps(start[0], end and end[0], start[1], end and end[1], self.steps_done)
        identity = self.identity(partial=bool(stopped), stopped=stopped)
        return TrainResult(identity, losses, stopped, self.skipped_steps, maps)

    def _wants_maps(self) -> bool:
        """Whether this run records the attention heatmap's snapshots."""
        return self.config.attention_maps and self.recorder is not None


def _parts(cond: Conditioning) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """A conditioning's tensors in Conditioning's field order: context, pooled, value context."""
    return cond.context, cond.pooled, cond.value_context


def _float_leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 copy of tensor that gathers the gradient of what is computed from it."""
    return tensor.detach().float().requires_grad_(tensor.requires_grad)


def _read(record: _Queued) -> tuple[float, bool]:
    """A queued step's loss and whether its update went in, read back in one transfer."""
    if not torch.is_tensor(record.loss):  # a plain number (a stand-in step in tests)
        return float(record.loss), math.isfinite(float(record.loss))
    if record.applied is None:
        loss = float(record.loss)
        return loss, math.isfinite(loss)
    loss, applied = torch.stack([record.loss.float(), record.applied.float()]).tolist()
    return loss, bool(applied)
