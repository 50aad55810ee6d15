"""The lab's measurements: does the lab model draw what captions state, and does a method capture a likeness.

Every method trains on a held-out subject's reference pictures (never seen in pretraining), then generates with a
fixed prompt set and seeds; the evaluator reads the pictures:
- likeness: how close the generated subject's unnamed identity traits are to the reference subject's (1 = the same);
- editability: the fraction of each edit prompt's named attributes (glasses, expression, scene, pose) realised.
The class-word baseline generates "a person" in the same prompts, with no identity at all.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..errors import InputError
from ..identity import Identity
from ..protocols import SLOT, Model
from ..sample import generate, generate_identity
from ..sefi import DEFAULT_WEIGHT, FaceLoss
from . import world
from .evaluator import Evaluator, editability, likeness, read_images
from .vision import LAB_ENCODER

RESOLUTION = world.SIZE
CLASS_WORD = "a person"
TEMPLATES = "lab"  # every method trains on the world's caption openings ("a photo of {}", ...): see core.templates
REFERENCES = 4  # reference pictures per subject

# Prompts whose generated subject should be the identity; each edit prompt states attributes the evaluator checks.
PLAIN_PROMPTS: tuple[str, ...] = ("a photo of {}", "a portrait of {}")
EDIT_PROMPTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("a photo of {} wearing glasses", {"glasses": "with"}),
    ("a photo of {} smiling", {"expression": "smiling"}),
    ("a photo of {} on a beach", {"scene": "beach"}),
    ("a photo of {} smiling in the snow", {"expression": "smiling", "scene": "snow"}),
    ("a photo of {} wearing glasses in the forest", {"glasses": "with", "scene": "forest"}),
    ("a photo of {} facing left in the city", {"pose": "left", "scene": "city"}),
)


# What `python -m core train --model lab` draws after training (OUT.samples.png).
DEMO_PROMPTS: tuple[str, ...] = (
    "a photo of {}",
    "a photo of {} wearing glasses",
    "a photo of {} smiling on a beach",
    "a photo of {} facing left in the snow",
)


@dataclass(frozen=True)
class Method:
    """One row of the table: a training preset and step count (None: no training), whether the start is the lab
    encoder's identity of the references, and whether the face-wise attention loss trains too (mask mode on the
    references' face masks, or the reference mode; face_weight defaults to SeFi-IDE's); a method
    with no preset and no encoder is the class-word baseline."""

    name: str
    preset: str | None
    steps: int | None = None
    encoder: bool = False
    face_loss: bool = False
    face_mode: Literal["mask", "reference"] = "mask"
    face_weight: float = DEFAULT_WEIGHT
    stages: int | None = None  # per-stage key/value tokens (SeFi-IDE-style), sampled stage by stage

    @property
    def is_baseline(self) -> bool:
        """The class word: no identity at all."""
        return self.preset is None and not self.encoder


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("class word", None),
        Method("TI 320", "textual_inversion", 320),
        Method("TI 5000", "textual_inversion", 5000),
        Method("Cross-Init 320", "cross_init", 320),
        Method("Cross-Init fast 25", "cross_init_fast", 25),
        Method("Cross-Init 320 + face loss", "cross_init", 320, face_loss=True),
        Method("Cross-Init 320 + 5 stages", "cross_init", 320, stages=5),
        Method("Cross-Init 320 + face loss + 5 stages", "cross_init", 320, face_loss=True, stages=5),
        Method("Cross-Init 320 + face loss 0.03", "cross_init", 320, face_loss=True, face_weight=0.03),
        Method("Cross-Init 320 + face loss 0.3", "cross_init", 320, face_loss=True, face_weight=0.3),
        Method("Cross-Init 320 + face loss (reference)", "cross_init", 320, face_loss=True, face_mode="reference"),
        Method("Encoder (one pass)", None, encoder=True),
        Method("Encoder + fast 25", "cross_init_fast", 25, encoder=True),
    )
}


def reference_pictures(subject: world.Subject, seed: int = 0) -> list[np.ndarray]:
    """The reference pictures a method trains on."""
    return world.reference_images(subject, REFERENCES, seed=seed)


def face_mask_batch(subject: world.Subject, seed: int = 0) -> torch.Tensor:
    """The face masks of reference_pictures(subject, seed) as the trainer's (N, 1, 32, 32) float batch: the world
    knows where it drew each face, so no face detector is involved."""
    return torch.from_numpy(np.stack(world.reference_face_masks(subject, REFERENCES, seed=seed))).float()[:, None]


def pictures_to_tensor(pictures: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 pictures as the trainer's (N, 3, 32, 32) float batch in [-1, 1]."""
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1


def encoder_identity(pictures: Sequence[np.ndarray], encoder_file: Path = LAB_ENCODER) -> Identity:
    """The lab encoder's identity of the pictures: one forward pass, the mean over the pictures."""
    from ..encoders.data import to_unit
    from ..encoders.files import load_encoder
    from ..encoders.mapper import encode_photos
    from .vision import load_tower

    return encode_photos(load_encoder(encoder_file), load_tower(), [to_unit([p]) for p in pictures])


