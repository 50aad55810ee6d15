"""Pretrain the lab model on the lab's world: resumable, deterministic from a seed, on the CPU or a GPU.

Two stages, both on fresh renders drawn from (seed, stage, step), so a run resumed from its checkpoint draws exactly
what an unbroken run would:

1. the VAE alone (L1 + MSE reconstruction, KL weight 1e-6), then its latent scale (1 / std of the latents);
2. the UNet and the text encoder jointly on the frozen VAE's latents: on a zero-terminal-SNR schedule, v-prediction
   loss weighted min(SNR + 1, 5) / (SNR + 1) (the picture error weighted min(SNR + 1, 5): min-SNR-5 that keeps the
   noisiest steps, where the caption decides the colours), AdamW, a linear warm-up, 10% of captions dropped (for
   classifier-free guidance), gradient clipping, an EMA of the weights.

The run folder holds state.pt (everything needed to resume; loaded with weights_only, no pickled code), log.jsonl
and preview.png (EMA weights, a fixed prompt set). A checkpoint is written every --checkpoint-every steps, at the end,
after --minutes, and on SIGTERM/SIGINT. --export writes the EMA weights as the fp16 diffusers folder core loads.

    OMP_WAIT_POLICY=PASSIVE python -m core.lab.pretrain --out out/lab_run --steps 6000 --threads 1 [--resume]
    python -m core.lab.pretrain --out out/lab_run --export core/lab/data/lab_model
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..distributed import all_reduce_gradients, process_group, reduce_value, share
from ..errors import InputError
from ..files import atomic_write
from . import world
from .model import MODEL_FOLDER, LabSpec, build_components, parameter_counts, save_folder, spec_dict

VAE_STAGE, UNET_STAGE, SCALE_STAGE = 1, 2, 3
KL_WEIGHT = 1e-6
PREVIEW_PROMPTS = (
    "a photo of a person with blonde hair",
    "a photo of a woman wearing glasses on a beach",
    "a photo of a man smiling in the forest",
    "a photo of a person with red hair and green eyes in the snow",
    "a photo of a person facing left in the city",
    "a photo of someone with blue hair, smiling",
)


@dataclass
class PretrainConfig:
    """The recipe: every number that decides the weights."""

    seed: int = 0
    famous: int = 300  # famous subjects in the world (the lab's celebrities)
    batch: int = 16
    vae_steps: int = 1200
    vae_lr: float = 1e-3
    steps: int = 6000  # UNet + text encoder steps
    lr: float = 6e-4
    warmup: int = 200
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    clip_norm: float = 1.0
    high_noise_fraction: float = 0.5  # this share of each batch's timesteps is drawn from high_noise_from..999
    high_noise_from: int = 850  # where captions decide the picture: below it the noisy latents show the colours
    look_fraction: float = 0.3  # share of anonymous people whose caption states only their hair and eye colours
    spec: LabSpec = field(default_factory=LabSpec)


def _rng(seed: int, stage: int, step: int) -> np.random.Generator:
    """The data stream of one step."""
    return np.random.default_rng([seed, stage, step])


def _torch_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The noise stream of one step (CPU, so a seed means the same draws on every machine)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stage) * 10_000_019 + step)


@lru_cache(maxsize=4)
def _famous(count: int) -> tuple[world.Subject, ...]:
    """The world's famous subjects, made once per count (about 45 ms each time; every step needs them)."""
    return tuple(world.famous_subjects(count))


def world_batch(config: PretrainConfig, stage: int, step: int) -> tuple[torch.Tensor, list[str]]:
    """Pixels in [-1, 1] (B, 3, 32, 32) and captions of one step, with caption dropout applied."""
    rng = _rng(config.seed, stage, step)
    subjects = _famous(config.famous)
    images, captions = [], []
    for _ in range(config.batch):
        image, text, _labels = world.pretraining_sample(subjects, rng, look_fraction=config.look_fraction)
        images.append(image)
        captions.append("" if rng.random() < config.caption_dropout else text)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def draw_timesteps(config: PretrainConfig, count: int, generator: torch.Generator) -> torch.Tensor:
    """The whole batch's timesteps: uniform, with high_noise_fraction of them from high_noise_from on instead.

    Why: the colours of hair, eyes and a famous face still show through the noise below about step 850 of the 16 x 16
    latents, so only the noisiest steps teach the model to take them from the caption (measured: with uniform steps
    the caption's hair colour changed the loss by 0.00% after 2,400 steps; see docs/LIKENESS.md)."""
    timesteps = torch.randint(0, count, (config.batch,), generator=generator)
    if config.high_noise_fraction > 0:  # drawn only then, so recipes without it keep their draws
        high = torch.randint(config.high_noise_from, count, (config.batch,), generator=generator)
        timesteps = torch.where(torch.rand(config.batch, generator=generator) < config.high_noise_fraction, high, timesteps)
    return timesteps


