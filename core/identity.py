"""The Identity type: learned token rows per text encoder plus provenance metadata, optionally per-stage tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError
from .stages import STAGE_RULE, StageSchedule

# Encoder keys used across the pack and in SDXL files (ComfyUI's embedding keys).
ENCODER_KEYS = ("clip_l", "clip_h", "clip_g")

# Real-model widths, used to guess the encoder of a foreign single-tensor file.
WIDTH_TO_ENCODER = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}

# Metadata a per-stage identity carries about its stages (plain_export drops them with the stages).
STAGE_METADATA_KEYS = ("stage_bounds", "num_stages", "stage_rule")
BOUNDS_RULE = "bounds"  # stage_rule of a schedule that is not floor(t*S/T): the bounds themselves are the rule


class IdentityError(InputError):
    """A user-facing problem with an identity, its file, or its use; the message says the fix."""


@dataclass
class Identity:
    """Token rows per text encoder, each a float32 CPU tensor of shape (n_tokens, width).

    A per-stage (SeFi-IDE-style) identity also has `stages`: per encoder a (2, S, n_tokens, width) tensor, [0] the
    key rows and [1] the value rows of each denoising stage; its rows are the middle stage's value rows.
    """

    rows: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    stages: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.rows:
            raise IdentityError("identity: it holds no token rows; train or load one first")
        counts = {key: int(value.shape[0]) for key, value in self.rows.items()}
        for key, value in self.rows.items():
            if value.ndim != 2:
                raise IdentityError(
                    f"identity: rows for '{key}' have shape {tuple(value.shape)}; expected (n_tokens, width)"
                )
        if len(set(counts.values())) != 1:
            raise IdentityError(
                f"identity: encoders disagree on the token count {counts}; every encoder needs the same n"
            )
        self.rows = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in self.rows.items()}
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}
        if self.stages is not None:
            self.stages = _checked_stages(self.stages)
            self._check_stages_match_rows()
            self.metadata.update(_stage_metadata(self.schedule, self.num_stages))

    @classmethod
    def from_stages(
        cls, stages: dict[str, torch.Tensor], schedule: StageSchedule, metadata: dict[str, str] | None = None
    ) -> Identity:
        """A per-stage identity whose rows (what a plain prompt carries) are the middle stage's value rows."""
        stages = _checked_stages(stages)
        count = _stage_count(stages)
        if schedule.count != count:
            raise IdentityError(
                f"identity: the schedule has {schedule.count} stages ({schedule.text()}) but the tensors hold {count}; "
                f"give {count + 1} bounds, e.g. {StageSchedule.uniform(count).text()}"
            )
        rows = {key: value[1, count // 2].clone() for key, value in stages.items()}
        return cls(rows, {**(metadata or {}), **_stage_metadata(schedule, count)}, stages)

    def _check_stages_match_rows(self) -> None:
        """Refuse stages whose encoders, n, width, schedule or middle value rows disagree with the rows."""
        stages = self.stages or {}
        if set(stages) != set(self.rows):
            raise IdentityError(
                f"identity: per-stage tokens are for encoders {sorted(stages)} but the rows for {sorted(self.rows)}; "
                "give stages for exactly the encoders of the rows"
            )
        for key, value in stages.items():
            if tuple(value.shape[2:]) != tuple(self.rows[key].shape):
                raise IdentityError(
                    f"identity: per-stage tokens for '{key}' are {int(value.shape[2])} x {int(value.shape[3])} "
                    f"(n_tokens x width) but its rows are {int(self.rows[key].shape[0])} x "
                    f"{int(self.rows[key].shape[1])}; every stage needs the rows' token count and width"
                )
        schedule = self.schedule
        if schedule is None or schedule.count != _stage_count(stages):
            raise IdentityError(
                f"identity: per-stage tokens hold {_stage_count(stages)} stages but metadata 'stage_bounds' is "
                f"{self.metadata.get('stage_bounds')!r}; build the identity with Identity.from_stages"
            )
        middle = _stage_count(stages) // 2
        if any(not torch.equal(value[1, middle], self.rows[key]) for key, value in stages.items()):
            raise IdentityError(
                f"identity: the rows are not the value rows of the middle stage ({middle}); "
                "build the identity with Identity.from_stages"
            )

    @property
    def n_tokens(self) -> int:
        """How many token vectors the identity puts into a prompt."""
        return int(next(iter(self.rows.values())).shape[0])

    @property
    def is_staged(self) -> bool:
        """Whether the identity has per-stage key/value tokens (SeFi-IDE-style) besides its plain rows."""
        return self.stages is not None

    @property
    def num_stages(self) -> int:
        """How many denoising stages the per-stage tokens cover; 0 for a plain identity."""
        return _stage_count(self.stages) if self.stages else 0

    @property
    def schedule(self) -> StageSchedule | None:
        """The timesteps each stage serves, from metadata 'stage_bounds'; None for a plain identity."""
        if self.stages is None or "stage_bounds" not in self.metadata:
            return None
        try:
            return StageSchedule.parse(self.metadata["stage_bounds"])
        except InputError as error:
            raise IdentityError(f"identity: metadata 'stage_bounds' is unusable: {error}") from None

    @property
    def encoders(self) -> tuple[str, ...]:
        """The encoder keys the identity has rows for, in a stable order."""
        return tuple(sorted(self.rows))

    def rows_for(self, encoder_key: str, width: int) -> torch.Tensor:
        """The rows for one encoder, checked against its width; a lone tensor serves any matching encoder."""
        value = self.rows.get(encoder_key)
        if value is None and len(self.rows) == 1:
            value = next(iter(self.rows.values()))
        if value is None:
            raise IdentityError(
                f"identity: no rows for text encoder '{encoder_key}' (it has {', '.join(self.encoders)}); "
                "use an identity trained for this model family"
            )
        if int(value.shape[1]) != width:
            raise IdentityError(
                f"identity: rows are {int(value.shape[1])} wide but text encoder '{encoder_key}' takes {width}; "
                "this identity was made for another model family, train or load one for this model"
            )
        return value

    def stage_rows_for(self, encoder_key: str, width: int) -> torch.Tensor:
        """The (2, S, n_tokens, width) key/value rows for one encoder, checked like rows_for."""
        if self.stages is None:
            raise IdentityError(
                "identity: it is plain (one vector per token) and has no per-stage key/value tokens; "
                "use a per-stage (SeFi-IDE-style) identity here, or the plain prompt"
            )
        self.rows_for(encoder_key, width)  # the same encoder and width checks and messages
        value = self.stages.get(encoder_key)
        return next(iter(self.stages.values())) if value is None else value


def plain_export(identity: Identity) -> Identity:
    """A plain one-vector-per-token identity from a per-stage one: the middle stage's value rows only (lossy)."""
    if not identity.is_staged:
        raise IdentityError("plain export: the identity is already plain (one vector per token); save it as it is")
    metadata = {key: value for key, value in identity.metadata.items() if key not in STAGE_METADATA_KEYS}
    metadata["lossy"] = "true"
    metadata["exported_from"] = (
        f"per-stage identity ({identity.num_stages} stages, key/value split): only the middle stage's value token kept"
    )
    return Identity({key: value.clone() for key, value in identity.rows.items()}, metadata)


def _checked_stages(stages: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-stage tensors as float32 CPU copies, refused unless each is (2, S, n, width) with one S and n for all."""
    if not stages:
        raise IdentityError("identity: per-stage tokens are empty; give a (2, S, n_tokens, width) tensor per encoder")
    for key, value in stages.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[0] != 2 or value.numel() == 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise IdentityError(
                f"identity: per-stage tokens for '{key}' have shape {shape}; expected (2, stages, n_tokens, width), "
                "[0] the key rows and [1] the value rows"
            )
    for axis, what in ((1, "stage count"), (2, "token count")):
        sizes = {key: int(value.shape[axis]) for key, value in stages.items()}
        if len(set(sizes.values())) != 1:
            raise IdentityError(
                f"identity: encoders disagree on the per-stage {what} {sizes}; every encoder needs the same one"
            )
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in stages.items()}


def _stage_count(stages: dict[str, torch.Tensor]) -> int:
    """S of checked per-stage tensors."""
    return int(next(iter(stages.values())).shape[1])


def _stage_metadata(schedule: StageSchedule | None, count: int) -> dict[str, str]:
    """stage_bounds, num_stages and stage_rule: 'floor(t*S/T)' for the uniform split, else 'bounds'."""
    assert schedule is not None  # checked by the caller
    uniform = schedule == StageSchedule.uniform(count, schedule.num_train_timesteps)
    return {
        "stage_bounds": schedule.text(),
        "num_stages": str(count),
        "stage_rule": STAGE_RULE if uniform else BOUNDS_RULE,
    }
