"""Training the identity encoder: the text-to-image model and the vision tower frozen, only the mapper learns.

The parts of Taming Encoder's recipe that apply with a frozen UNet (METHODS.md 4.1), each a term of the loss:
- cross-reference regularisation: the encoder sees one picture of an identity, the diffusion loss targets another
  (core.encoders.data draws the pairs);
- a masked diffusion loss: where a target has a mask (e.g. the face), only the masked latents count;
- identity preservation: the vision tower's class token of the decoded x0 prediction should point where the
  target picture's does (cosine), at timesteps below identity_max_timestep where x0 is a picture at all;
- an L1 penalty on the rows' offset from the base rows (ELITE's 0.01 * mean |embedding|, on the offset).
Not built: "embedding dropping on general data". With the UNet and text encoder frozen a caption without the identity
does not depend on the encoder, so it gives the encoder no gradient; it protects a jointly tuned UNet's text-only
ability, which a frozen UNet keeps by construction.

Every loss term is a sum over samples divided by the global batch, so under torchrun (one machine or many, gloo on
CPUs, NCCL on GPUs) each process computes its equal share of the batch and the gradients are summed: the step is that
of one process with the whole batch, up to float rounding. Draws depend only on (seed, step, sample index), and a
checkpoint holds the mapper, AdamW's state and the step, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..cross_init import initial_rows
from ..distributed import all_reduce_gradients, process_group, reduce_value, share
from ..errors import InputError
from ..files import atomic_write
from ..protocols import Model, encode_distinct
from ..sample import epsilon_and_x0
from .data import EncoderData, Sample, to_unit
from .files import save_encoder
from .mapper import EncoderSpec, IdentityEncoder
from .vision import VisionTower, preprocess

STATE = "state.pt"
LOG = "log.jsonl"
MAX_SKIPS_IN_A_ROW = 16  # non-finite steps in a row before training gives up


@dataclass(frozen=True)
class EncoderTrainConfig:
    """The encoder's training recipe; steps may grow on a resume, nothing else may change."""

    steps: int = 2000
    batch: int = 16  # the global batch: split evenly over the processes
    learning_rate: float = 3e-4
    warmup: int = 100  # linear warm-up steps, then constant (so a finished run can be extended by resuming)
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    offset_l1: float = 0.01  # weight of the mean |offset| of the rows from the base rows (ELITE's L1 on the embedding)
    identity_weight: float = 0.1  # weight of the identity-preservation term; 0 turns it off (no VAE decode then)
    identity_max_timestep: int = 600  # the term counts only below this timestep, where x0 is still a picture
    n_tokens: int = 2
    hidden: int = 256  # the mapper's width per tower layer
    layers: tuple[int, ...] = ()  # tower layers read (1-based); () = five evenly spaced ones ending with the last
    resolution: int = 32  # the diffusion target's size in pixels
    seed: int = 0

    def check(self) -> None:
        """Refuse values that cannot train, before anything is loaded."""
        for name in ("steps", "batch", "n_tokens", "hidden", "resolution"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')}: got {getattr(self, name)}; it must be at least 1")
        if not self.learning_rate > 0:
            raise InputError(f"--learning-rate: got {self.learning_rate}; it must be positive, e.g. 3e-4")
        for name in ("offset_l1", "identity_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')}: got {getattr(self, name)}; it must be 0 or more")

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        values = asdict(self)
        values["layers"] = list(self.layers)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> EncoderTrainConfig:
        """The config from to_dict's fields (unknown fields refused)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"encoder run: unknown recipe fields {unknown}; it was written by a newer version")
        return cls(**{**values, "layers": tuple(values.get("layers", ()))})


def _generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step's noise and timesteps (the whole batch's, so any split draws the same)."""
    entropy = np.random.SeedSequence([seed, 71, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


class EncoderRun:
    """A training run: the frozen model and tower, the mapper, AdamW and the counters, saved to one folder."""

    def __init__(
        self,
        model: Model,
        tower: VisionTower,
        data: EncoderData,
        config: EncoderTrainConfig,
        folder: Path,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        config.check()
        self.share = share(config.batch, rank, world)
        self.model, self.tower, self.data, self.config = model, tower, data, config
        self.folder, self.rank, self.world = Path(folder), rank, world
        self.device = model.denoiser.device
        spec = EncoderSpec(
            vision=tower.spec,
            widths={enc.key: enc.width for enc in model.encoders},
            family=model.family,
            layers=config.layers,
            n_tokens=config.n_tokens,
            hidden=config.hidden,
            base_model=model.name,
        )
        base = initial_rows(model, "celebrity", config.n_tokens)  # Cross-Init's start: an untrained encoder gives it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.encoder = IdentityEncoder(spec, base).float()
        self.encoder.to(self.device).train()
        self.optimiser = torch.optim.AdamW(
            self.encoder.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.step = 0
        self.seconds = 0.0
        self.history: list[dict] = []
        self.stop_requested = False
        self.skipped = 0  # steps whose loss or gradient was not finite on some process: not applied
        self._skips_in_a_row = 0

    # --- the loss ------------------------------------------------------------------------------------------------

    def _samples(self, step: int) -> list[Sample]:
        """This process's share of the step's samples."""
        indices = range(self.config.batch)[self.share]
        return [self.data.sample(self.config.seed, step, i) for i in indices]

    def _tower_input(self, pictures: Sequence[torch.Tensor]) -> torch.Tensor:
        """(1, 3, H, W) pictures in [0, 1] of any sizes -> one normalised batch for the tower."""
        return torch.cat([preprocess(p.to(self.device), self.tower.spec) for p in pictures])

    def _identity_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower's last-layer class token of (N, 3, S, S) pictures in [0, 1] (differentiable in the pixels)."""
        return self.tower.hidden_states(preprocess(pixels, self.tower.spec), [self.tower.spec.layers])[0][:, 0]

    def losses(self, step: int) -> dict[str, torch.Tensor]:
        """This process's share of each loss term of one step (sums over its samples / the global batch)."""
        config, model = self.config, self.model
        den = model.denoiser
        samples = self._samples(step)
        target = to_unit([s.target for s in samples]).to(self.device)
        if target.shape[-1] != config.resolution:
            target = F.interpolate(target, size=(config.resolution,) * 2, mode="bilinear", antialias=True)
        with torch.no_grad():
            mean, std = den.encode_pixels(target * 2 - 1)
            states = self.tower.hidden_states(
                self._tower_input([to_unit([s.source]) for s in samples]), self.encoder.spec.layers
            )
        generator = _generator(config.seed, step)
        whole = (config.batch, *mean.shape[1:])
        noise_latent = torch.randn(whole, generator=generator)[self.share].to(self.device)
        noise = torch.randn(whole, generator=generator)[self.share].to(self.device)
        timesteps = torch.randint(0, den.num_train_timesteps, (config.batch,), generator=generator)[self.share]
        timesteps = timesteps.to(self.device)
        latents = mean + std * noise_latent
        offsets = self.encoder.offsets(states)
        rows = {key: self.encoder.base(key) + delta for key, delta in offsets.items()}
        cond = encode_distinct(model, [s.caption for s in samples], rows)  # each prompt with its own rows
        noisy = den.add_noise(latents, noise, timesteps)
        prediction = den.predict(noisy, timesteps, cond).float()
        error = (prediction - den.target(latents, noise, timesteps).float()) ** 2
        weights = self._latent_masks(samples, mean.shape[-2:])
        if weights is None:
            per_sample = error.mean(dim=(1, 2, 3))
        else:
            per_sample = (error * weights).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * error.shape[1]).clamp_min(1e-8)
        terms = {"diffusion": per_sample.sum() / config.batch}
        l1 = torch.stack([delta.abs().mean(dim=(1, 2)) for delta in offsets.values()]).mean(dim=0)
        terms["offset_l1"] = config.offset_l1 * l1.sum() / config.batch
        if config.identity_weight > 0:
            terms["identity"] = config.identity_weight * self._identity_term(noisy, prediction, timesteps, target)
        return terms

    def _latent_masks(self, samples: Sequence[Sample], size: torch.Size) -> torch.Tensor | None:
        """(N, 1, h, w) loss weights from the targets' masks (1 where a target has none), or None when none has one."""
        if all(s.mask is None for s in samples):
            return None
        full = [torch.ones(self.config.resolution, self.config.resolution) if s.mask is None
                else torch.from_numpy(s.mask).float() for s in samples]
        masks = torch.stack(full).unsqueeze(1).to(self.device)
        return F.interpolate(masks, size=tuple(size), mode="area")

    def _identity_term(
        self, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Sum over the samples below identity_max_timestep of 1 - cos(tower(decoded x0), tower(target)) / batch."""
        den = self.model.denoiser
        keep = timesteps < self.config.identity_max_timestep
        if not bool(keep.any()):
            return prediction.sum() * 0  # keeps the graph's shape: a zero with a gradient path
        abar = den.scheduler.alphas_cumprod.to(self.device, torch.float32)[timesteps[keep]].view(-1, 1, 1, 1)
        _, x0 = epsilon_and_x0(prediction[keep], noisy[keep].float(), abar, den.prediction_type)
        vae = den.vae
        pixels = vae.decode((x0 / den.scaling_factor).to(next(vae.parameters()).dtype)).sample.float()
        drawn = self._identity_features(((pixels + 1) / 2).clamp(0, 1))
        with torch.no_grad():
            wanted = self._identity_features(target[keep])
        return (1 - F.cosine_similarity(drawn, wanted, dim=-1)).sum() / self.config.batch

    # --- a step ----------------------------------------------------------------------------------------------------

    def learning_rate(self) -> float:
        """Linear warm-up, then constant."""
        return self.config.learning_rate * min(1.0, (self.step + 1) / max(1, self.config.warmup))

    def train_step(self) -> dict[str, float]:
        """One optimiser step; each term's value summed over the processes (the whole batch's loss), and the gradient
        norm before clipping. A step whose loss or gradient is not finite on any process is skipped on all of them."""
        for group in self.optimiser.param_groups:
            group["lr"] = self.learning_rate()
        terms = self.losses(self.step)
        loss = sum(terms.values())
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.encoder.parameters())
        all_reduce_gradients(params, self.world, mean=False)  # each process's loss is its share of the batch's
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip_norm)
        values = {name: reduce_value(float(value.detach()), self.world) for name, value in terms.items()}
        if self.agree_to_stop(not (torch.isfinite(loss) and torch.isfinite(norm))):
            self.optimiser.zero_grad(set_to_none=True)
            self.skipped += 1
            self._skips_in_a_row += 1
            if self._skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
                raise InputError(
                    f"training: the loss or gradient was not finite {MAX_SKIPS_IN_A_ROW} steps in a row (at step "
                    f"{self.step + 1}); lower --learning-rate, or train in float32 (--device cpu, or a GPU model in fp32)"
                )
        else:
            self.optimiser.step()
            self._skips_in_a_row = 0
        self.step += 1  # a skipped step's batch is passed over, so the draws stay those of (seed, step)
        return {**values, "grad_norm": float(norm)}

    def agree_to_stop(self, stop: bool) -> bool:
        """Whether any process wants to stop (all then stop after the same step)."""
        return reduce_value(float(stop), self.world, largest=True) > 0

    # --- saving and resuming ---------------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.folder / STATE

    def recipe(self) -> dict:
        """What the run was: recipe, data, base model and tower, counters, time."""
        return {
            "config": self.config.to_dict(),
            "spec": self.encoder.spec.to_dict(),
            "data": self.data.description,
            "steps_done": self.step,
            "skipped_steps": self.skipped,
            "train_seconds": round(self.seconds, 1),
            "history": self.history,
            "created_by": f"identity-tokens {__version__}",
        }

    def save(self) -> None:
        """Write state.pt atomically (tensors and plain values only, read back weights-only)."""
        state = {
            **self.recipe(),
            "encoder": self.encoder.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "seconds": self.seconds,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, lambda tmp: torch.save(state, tmp), overwrite=True)

    def resume(self) -> None:
        """Continue from state.pt; refuse one made with another recipe, tower or model."""
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        saved = EncoderTrainConfig.from_dict(state["config"])
        if replace(saved, steps=self.config.steps) != self.config:
            changed = {k: (v, getattr(self.config, k)) for k, v in asdict(saved).items()
                       if k != "steps" and v != getattr(self.config, k)}
            raise InputError(
                f"--resume: {self.state_path} was made with another recipe ({changed}: saved, now); resume with the "
                "same settings (only --steps may grow), or start a new run folder"
            )
        if state["data"] != self.data.description:
            raise InputError(
                f"--resume: {self.state_path} was trained on {state['data']}, not {self.data.description}; resume "
                "with the same --data"
            )
        if state["spec"] != self.encoder.spec.to_dict():
            raise InputError(
                f"--resume: {self.state_path} was made for another model or vision tower; resume with the same --model "
                "and --vision"
            )
        self.encoder.load_state_dict(state["encoder"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.step, self.seconds = int(state["steps_done"]), float(state["seconds"])
        self.skipped = int(state.get("skipped_steps", 0))
        self.history = list(state.get("history", []))
        self._drop_logged_steps_after(self.step)

    def _drop_logged_steps_after(self, step: int) -> None:
        """Forget log lines of steps after the checkpoint (a crash's; they are taken again)."""
        path = self.folder / LOG
        if self.rank != 0 or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)), overwrite=True)

    def log(self, record: dict) -> None:
        """Append one JSON line to log.jsonl."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")


StepFn = Callable[[int, int, dict[str, float]], None]


def run_folder(out: Path) -> Path:
    """Where a run that writes OUT keeps its checkpoint and log: OUT's name with .run instead of .safetensors."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".run")


def train_encoder(
    model: Model,
    tower: VisionTower,
    data: EncoderData,
    config: EncoderTrainConfig,
    out: Path,
    folder: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    minutes: float | None = None,
    checkpoint_every: int = 100,
    log_every: int = 10,
    on_step: StepFn | None = None,
) -> EncoderRun:
    """Train (or continue) until config.steps, --minutes or a stop signal; checkpoint on the way, and write the encoder
    file when the steps are done (process 0 writes). The run folder defaults to run_folder(out)."""
    rank, world = process_group(model.denoiser.device)
    folder = run_folder(out) if folder is None else Path(folder)
    state = EncoderRun(model, tower, data, config, folder, rank, world)
    writer = rank == 0
    if state.state_path.exists():
        if not resume:
            raise InputError(f"--out: {state.state_path} exists; add --resume to continue that run, or another --out")
        state.resume()
    elif resume:
        raise InputError(f"--resume: there is no {state.state_path} to continue; drop --resume to start the run")
    first_step, first_seconds = state.step, state.seconds
    deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def request_stop(_signum: int, _frame: object) -> None:
        state.stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while state.step < config.steps and not state.agree_to_stop(
            state.stop_requested or (deadline is not None and time.monotonic() > deadline)
        ):
            started = time.perf_counter()
            values = state.train_step()
            state.seconds += time.perf_counter() - started
            if writer and (state.step % log_every == 0 or state.step == config.steps):
                state.log({"step": state.step, **{k: round(v, 5) for k, v in values.items()},
                           "seconds": round(state.seconds, 1)})
            if on_step is not None and writer:
                on_step(state.step, config.steps, values)
            if writer and state.step % checkpoint_every == 0:
                state.save()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        state.history.append({"steps": [first_step, state.step], "processes": world,
                              "threads": torch.get_num_threads(), "device": str(state.device),
                              "seconds": round(state.seconds - first_seconds, 1)})
        if writer:
            state.save()
    if writer and state.step >= config.steps:
        save_encoder(state.encoder, out, overwrite=overwrite, training=state.recipe())
    return state