def loss_weight(abar: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Per-sample loss weights: the picture (x0) error ends up weighted min(SNR, gamma) for epsilon (min-SNR), and
    min(SNR + 1, gamma) for v, which unlike min-SNR keeps weight 1 where SNR is 0 (the last step of a zero-terminal-SNR
    schedule, where the caption alone decides the picture)."""
    snr = abar / (1 - abar)
    if prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:  # noqa: ANN001 - transformers type
    """Token ids padded to 77, as the pack's text encoder feeds them (BOS, ids, EOS, padding)."""
    return tokenizer(list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


class Run:
    """A pretraining run: components, optimisers, EMA and counters, saved to and resumed from one folder."""

    def __init__(self, config: PretrainConfig, folder: Path, rank: int = 0, world: int = 1) -> None:
        if config.vae_steps < 1 or config.batch < 1:
            raise InputError(f"--vae-steps/--batch: need at least 1 (got {config.vae_steps}, {config.batch})")
        share(config.batch, rank, world)  # refuses a batch that does not split over the processes
        self.rank, self.world = rank, world
        self.config = config
        self.folder = Path(folder)
        self.parts = build_components(config.spec, config.seed)
        self.vae, self.unet, self.text = self.parts["vae"], self.parts["unet"], self.parts["text_encoder"]
        self.vae_step = 0
        self.step = 0
        self.seconds = 0.0
        self.scaling_factor: float | None = None
        self.vae_optimiser = torch.optim.AdamW(self.vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
        embeddings = self.text.get_input_embeddings().weight
        others = [p for p in self.text.parameters() if p is not embeddings] + list(self.unet.parameters())
        self.optimiser = torch.optim.AdamW(
            [{"params": others, "weight_decay": config.weight_decay}, {"params": [embeddings], "weight_decay": 0.0}],
            lr=config.lr,
        )
        self.ema = {k: v.detach().clone() for k, v in self._trained().items()}
        self.history: list[dict] = []  # one entry per stretch of training: steps, processes, seconds
        self.warmup_from = 0  # the step the learning-rate warm-up starts from (a warm start's step)
        self.stop_requested = False

    def _trained(self) -> dict[str, torch.Tensor]:
        """The UNet's and text encoder's parameters by prefixed name."""
        named = {f"unet.{k}": v for k, v in self.unet.named_parameters()}
        named.update({f"text_encoder.{k}": v for k, v in self.text.named_parameters()})
        return named

    # --- saving and resuming ---------------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.folder / "state.pt"

    def save(self) -> None:
        """Write state.pt atomically."""
        state = {
            "config": _config_json(self.config),
            "vae_step": self.vae_step,
            "step": self.step,
            "seconds": self.seconds,
            "scaling_factor": self.scaling_factor,
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text.state_dict(),
            "vae_optimiser": self.vae_optimiser.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "ema": self.ema,
            "history": self.history,
            "warmup_from": self.warmup_from,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, lambda tmp: torch.save(state, tmp), overwrite=True)

    def resume(self) -> None:
        """Load state.pt (tensors and plain values only); refuse one made with another recipe."""
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        _check_same_recipe(state["config"], self.config, "resume", self.state_path)
        self.vae_step, self.step, self.seconds = state["vae_step"], state["step"], state["seconds"]
        self.scaling_factor = state["scaling_factor"]
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.text.load_state_dict(state["text_encoder"])
        self.vae_optimiser.load_state_dict(state["vae_optimiser"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.ema = state["ema"]
        self.history = list(state.get("history", []))
        self.warmup_from = int(state.get("warmup_from", 0))
        if self.scaling_factor is not None:
            self.vae.register_to_config(scaling_factor=self.scaling_factor)

    def warm_start(self, model_folder: Path) -> None:
        """Continue from an exported model folder (its fp16 EMA weights become the weights and the EMA; AdamW starts
        afresh; the step counters continue, so the data and noise draws go on where the folder's run stopped)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        marker = Path(model_folder) / "lab.json"
        if not marker.is_file():
            raise InputError(f"--warm-start: {model_folder} has no lab.json; give a folder written by --export")
        recipe = json.loads(marker.read_text())
        _check_same_recipe(recipe["config"], self.config, "--warm-start", model_folder, may_change=WARM_START_MAY_CHANGE)
        local = {"local_files_only": True, "torch_dtype": torch.float32}
        self.vae.load_state_dict(AutoencoderKL.from_pretrained(model_folder, subfolder="vae", **local).state_dict())
        unet = UNet2DConditionModel.from_pretrained(model_folder, subfolder="unet", **local)
        self.unet.load_state_dict(unet.state_dict())
        text = CLIPTextModel.from_pretrained(model_folder, subfolder="text_encoder", **local)
        _load_text_weights(self.text, text.state_dict())
        self.vae_step, self.step = recipe["vae_steps_done"], recipe["steps_done"]
        self.seconds, self.scaling_factor = recipe["train_seconds"], recipe["scaling_factor"]
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.ema = {k: v.detach().clone() for k, v in self._trained().items()}
        marker = {"warm_start_from_export_at_step": self.step}
        changed = _changed_fields(recipe["config"], self.config)
        if changed:
            marker["changed"] = changed
        self.history = [*recipe.get("history", []), marker]
        self.warmup_from = self.step

    def log(self, record: dict) -> None:
        """Append one JSON line to log.jsonl."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # --- stage 1: the VAE ------------------------------------------------------------------------------------------

    def _latent_shape(self) -> tuple[int, int, int, int]:
        """The whole batch's latent shape (every process draws the whole batch's noise, then keeps its share)."""
        spec = self.config.spec
        return (self.config.batch, spec.latent_channels, spec.latent_size, spec.latent_size)

    def _share(self) -> slice:
        """This process's share of each batch."""
        return share(self.config.batch, self.rank, self.world)

    def vae_loss(self, step: int) -> torch.Tensor:
        """Reconstruction loss of this process's share of one step's batch."""
        share = self._share()
        pixels = world_batch(self.config, VAE_STAGE, step)[0][share]
        noise = torch.randn(self._latent_shape(), generator=_torch_generator(self.config.seed, VAE_STAGE, step))
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * noise[share]
        decoded = self.vae.decode(latents).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
        return F.l1_loss(decoded, pixels) + F.mse_loss(decoded, pixels) + KL_WEIGHT * kl

    def train_vae_step(self) -> float:
        """One VAE step."""
        self.vae.train().requires_grad_(True)
        loss = self.vae_loss(self.vae_step)
        self.vae_optimiser.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(list(self.vae.parameters()), self.world, mean=True)
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.config.clip_norm)
        self.vae_optimiser.step()
        self.vae_step += 1
        return float(loss.detach())

    @torch.no_grad()
    def fit_scaling_factor(self, batches: int = 16) -> float:
        """1 / std of the VAE's latent means over fresh batches (SD's 0.18215 was found the same way)."""
        self.vae.eval()
        means = [self.vae.encode(world_batch(self.config, SCALE_STAGE, i)[0]).latent_dist.mean for i in range(batches)]
        self.scaling_factor = float(1.0 / torch.cat(means).std())
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        return self.scaling_factor

    # --- stage 2: UNet and text encoder ----------------------------------------------------------------------------

    def diffusion_loss(self, step: int) -> torch.Tensor:
        """min-SNR-weighted epsilon loss of this process's share of one step's batch."""
        config = self.config
        share = self._share()
        pixels, captions = world_batch(config, UNET_STAGE, step)
        pixels, captions = pixels[share], captions[share]
        generator = _torch_generator(config.seed, UNET_STAGE, step)
        scheduler = self.parts["scheduler"]
        noise_latent = torch.randn(self._latent_shape(), generator=generator)[share]
        noise = torch.randn(self._latent_shape(), generator=generator)[share]
        timesteps = draw_timesteps(config, scheduler.config.num_train_timesteps, generator)[share]
        with torch.no_grad():
            posterior = self.vae.encode(pixels).latent_dist
            latents = (posterior.mean + posterior.std * noise_latent) * self.scaling_factor
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = tokenize(self.parts["tokenizer"], captions)
        context = self.text(ids).last_hidden_state
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        abar = scheduler.alphas_cumprod[timesteps]
        if config.spec.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        weight = loss_weight(abar, config.spec.prediction_type, config.snr_gamma)
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()

    def learning_rate(self) -> float:
        """Linear warm-up (again after a warm start, whose AdamW is fresh), then constant (a run may be extended by
        resuming with more steps)."""
        return self.config.lr * min(1.0, (self.step - self.warmup_from + 1) / self.config.warmup)

    def train_step(self) -> float:
        """One UNet + text encoder step, then the EMA update."""
        self.unet.train().requires_grad_(True)
        self.text.train().requires_grad_(True)
        self.vae.eval().requires_grad_(False)
        for group in self.optimiser.param_groups:
            group["lr"] = self.learning_rate()
        loss = self.diffusion_loss(self.step)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimiser.param_groups for p in group["params"]]
        all_reduce_gradients(params, self.world, mean=True)
        torch.nn.utils.clip_grad_norm_(params, self.config.clip_norm)
        self.optimiser.step()
        self.step += 1
        since = self.step - self.warmup_from  # a warm start's EMA warms up again: its first weights may be another recipe's
        decay = min(self.config.ema_decay, (1 + since) / (10 + since))
        with torch.no_grad():
            for name, param in self._trained().items():
                self.ema[name].lerp_(param.detach(), 1 - decay)
        return float(loss.detach())

    def agree_to_stop(self, stop: bool) -> bool:
        """Whether any process wants to stop (all processes then stop at the same step)."""
        return reduce_value(float(stop), self.world, largest=True) > 0

    def mean_over_processes(self, value: float) -> float:
        """The mean of a number over the processes."""
        return reduce_value(value, self.world) / self.world

    # --- the trained model -----------------------------------------------------------------------------------------

    def ema_parts(self) -> dict[str, object]:
        """The components with the EMA weights (fresh modules; the training ones are untouched)."""
        parts = build_components(self.config.spec, self.config.seed)
        parts["vae"].load_state_dict(self.vae.state_dict())
        parts["vae"].register_to_config(scaling_factor=self.scaling_factor or 1.0)
        parts["unet"].load_state_dict({k[5:]: v for k, v in self.ema.items() if k.startswith("unet.")})
        _load_text_weights(parts["text_encoder"], {k[13:]: v for k, v in self.ema.items() if k.startswith("text_encoder.")})
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                part.eval().requires_grad_(False)
        return parts

    def recipe(self) -> dict:
        """What lab.json records: the recipe, sizes, counters and time."""
        return {
            "format": "identity-tokens-lab-model/1",
            "config": _config_json(self.config),
            "parameters": parameter_counts(self.parts),
            "vae_steps_done": self.vae_step,
            "steps_done": self.step,
            "scaling_factor": self.scaling_factor,
            "train_seconds": round(self.seconds, 1),
            "history": self.history,
            "torch": torch.__version__,
            "weights": "EMA of the UNet and text encoder; fp16",
        }

    def preview(self) -> Path:
        """A grid of the preview prompts (EMA weights, seed 0) as preview.png."""
        from PIL import Image

        from ..sample import generate
        from ..tiny import model_from_components

        model = model_from_components("sd1", self.ema_parts(), name="lab")
        images = generate(model, PREVIEW_PROMPTS * 2, steps=20, guidance=4.0, seed=0)
        rows = [np.concatenate(list(images[i * 6 : (i + 1) * 6]), axis=1) for i in range(2)]
        path = self.folder / "preview.png"
        Image.fromarray(np.concatenate(rows, axis=0)).resize((6 * 96, 2 * 96), Image.NEAREST).save(path)
        return path


# What a warm start may change: the schedule and the data mix, never the sizes. Recipes written before a field existed
# had the value given here.
WARM_START_MAY_CHANGE = ("spec.prediction_type", "spec.zero_terminal_snr", "high_noise_fraction", "look_fraction")
DEFAULTS_BEFORE = {
    "spec.prediction_type": "epsilon",
    "spec.zero_terminal_snr": False,
    "high_noise_fraction": 0.0,
    "high_noise_from": 850,
    "look_fraction": 0.0,
}


def _flat(config_json: dict) -> dict:
    """A recipe as flat keys (spec fields as spec.NAME), with the values of fields older recipes did not record."""
    flat = {k: v for k, v in config_json.items() if k != "spec"}
    flat.update({f"spec.{k}": v for k, v in config_json.get("spec", {}).items()})
    return {**DEFAULTS_BEFORE, **flat}


def _saved_spec(saved: dict) -> dict:
    """A saved recipe's spec, with the values of fields older recipes did not record."""
    return {k[5:]: v for k, v in _flat(saved).items() if k.startswith("spec.")}


def _saved_config(saved: dict) -> PretrainConfig:
    """The PretrainConfig of a saved recipe."""
    values = {k: v for k, v in _flat(saved).items() if not k.startswith("spec.")}
    return PretrainConfig(**values, spec=LabSpec(**_spec_args(_saved_spec(saved))))


def _changed_fields(saved: dict, config: PretrainConfig) -> dict:
    """The fields a warm start changes: {field: [saved, given]}."""
    before, now = _flat(saved), _flat(_config_json(config))
    return {k: [before[k], now[k]] for k in WARM_START_MAY_CHANGE if before[k] != now[k]}


def _check_same_recipe(
    saved: dict, config: PretrainConfig, what: str, source: Path, may_change: Sequence[str] = ()
) -> None:
    """Refuse to continue a run made with other settings than config (all but the step count and the fields in
    may_change), naming them."""
    saved, wanted = _flat(saved), _flat(_config_json(config))
    ignored = {"steps", *may_change}
    differing = [f"{k}: saved {saved.get(k)!r}, given {wanted[k]!r}" for k in wanted if k not in ignored and saved.get(k) != wanted[k]]
    if differing:
        raise InputError(
            f"{what}: {source} was made with other settings ({'; '.join(differing)}); pass the saved values, "
            "or use another --out"
        )


def _load_text_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load text-encoder weights; only the position-id buffer may be missing (transformers keeps it out of files)."""
    result = module.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise InputError(f"text encoder weights: missing {missing}, unexpected {result.unexpected_keys}")


def _config_json(config: PretrainConfig) -> dict:
    """The config as plain JSON values."""
    values = asdict(config)
    values["spec"] = spec_dict(config.spec)
    return values


def run(
    config: PretrainConfig,
    folder: Path,
    resume: bool = False,
    minutes: float | None = None,
    warm_start: Path | None = None,
    checkpoint_every: int = 250,
    preview_every: int = 1000,
    log_every: int = 25,
) -> Run:
    """Train (or continue) until config.steps, --minutes, or a stop signal; checkpoint on the way and at the end.

    Under torchrun (WORLD_SIZE > 1, gloo) each process takes an equal share of every batch and the gradients are
    averaged, so the steps are those of one process with the whole batch, up to float rounding; process 0 writes.
    """
    rank, world = process_group()
    state = Run(config, folder, rank, world)
    writer = rank == 0
    if state.state_path.exists():
        if not resume:
            raise InputError(f"out: {state.state_path} exists; add --resume to continue it, or choose another --out")
        if warm_start is not None:
            raise InputError(f"--warm-start: {state.state_path} exists already; drop --warm-start to resume that run")
        state.resume()
    elif resume:
        raise InputError(f"--resume: there is no {state.state_path} to continue; drop --resume to start the run")
    elif warm_start is not None:
        state.warm_start(warm_start)
    first = {"vae_step": state.vae_step, "step": state.step, "seconds": state.seconds}
    deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def request_stop(_signum: int, _frame: object) -> None:
        state.stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not state.agree_to_stop(state.stop_requested or (deadline is not None and time.monotonic() > deadline)):
            started = time.perf_counter()
            if state.vae_step < config.vae_steps:
                loss = state.train_vae_step()
                step, stage = state.vae_step, "vae"
                if state.vae_step == config.vae_steps:
                    state.log({"stage": "vae", "scaling_factor": state.fit_scaling_factor()})
            elif state.step < config.steps:
                loss = state.train_step()
                step, stage = state.step, "unet"
            else:
                break
            state.seconds += time.perf_counter() - started
            if step % log_every == 0:
                loss = state.mean_over_processes(loss)
                if writer:
                    record = {"stage": stage, "step": step, "loss": round(loss, 5), "seconds": round(state.seconds, 1)}
                    state.log(record)
                    print(json.dumps(record), flush=True)
            if writer and step % checkpoint_every == 0:
                state.save()
            if writer and stage == "unet" and step % preview_every == 0:
                state.preview()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        state.history.append({
            "vae_steps": [first["vae_step"], state.vae_step],
            "steps": [first["step"], state.step],
            "processes": world,
            "threads": torch.get_num_threads(),
            "seconds": round(state.seconds - first["seconds"], 1),
        })
        if writer:
            state.save()
    return state


def export(folder: Path, out: Path, overwrite: bool = False) -> Path:
    """Write a run's EMA weights as the fp16 diffusers folder core loads."""
    state_path = Path(folder) / "state.pt"
    if not state_path.is_file():
        raise InputError(f"--out: {folder} holds no state.pt; give the run folder that pretraining wrote")
    if out.exists() and not overwrite:
        raise InputError(f"export: {out} exists; add --overwrite to replace it")
    saved = torch.load(state_path, map_location="cpu", weights_only=True)["config"]
    config = _saved_config(saved)
    state = Run(config, folder)
    state.resume()
    if state.scaling_factor is None:
        raise InputError(f"export: {folder} has not finished the VAE stage yet; train further first")
    names = world.celebrity_names(_famous(config.famous))
    return save_folder(state.ema_parts(), out, state.recipe(), names)


def _spec_args(values: dict) -> dict:
    """LabSpec keyword arguments from JSON (lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m core.lab.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the run folder (state.pt, log.jsonl, preview.png)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps, help="UNet + text encoder steps in all")
    parser.add_argument("--vae-steps", type=int, default=PretrainConfig.vae_steps)
    parser.add_argument("--batch", type=int, default=PretrainConfig.batch)
    parser.add_argument("--seed", type=int, default=0)
    defaults, spec = PretrainConfig(), LabSpec()
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=spec.prediction_type)
    parser.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=spec.zero_terminal_snr)
    parser.add_argument("--high-noise-fraction", type=float, default=defaults.high_noise_fraction,
                        help=f"share of timesteps drawn from {defaults.high_noise_from} on")
    parser.add_argument("--look-fraction", type=float, default=defaults.look_fraction,
                        help="share of anonymous people captioned with only their hair and eye colours")
    parser.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (the shipped run used 1)")
    parser.add_argument(
        "--warm-start", type=Path, default=None,
        help="continue from an exported model folder (fresh AdamW; step counters and draws go on from its lab.json)",
    )
    parser.add_argument("--export", type=Path, default=None, help=f"write the EMA weights as a model folder ({MODEL_FOLDER})")
    parser.add_argument("--overwrite", action="store_true", help="with --export: replace an existing folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.export is not None:
            path = export(args.out, args.export, args.overwrite)
            print(f"lab model: {path}")
            return 0
        try:
            spec = LabSpec(prediction_type=args.prediction_type, zero_terminal_snr=args.zero_terminal_snr)
        except ValueError as error:
            raise InputError(f"--prediction-type/--zero-terminal-snr: {error}") from None
        config = PretrainConfig(
            seed=args.seed, batch=args.batch, vae_steps=args.vae_steps, steps=args.steps, spec=spec,
            high_noise_fraction=args.high_noise_fraction, look_fraction=args.look_fraction,
        )
        state = run(config, args.out, resume=args.resume, minutes=args.minutes, warm_start=args.warm_start)
        print(f"stopped at VAE step {state.vae_step}, UNet step {state.step}, {state.seconds / 60:.1f} min of training")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
