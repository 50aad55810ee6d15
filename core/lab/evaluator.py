"""The likeness lab's evaluator: a small CNN that reads a 32 px world picture's named attributes and unnamed identity
traits, trained on fresh renders of random subjects (ground truth is known), and the lab's two scores built on it.

- *likeness* (`likeness`, `likeness_to_images`): 1 minus the mean per-trait distance between the identity traits read
  from an image and the reference's, in [0, 1]. Continuous traits count |a - b| (both in the world's [0, 1] encoding),
  discrete traits (hair_style, mark_place, pattern_kind) 0 for the same level and 1 for another; mark_hue counts only
  when both sides have a mark. Two random subjects score about 0.5, renders of one subject about 0.97.
- *editability* (`editability`): the fraction of a prompt's stated named attributes (hair, eyes, glasses, expression,
  scene, pose) that the evaluator reads in the image.

Weights: core/lab/data/evaluator.safetensors (safetensors only, never pickle), recipe and accuracies in evaluator.json
next to it; `python -m core.lab.evaluator --train --steps N --out PATH --report` rebuilds them from a seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..files import atomic_write, check_output_path
from .world import (
    NAMED_ATTRIBUTES,
    SIZE,
    TRAIT_LEVELS,
    TRAIT_NAMES,
    Subject,
    held_out_subjects,
    random_subject,
    random_variable,
    render,
)

DEFAULT_PATH = Path(__file__).parent / "data" / "evaluator.safetensors"
FORMAT = "identity-tokens-lab-evaluator/1"  # the safetensors metadata "format" of an evaluator file
DISCRETE_TRAITS: tuple[str, ...] = tuple(TRAIT_LEVELS)  # hair_style, mark_place, pattern_kind
CONTINUOUS_TRAITS: tuple[str, ...] = tuple(t for t in TRAIT_NAMES if t not in TRAIT_LEVELS)
CLASS_HEADS: dict[str, tuple[str, ...]] = {**NAMED_ATTRIBUTES, **TRAIT_LEVELS}  # one softmax head each
MARK_HUE = TRAIT_NAMES.index("mark_hue")
TRAIN_STREAM, EVAL_STREAM = 0, 1  # seed-sequence spawn keys: training and held-out renders never share a stream
# Training augmentation, so that soft generated pictures still read: half the renders blended with their blur by a
# uniform amount (see soften), then Gaussian pixel noise of std uniform in [0, NOISE_MAX] levels.
BLUR_PROBABILITY = 0.5
NOISE_MAX = 8.0
REPORT_SOFTNESS = 0.5  # the report also reads the held-out renders softened this much
REGRESSION_WEIGHT = 10.0  # the L1 loss of the continuous traits against the summed cross-entropies


# --- the network --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluatorSpec:
    """The evaluator's sizes: conv widths at 32, 16 and 8 px (one conv, two, one; 2x2 max-pool after each stage) and
    the hidden layer over the flattened 4 x 4 map (kept spatial, so positions such as the pose's shift survive)."""

    channels: tuple[int, int, int] = (24, 48, 64)
    hidden: int = 128


def _conv(cin: int, cout: int) -> list[nn.Module]:
    """A 3x3 conv, batch norm and ReLU."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Evaluator(nn.Module):
    """A small CNN reading a picture's named attributes and discrete traits (logits) and continuous traits."""

    def __init__(self, spec: EvaluatorSpec = EvaluatorSpec()) -> None:
        """Build the layers of spec; the heads follow the world's attributes and traits."""
        super().__init__()
        self.spec = spec
        a, b, c = spec.channels
        self.features = nn.Sequential(
            *_conv(3, a), nn.MaxPool2d(2), *_conv(a, b), *_conv(b, b), nn.MaxPool2d(2), *_conv(b, c), nn.MaxPool2d(2)
        )
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(c * (SIZE // 8) ** 2, spec.hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(spec.hidden, len(levels)) for name, levels in CLASS_HEADS.items()})
        self.regression = nn.Linear(spec.hidden, len(CONTINUOUS_TRAITS))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per class head and "continuous" (N, len(CONTINUOUS_TRAITS)) for (N, 3, 32, 32) pixels in [0, 1]."""
        hidden = self.trunk(self.features((pixels - 0.5) / 0.25))
        out = {name: head(hidden) for name, head in self.heads.items()}
        out["continuous"] = self.regression(hidden)
        return out


def parameter_count(evaluator: Evaluator) -> int:
    """The number of trained parameters."""
    return sum(p.numel() for p in evaluator.parameters())


def to_pixels(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, 32, 32, 3) uint8 images as a (N, 3, 32, 32) float tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


def _check_images(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """images as one (N, 32, 32, 3) uint8 array; InputError naming the shape otherwise."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != (SIZE, SIZE, 3) or array.dtype != np.uint8:
        raise InputError(
            f"images: need (N, {SIZE}, {SIZE}, 3) uint8 pictures of the lab world, got {array.shape} {array.dtype}"
        )
    return array


# --- weights ------------------------------------------------------------------------------------------------------


def recipe_path(weights_path: Path) -> Path:
    """The recipe JSON next to a weights file."""
    return Path(weights_path).with_suffix(".json")


def save_evaluator(evaluator: Evaluator, path: Path, overwrite: bool = True) -> Path:
    """Write the weights and the spec (safetensors metadata) atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in evaluator.state_dict().items()}
    metadata = {"format": FORMAT, "spec": json.dumps(asdict(evaluator.spec)), "heads": json.dumps(head_names())}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite)


def head_names() -> dict[str, list[str]]:
    """Every head and its classes; continuous traits listed under "continuous"."""
    return {**{name: list(levels) for name, levels in CLASS_HEADS.items()}, "continuous": list(CONTINUOUS_TRAITS)}


def load_evaluator(path: Path | str = DEFAULT_PATH) -> Evaluator:
    """The evaluator in a safetensors file, on the CPU in eval mode; InputError if missing or not an evaluator."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"evaluator {path}: not found; train one with python -m core.lab.evaluator --train --out {path}"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as error:  # safetensors raises its own error type for damaged headers
        raise InputError(f"evaluator {path}: not a readable .safetensors file ({error}); train it again") from error
    if metadata.get("format") != FORMAT or json.loads(metadata.get("heads", "null")) != head_names():
        raise InputError(f"evaluator {path}: not an evaluator of this world ({FORMAT}); train it again")
    spec = json.loads(metadata["spec"])
    evaluator = Evaluator(EvaluatorSpec(channels=tuple(spec["channels"]), hidden=int(spec["hidden"])))
    evaluator.load_state_dict(tensors, strict=True)
    return evaluator.eval()


# --- reading ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Readout:
    """What the evaluator reads in N images.

    named: attribute -> N values; levels: discrete trait -> N level names; traits: (N, len(TRAIT_NAMES)) in the
    world's [0, 1] encoding (discrete traits at their level's middle, continuous ones clipped to [0, 1]; mark_hue is
    meaningless where no mark is read); probabilities: class head -> (N, classes) softmax.
    """

    named: dict[str, list[str]]
    levels: dict[str, list[str]]
    traits: np.ndarray
    probabilities: dict[str, np.ndarray]

    def __len__(self) -> int:
        """The number of images read."""
        return len(self.traits)

    def take(self, index: slice | Sequence[int] | np.ndarray) -> Readout:
        """The readout of some of the images (a slice, indices or a bool mask)."""
        rows = np.arange(len(self))[index]
        return Readout(
            named={k: [v[i] for i in rows] for k, v in self.named.items()},
            levels={k: [v[i] for i in rows] for k, v in self.levels.items()},
            traits=self.traits[rows],
            probabilities={k: v[rows] for k, v in self.probabilities.items()},
        )

    def has_mark(self) -> np.ndarray:
        """(N,) bool: a mark was read."""
        return np.array([place != "none" for place in self.levels["mark_place"]])


def read_images(evaluator: Evaluator, images: np.ndarray | Sequence[np.ndarray], batch: int = 256) -> Readout:
    """Read the named attributes and identity traits of (N, 32, 32, 3) uint8 images."""
    images = _check_images(images)
    device = next(evaluator.parameters()).device
    was_training = evaluator.training
    evaluator.eval()
    chunks: list[dict[str, np.ndarray]] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            out = evaluator(to_pixels(images[start : start + batch], device))
            chunk = {name: F.softmax(out[name], dim=1).cpu().numpy() for name in CLASS_HEADS}
            chunk["continuous"] = out["continuous"].cpu().numpy()
            chunks.append(chunk)
    evaluator.train(was_training)
    outputs = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]} if chunks else _empty_outputs()
    return _readout(outputs)


def _empty_outputs() -> dict[str, np.ndarray]:
    """Zero-image outputs of every head."""
    outputs = {name: np.zeros((0, len(levels)), np.float32) for name, levels in CLASS_HEADS.items()}
    outputs["continuous"] = np.zeros((0, len(CONTINUOUS_TRAITS)), np.float32)
    return outputs


def _readout(outputs: Mapping[str, np.ndarray]) -> Readout:
    """A Readout from softmax probabilities per class head and the raw continuous predictions."""
    picks = {name: [CLASS_HEADS[name][i] for i in np.argmax(outputs[name], axis=1)] for name in CLASS_HEADS}
    traits = np.zeros((len(outputs["continuous"]), len(TRAIT_NAMES)))
    for j, trait_name in enumerate(CONTINUOUS_TRAITS):
        traits[:, TRAIT_NAMES.index(trait_name)] = np.clip(outputs["continuous"][:, j], 0.0, 1.0)
    for trait_name, levels in TRAIT_LEVELS.items():
        traits[:, TRAIT_NAMES.index(trait_name)] = (np.argmax(outputs[trait_name], axis=1) + 0.5) / len(levels)
    return Readout(
        named={name: picks[name] for name in NAMED_ATTRIBUTES},
        levels={name: picks[name] for name in TRAIT_LEVELS},
        traits=traits,
        probabilities={name: np.asarray(outputs[name]) for name in CLASS_HEADS},
    )


# --- scores -------------------------------------------------------------------------------------------------------


def _level_indices(traits: np.ndarray, trait_name: str) -> np.ndarray:
    """The level index of a discrete trait in (..., T) trait vectors."""
    count = len(TRAIT_LEVELS[trait_name])
    return np.minimum((traits[..., TRAIT_NAMES.index(trait_name)] * count).astype(int), count - 1)


def trait_likeness(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - mean per-trait distance of (..., T) trait vectors a and b (broadcast): |a - b| for continuous traits,
    0/1 for the same/another level of discrete ones, mark_hue only where both have a mark. In [0, 1]."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    total = np.zeros(a.shape[:-1])
    for trait_name in DISCRETE_TRAITS:
        total += _level_indices(a, trait_name) != _level_indices(b, trait_name)
    both_marked = (_level_indices(a, "mark_place") != 0) & (_level_indices(b, "mark_place") != 0)
    for trait_name in CONTINUOUS_TRAITS:
        j = TRAIT_NAMES.index(trait_name)
        distance = np.abs(a[..., j] - b[..., j])
        total += np.where(both_marked, distance, 0.0) if j == MARK_HUE else distance
    counted = len(DISCRETE_TRAITS) + len(CONTINUOUS_TRAITS) - 1 + both_marked
    return 1.0 - total / counted


def likeness(readout: Readout, reference: Subject | np.ndarray) -> np.ndarray:
    """(N,) likeness in [0, 1] of each read image's identity traits to a reference subject (or (T,) / (N, T) traits)."""
    traits = reference.traits if isinstance(reference, Subject) else np.asarray(reference, dtype=np.float64)
    if traits.shape[-1:] != (len(TRAIT_NAMES),) or traits.ndim > 2:
        raise InputError(f"reference: need a Subject or ({len(TRAIT_NAMES)},) / (N, {len(TRAIT_NAMES)}) traits")
    return trait_likeness(readout.traits, traits)


def likeness_to_images(readout: Readout, reference_readout: Readout) -> np.ndarray:
    """(N,) likeness of each read image to the reference images: the mean of its likeness to each reference reading."""
    if len(reference_readout) == 0:
        raise InputError("reference images: none were read; give at least one reference picture")
    return trait_likeness(readout.traits[:, None, :], reference_readout.traits[None, :, :]).mean(axis=1)


def editability(readout: Readout, wanted: Sequence[Mapping[str, str]] | Mapping[str, str]) -> np.ndarray:
    """(N,) fraction of each image's wanted named attributes (e.g. {"glasses": "with", "scene": "beach"}) read in it;
    one mapping applies to every image; NaN where nothing is wanted."""
    wanted_list = [wanted] * len(readout) if isinstance(wanted, Mapping) else list(wanted)
    if len(wanted_list) != len(readout):
        raise InputError(f"wanted: {len(wanted_list)} attribute sets for {len(readout)} images; give one per image")
    scores = np.full(len(readout), np.nan)
    for i, stated in enumerate(wanted_list):
        for attribute, value in stated.items():
            if attribute not in NAMED_ATTRIBUTES or value not in NAMED_ATTRIBUTES[attribute]:
                raise InputError(f"wanted: {attribute}={value!r} is not a named attribute of the lab world")
        if stated:
            scores[i] = np.mean([readout.named[attr][i] == value for attr, value in stated.items()])
    return scores


# --- data ---------------------------------------------------------------------------------------------------------


def _stream(seed: int, stream: int) -> np.random.Generator:
    """An independent generator for one of the evaluator's seed streams."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def soften(image: np.ndarray, amount: float) -> np.ndarray:
    """(..., 32, 32, 3) pictures blended with their 5-point blur (each pixel and its 4 neighbours, edges repeated):
    amount 0 leaves them, 1 is the full blur. Float, not rounded."""
    image = np.asarray(image, dtype=np.float64)
    padded = np.pad(image, [(0, 0)] * (image.ndim - 3) + [(1, 1), (1, 1), (0, 0)], mode="edge")
    blur = padded[..., 1:-1, 1:-1, :] + padded[..., :-2, 1:-1, :] + padded[..., 2:, 1:-1, :]
    blur = (blur + padded[..., 1:-1, :-2, :] + padded[..., 1:-1, 2:, :]) / 5
    return image + amount * (blur - image)


def _augment(image: np.ndarray, rng: np.random.Generator, blur_probability: float, noise: float) -> np.ndarray:
    """A render softened (with blur_probability, by a uniform amount) and noised (std uniform in [0, noise])."""
    out = image.astype(np.float64)
    if blur_probability > 0 and rng.random() < blur_probability:
        out = soften(out, float(rng.random()))
    if noise > 0:
        out = out + rng.uniform(0, noise) * rng.standard_normal(out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def sample_batch(
    rng: np.random.Generator, count: int, blur_probability: float = 0.0, noise: float = 0.0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """count fresh jittered renders of random subjects and variable attributes (augmented as in _augment when
    blur_probability or noise is set); labels: class index per head, "traits" (count, T)."""
    images = np.zeros((count, SIZE, SIZE, 3), np.uint8)
    labels = {name: np.zeros(count, np.int64) for name in CLASS_HEADS}
    traits = np.zeros((count, len(TRAIT_NAMES)))
    for i in range(count):
        subject, variable = random_subject(rng), random_variable(rng)
        images[i] = _augment(render(subject, variable, rng), rng, blur_probability, noise)
        values = {**subject.intrinsic(), **variable, **{t: subject.level(t) for t in TRAIT_LEVELS}}
        for name, levels in CLASS_HEADS.items():
            labels[name][i] = levels.index(values[name])
        traits[i] = subject.traits
    labels["traits"] = traits
    return images, labels


def _loss(out: Mapping[str, torch.Tensor], labels: Mapping[str, np.ndarray]) -> torch.Tensor:
    """Summed cross-entropies of the class heads plus REGRESSION_WEIGHT x the mean L1 of the continuous traits
    (mark_hue masked where there is no mark)."""
    loss = sum(F.cross_entropy(out[name], torch.from_numpy(labels[name])) for name in CLASS_HEADS)
    traits = torch.from_numpy(labels["traits"]).float()
    target = traits[:, [TRAIT_NAMES.index(t) for t in CONTINUOUS_TRAITS]]
    mask = torch.ones_like(target)
    mask[:, CONTINUOUS_TRAITS.index("mark_hue")] = (torch.from_numpy(labels["mark_place"]) != 0).float()
    l1 = ((out["continuous"] - target).abs() * mask).sum() / mask.sum()
    return loss + REGRESSION_WEIGHT * l1


def _learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to peak, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# --- training and report ------------------------------------------------------------------------------------------


def train_evaluator(
    steps: int,
    seed: int = 0,
    out_path: Path | str = DEFAULT_PATH,
    batch: int = 64,
    lr: float = 3e-3,
    report_samples: int = 0,
    overwrite: bool = True,
    log_every: int = 0,
) -> dict:
    """Train an evaluator from seed on fresh renders, write its weights and recipe JSON (with held-out accuracies when
    report_samples > 0) atomically, and return the recipe."""
    if steps < 1 or batch < 2:
        raise InputError(f"steps/batch: need steps >= 1 and batch >= 2, got {steps} and {batch}")
    check_output_path(Path(out_path), overwrite)  # before training, not after it
    check_output_path(recipe_path(Path(out_path)), overwrite)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        evaluator = Evaluator()
    rng = _stream(seed, TRAIN_STREAM)
    warmup = min(200, max(1, steps // 10))
    optimiser = torch.optim.AdamW(evaluator.parameters(), lr=lr, weight_decay=1e-4)
    evaluator.train()
    started = time.perf_counter()
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(step, steps, lr, warmup)
        images, labels = sample_batch(rng, batch, BLUR_PROBABILITY, NOISE_MAX)
        loss = _loss(evaluator(to_pixels(images)), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} {time.perf_counter() - started:.0f}s", flush=True)
    seconds = time.perf_counter() - started
    evaluator.eval()
    recipe = {
        "format": FORMAT,
        "spec": asdict(evaluator.spec),
        "heads": head_names(),
        "parameters": parameter_count(evaluator),
        "steps": steps,
        "seed": seed,
        "batch": batch,
        "lr": lr,
        "schedule": f"AdamW (weight decay 1e-4), {warmup} warm-up steps then cosine to 0",
        "augmentation": {"blur_probability": BLUR_PROBABILITY, "noise_max": NOISE_MAX},
        "regression_weight": REGRESSION_WEIGHT,
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if report_samples > 0:
        recipe["report"] = report(evaluator, report_samples, seed=seed)
    out_path = save_evaluator(evaluator, Path(out_path), overwrite)
    recipe["file_bytes"] = out_path.stat().st_size
    text = json.dumps(recipe, indent=1) + "\n"
    atomic_write(recipe_path(out_path), lambda tmp: tmp.write_text(text), overwrite)
    return recipe


def _scores(readout: Readout, labels: Mapping[str, np.ndarray]) -> tuple[dict[str, float], dict[str, float]]:
    """(accuracy per class head, MAE per continuous trait; mark_hue over marked images only) against labels."""
    accuracy = {}
    for name, levels in CLASS_HEADS.items():
        picks = readout.named[name] if name in NAMED_ATTRIBUTES else readout.levels[name]
        accuracy[name] = float(np.mean(np.array([levels.index(p) for p in picks]) == labels[name]))
    mae = {}
    marked = labels["mark_place"] != 0
    for trait_name in CONTINUOUS_TRAITS:
        j = TRAIT_NAMES.index(trait_name)
        error = np.abs(readout.traits[:, j] - labels["traits"][:, j])
        mae[trait_name] = float(error[marked].mean() if trait_name == "mark_hue" else error.mean())
    return accuracy, mae


def report(evaluator: Evaluator, samples: int = 2000, seed: int = 0) -> dict:
    """Held-out accuracy per class head and MAE per continuous trait on fresh jittered renders (a stream training
    never draws), as rendered and softened by REPORT_SOFTNESS, with chance rates, and likeness of same vs different
    held-out subjects."""
    images, labels = sample_batch(_stream(seed, EVAL_STREAM), samples)
    accuracy, mae = _scores(read_images(evaluator, images), labels)
    soft = np.clip(np.rint(soften(images, REPORT_SOFTNESS)), 0, 255).astype(np.uint8)
    soft_accuracy, soft_mae = _scores(read_images(evaluator, soft), labels)
    return {
        "samples": samples,
        "accuracy": accuracy,
        "chance_accuracy": {name: 1.0 / len(levels) for name, levels in CLASS_HEADS.items()},
        "mae": mae,
        "chance_mae": 0.25,  # predicting 0.5 for a uniform trait
        "softened": {"amount": REPORT_SOFTNESS, "accuracy": soft_accuracy, "mae": soft_mae},
        "likeness": likeness_separation(evaluator, seed=seed),
    }


def likeness_separation(evaluator: Evaluator, subjects: int = 8, renders: int = 16, seed: int = 0) -> dict:
    """Mean likeness of renders of held-out subjects (random variable attributes) to their own and to others' traits,
    and to their own / others' other renders (likeness_to_images)."""
    people = held_out_subjects(subjects)
    rng = _stream(seed, EVAL_STREAM + 1)
    readouts = [read_images(evaluator, [render(p, random_variable(rng), rng) for _ in range(renders)]) for p in people]
    own = [likeness(r, p).mean() for r, p in zip(readouts, people)]
    other = [likeness(r, q).mean() for i, r in enumerate(readouts) for j, q in enumerate(people) if i != j]
    first, second = slice(0, renders // 2), slice(renders // 2, None)
    own_images = [likeness_to_images(r.take(second), r.take(first)).mean() for r in readouts]
    other_images = [
        likeness_to_images(r.take(second), s.take(first)).mean()
        for i, r in enumerate(readouts)
        for j, s in enumerate(readouts)
        if i != j
    ]
    return {
        "same_subject": float(np.mean(own)),
        "different_subject": float(np.mean(other)),
        "same_subject_images": float(np.mean(own_images)),
        "different_subject_images": float(np.mean(other_images)),
    }


def format_report(result: Mapping) -> str:
    """The report as a small text table."""
    soft = result["softened"]
    lines = [
        f"held-out renders: {result['samples']} (jittered, fresh subjects); 'soft': blended {soft['amount']} with a blur",
        "head            accuracy  soft    chance",
    ]
    for name, value in result["accuracy"].items():
        lines.append(f"{name:<15} {value:8.4f}  {soft['accuracy'][name]:6.4f}  {result['chance_accuracy'][name]:6.3f}")
    lines.append(f"trait           MAE       soft    chance {result['chance_mae']}")
    lines += [f"{name:<15} {value:8.4f}  {soft['mae'][name]:6.4f}" for name, value in result["mae"].items()]
    lines.append("likeness: " + ", ".join(f"{k} {v:.3f}" for k, v in result["likeness"].items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: train an evaluator and/or report its held-out accuracy."""
    parser = argparse.ArgumentParser(prog="python -m core.lab.evaluator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="train from the seed and write --out (+ its .json)")
    parser.add_argument("--report", action="store_true", help="print held-out accuracy per head (after --train)")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="the weights file (read by --report alone)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--report-samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (the recipe used 1)")
    args = parser.parse_args(argv)
    if not (args.train or args.report):
        parser.error("give --train, --report or both")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.train:
            samples = args.report_samples if args.report else 0
            recipe = train_evaluator(args.steps, args.seed, args.out, args.batch, args.lr, samples, log_every=100)
            print(f"evaluator: {args.out} ({recipe['file_bytes']} bytes) in {recipe['train_seconds']} s")
            if args.report:
                print(format_report(recipe["report"]))
        else:
            print(format_report(report(load_evaluator(args.out), args.report_samples, args.seed)))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