def face_loss_of(method: Method) -> FaceLoss | None:
    """The method's face-wise attention loss setting, or None."""
    if not method.face_loss:
        return None
    return FaceLoss(mode=method.face_mode, weight=method.face_weight).check()


def train_identity(
    model: Model,
    pictures: Sequence[np.ndarray],
    method: Method,
    seed: int = 0,
    face_masks: torch.Tensor | None = None,
    **overrides: object,
) -> tuple[Identity | None, float]:
    """Make the method's identity of the pictures (face_masks: theirs, for a face-loss method); (identity, seconds).
    The baseline makes none: (None, 0)."""
    if method.is_baseline:
        return None, 0.0
    from ..trainer import Trainer, preset_config

    masked = method.face_loss and method.face_mode == "mask"
    if masked and face_masks is None:
        raise InputError(f"face_masks: {method.name} trains with the face loss's mask mode; give the pictures' face masks")

    started = time.perf_counter()
    start = encoder_identity(pictures) if method.encoder else None
    if method.preset is None:
        return start, time.perf_counter() - started
    settings = {"steps": method.steps, "resolution": RESOLUTION, "seed": seed, "templates": TEMPLATES,
                "attention_maps": False, "face_loss": face_loss_of(method),
                "stages": method.stages}
    config = preset_config(method.preset, **{**settings, **overrides})
    faces = face_masks if masked else None
    result = Trainer(model, pictures_to_tensor(pictures), config, init=start, face_masks=faces).run()
    return result.identity, time.perf_counter() - started


def generate_with(
    model: Model, identity: Identity | None, prompts: Sequence[str], seed: int = 0, **sampling: object
) -> np.ndarray:
    """Pictures of prompts whose SLOT is the identity, or the class word when identity is None."""
    if identity is None:
        return generate(model, [p.replace(SLOT, CLASS_WORD) for p in prompts], seed=seed, **sampling)
    return generate_identity(model, list(prompts), identity, seed=seed, **sampling)


@dataclass
class Scores:
    """One identity's scores over its generated set."""

    likeness: float  # mean over every generated picture
    likeness_plain: float  # mean over the plain prompts' pictures only
    editability: float  # mean over the edit prompts' pictures
    per_prompt: dict[str, float] = field(default_factory=dict)  # editability per edit prompt


def score_identity(
    model: Model,
    evaluator: Evaluator,
    identity: Identity | None,
    subject: world.Subject,
    seeds: Sequence[int] = (0, 1),
    **sampling: object,
) -> tuple[Scores, np.ndarray]:
    """Generate the prompt set once per seed and score it against the subject; (scores, the pictures)."""
    edit_texts = [p for p, _ in EDIT_PROMPTS]
    prompts = list(PLAIN_PROMPTS) + edit_texts
    pictures = np.concatenate([generate_with(model, identity, prompts, seed=s, **sampling) for s in seeds])
    readout = read_images(evaluator, pictures)
    alike = likeness(readout, subject)
    plain = np.tile(np.arange(len(prompts)) < len(PLAIN_PROMPTS), len(seeds))
    wanted = [dict(w) for _ in seeds for w in ([{}] * len(PLAIN_PROMPTS) + [w for _, w in EDIT_PROMPTS])]
    realised = editability(readout, wanted)
    per_prompt = {}
    for j, text in enumerate(edit_texts):
        index = [k * len(prompts) + len(PLAIN_PROMPTS) + j for k in range(len(seeds))]
        per_prompt[text] = float(np.mean(realised[index]))
    scores = Scores(
        likeness=float(alike.mean()),
        likeness_plain=float(alike[plain].mean()),
        editability=float(np.nanmean(realised)),
        per_prompt=per_prompt,
    )
    return scores, pictures


def stated_attribute_rate(
    model: Model, evaluator: Evaluator, count: int = 24, seed: int = 0, **sampling: object
) -> tuple[float, dict[str, float]]:
    """Captions over the named attributes (class words as subjects), generated once each: the fraction of stated
    attributes the evaluator finds, overall and per attribute."""
    rng = np.random.default_rng([seed, 77])
    captions, wanted = [], []
    for _ in range(count):
        person = world.anonymous_subject(rng)
        text, stated = world.describe(world.random_variable(rng), world.CLASS_WORDS[0], person, rng, 0.7, 0.6)
        if not stated:  # nothing to check in a bare caption: state the scene
            text, stated = text + " in the snow", {"scene": "snow"}
        captions.append(text)
        wanted.append(stated)
    pictures = generate(model, captions, seed=seed, **sampling)
    readout = read_images(evaluator, pictures)
    found: dict[str, list[bool]] = {}
    for i, stated in enumerate(wanted):
        for attribute, value in stated.items():
            found.setdefault(attribute, []).append(readout.named[attribute][i] == value)
    every = [hit for hits in found.values() for hit in hits]
    return float(np.mean(every)), {attr: float(np.mean(hits)) for attr, hits in sorted(found.items())}


def summarise(rows: Sequence[Mapping[str, object]], key: str) -> tuple[float, float, int]:
    """(mean, standard deviation, count) of rows[key]."""
    values = np.array([float(r[key]) for r in rows])
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values)
