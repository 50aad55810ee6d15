"""Denoising stages of a per-stage identity: which timesteps each key/value token pair serves (SeFi-IDE-style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError

DEFAULT_STAGES = 5  # SeFi-IDE's five per-stage token pairs (METHODS.md 3.1)
STAGE_RULE = "floor(t*S/T)"  # ProSpect's rule, T the training timesteps (1000): stage 0 is the least noisy


def check_stage_count(stages: int | None, steps: int) -> None:
    """A per-stage run needs at least one stage and no more stages than steps (None: a plain identity)."""
    if stages is None:
        return
    if int(stages) < 1:
        raise InputError(f"stages: got {stages}; use 1 or more stages ({DEFAULT_STAGES} is SeFi-IDE's), or none")
    if int(stages) > steps:
        raise InputError(
            f"stages: {stages} stages but only {steps} steps, so some stages would never train; use at most {steps} "
            "stages or more steps"
        )


@dataclass(frozen=True)
class StageSchedule:
    """S stages as S+1 increasing timestep bounds from 0 to T: stage i serves timesteps bounds[i] .. bounds[i+1]-1."""

    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        bounds = tuple(int(b) for b in self.bounds)
        object.__setattr__(self, "bounds", bounds)
        if len(bounds) < 2:
            raise InputError(f"stages: bounds {bounds} give no stage; give S+1 increasing timesteps from 0 to T")
        if bounds[0] != 0 or any(b >= a for a, b in zip(bounds[1:], bounds)):
            raise InputError(
                f"stages: bounds {list(bounds)} do not cover the schedule from timestep 0 without gaps or overlaps; "
                "they must rise strictly from 0 to the number of training timesteps (e.g. 0,200,400,600,800,1000)"
            )

    @classmethod
    def uniform(cls, count: int, num_train_timesteps: int = 1000) -> StageSchedule:
        """stage(t) = floor(t * count / T) as bounds: stage i starts at ceil(i * T / count)."""
        if int(count) < 1 or int(count) > num_train_timesteps:
            raise InputError(
                f"stages: got {count}; use 1 to {num_train_timesteps} stages (5 is SeFi-IDE's), or no per-stage tokens"
            )
        return cls(tuple(-(-i * num_train_timesteps // count) for i in range(count + 1)))

    @classmethod
    def parse(cls, text: str) -> StageSchedule:
        """Bounds from their metadata form '0,200,400,600,800,1000'."""
        try:
            bounds = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise InputError(f"stages: bounds '{text}' are not comma-separated whole numbers") from None
        return cls(bounds)  # outside the try: InputError is a ValueError, and its own message must get through

    @property
    def count(self) -> int:
        """How many stages there are."""
        return len(self.bounds) - 1

    @property
    def num_train_timesteps(self) -> int:
        """The schedule length the bounds cover."""
        return self.bounds[-1]

    def text(self) -> str:
        """The bounds as stored in a file's metadata."""
        return ",".join(str(b) for b in self.bounds)

    def check_covers(self, num_train_timesteps: int) -> None:
        """Refuse bounds that do not end at this model's number of training timesteps."""
        if self.bounds[-1] != num_train_timesteps:
            raise InputError(
                f"stages: the identity's stages cover timesteps 0..{self.bounds[-1] - 1} but this model has "
                f"{num_train_timesteps}; use an identity trained for a {num_train_timesteps}-step schedule"
            )

    def stage_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The stage of each integer timestep (clamped into 0..T-1), as a long tensor on their device."""
        inner = torch.tensor(self.bounds[1:-1], dtype=torch.long, device=timesteps.device)
        t = timesteps.round().long().clamp(0, self.bounds[-1] - 1)
        return torch.bucketize(t, inner, right=True)
