"""The lab's vision tower: a tiny CLIP vision transformer (transformers' CLIPVisionModel) that the pack pretrains on
the lab world, for the identity encoder to read (core.encoders), the way real encoders read a CLIP ViT-L/14.

Sizes (VisionTowerSpec): 32 px input, patch 4 (64 patches + the class token), width 64, 4 layers, 4 heads.
Recipe: contrastive (InfoNCE, temperature 0.1) over two renders of each of `batch` people per step (another pose,
expression, glasses, scene), on the projected class token; the people come from a pool of `people` random anonymous
ones with `renders` pictures each (drawn like pretraining's anonymous people, so never a held-out or the sample
subject; rendered once, as rendering costs more than a step). It sees no captions and no trait labels: what it learns is
what stays the same across two pictures of one person, as a face-recognition network does.
Weights: core/lab/data/vision_tower (config.json + model.safetensors, fp16) and its recipe in vision.json;
`python -m core.lab.vision --steps N --out FOLDER` rebuilds them from a seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..encoders.vision import TransformersTower, load_transformers_tower, preprocess
from ..errors import InputError
from . import world

FOLDER = Path(__file__).parent / "data" / "vision_tower"
# The identity encoder the pack trains for the lab model on this tower (`python -m core train-encoder`, recipe in its
# metadata); `--encoder lab` on the command line.
LAB_ENCODER = Path(__file__).parent / "data" / "encoder.safetensors"
NAME = "lab-vit"
RECIPE = "vision.json"


@dataclass(frozen=True)
class VisionTowerSpec:
    """The lab tower's sizes."""

    image_size: int = world.SIZE
    patch_size: int = 4
    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    projection: int = 64


@dataclass(frozen=True)
class VisionTrainConfig:
    """The tower's training recipe."""

    steps: int = 1200
    batch: int = 96  # people per step (two renders each)
    people: int = 3000
    renders: int = 4
    learning_rate: float = 1e-3
    warmup: int = 100
    temperature: float = 0.1
    seed: int = 0


def build_tower(spec: VisionTowerSpec = VisionTowerSpec(), seed: int = 0) -> torch.nn.Module:
    """A fresh CLIPVisionModelWithProjection of the spec's sizes (random weights, the same for a seed)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=4 * spec.hidden_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.projection,
        hidden_act="quick_gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(config)


def render_pool(config: VisionTrainConfig) -> np.ndarray:
    """(people, renders, 32, 32, 3) uint8: each random anonymous person in renders random variations."""
    rng = np.random.default_rng([config.seed, 31])
    pool = np.empty((config.people, config.renders, world.SIZE, world.SIZE, 3), np.uint8)
    for i in range(config.people):
        person = world.anonymous_subject(rng)
        for j in range(config.renders):
            pool[i, j] = world.render(person, world.random_variable(rng), rng)
    return pool


def pair_batch(pool: np.ndarray, config: VisionTrainConfig, step: int) -> np.ndarray:
    """(2 x batch, 32, 32, 3): two different renders of each of batch people of the pool, A's then B's."""
    rng = np.random.default_rng([config.seed, 37, step])
    people = rng.choice(pool.shape[0], size=config.batch, replace=False)
    first = rng.integers(pool.shape[1], size=config.batch)
    second = (first + rng.integers(1, pool.shape[1], size=config.batch)) % pool.shape[1]
    return np.concatenate([pool[people, first], pool[people, second]])


def _pixels(images: np.ndarray, tower: TransformersTower) -> torch.Tensor:
    """uint8 pictures as the tower's normalised input."""
    return preprocess(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, tower.spec)


def contrastive_loss(embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of the first half matches row i of the second half."""
    half = embeddings.shape[0] // 2
    unit = F.normalize(embeddings, dim=-1)
    logits = unit[:half] @ unit[half:].T / temperature
    labels = torch.arange(half)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _learning_rate(config: VisionTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup:
        return config.learning_rate * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def train_tower(config: VisionTrainConfig, spec: VisionTowerSpec = VisionTowerSpec(), log_every: int = 100):  # noqa: ANN201
    """Train the tower; (model, record of losses)."""
    model = build_tower(spec, config.seed)
    tower = TransformersTower(model.vision_model, NAME)
    model.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.05)
    started = time.perf_counter()
    pool = render_pool(config)
    render_seconds = time.perf_counter() - started
    losses = []
    for step in range(config.steps):
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(config, step)
        pixels = _pixels(pair_batch(pool, config, step), tower)
        loss = contrastive_loss(model(pixel_values=pixels).image_embeds, config.temperature)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{config.steps} loss {np.mean(losses[-log_every:]):.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    return model.eval(), {"losses_every_100": [round(float(np.mean(losses[i:i + 100])), 4)
                                                for i in range(0, len(losses), 100)],
                          "seconds": round(time.perf_counter() - started, 1),
                          "render_seconds": round(render_seconds, 1)}


@torch.no_grad()
def retrieval_accuracy(tower: TransformersTower, subjects: Sequence[world.Subject], seed: int = 0) -> float:
    """Top-1: for each subject's render A, is its own render B the nearest (cosine, last layer's class token) among
    every subject's B? Chance is 1 / len(subjects)."""
    rng = np.random.default_rng([seed, 41])
    first = np.stack([world.render(s, world.random_variable(rng), rng) for s in subjects])
    second = np.stack([world.render(s, world.random_variable(rng), rng) for s in subjects])
    states = [tower.hidden_states(_pixels(x, tower), [tower.spec.layers])[0][:, 0] for x in (first, second)]
    a, b = (F.normalize(s, dim=-1) for s in states)
    return float(((a @ b.T).argmax(dim=1) == torch.arange(len(subjects))).float().mean())


def save_tower(model: torch.nn.Module, folder: Path, recipe: dict, overwrite: bool = False) -> Path:
    """Write the vision part as a CLIPVisionModel folder in fp16, with the recipe."""
    from transformers import CLIPVisionModel

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise InputError(f"--out: {folder} is not empty; pass --overwrite or choose another folder")
    plain = CLIPVisionModel(model.config)
    getattr(plain, "vision_model", plain).load_state_dict(model.vision_model.state_dict())  # transformers 5 flattened it
    plain.half().save_pretrained(folder, safe_serialization=True)
    (folder / RECIPE).write_text(json.dumps(recipe, indent=1) + "\n")
    return folder


def load_tower(folder: Path = FOLDER) -> TransformersTower:
    """The lab's shipped vision tower (fp16 weights, computed in float32)."""
    tower = load_transformers_tower(folder, NAME)
    tower.model.float()
    return tower


def main(argv: Sequence[str] | None = None) -> int:
    """Train and save the lab's vision tower."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=VisionTrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=FOLDER)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    config = VisionTrainConfig(steps=args.steps, seed=args.seed)
    model, record = train_tower(config)
    tower = TransformersTower(model.vision_model, NAME)
    held_out = world.held_out_subjects(32)
    accuracy = retrieval_accuracy(tower, held_out)
    recipe = {"spec": asdict(VisionTowerSpec()), "config": asdict(config), **record,
              "held_out_retrieval_top1": round(accuracy, 3), "chance": round(1 / len(held_out), 3),
              "command": "python -m core.lab.vision " + " ".join(sys.argv[1:] if argv is None else argv)}
    save_tower(model, args.out, recipe, overwrite=args.overwrite)
    print(f"held-out retrieval top-1 {accuracy:.3f} (chance {1 / len(held_out):.3f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
