"""How much a lab model's loss depends on a caption's words: the loss with the right hair colour (or scene) in the
caption against the same caption with a wrong one, on the same noisy latents, per timestep.

    python -m benchmarks.lab_caption_gain [--model lab | FOLDER] [--pictures 48] [--timesteps 999 950 850 600]

0% means the model ignores those words at that noise level (docs/LIKENESS.md: hair colour was 0.00% at every step
on the first lab model, while the scene was 89% at t = 950).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.lab import world
from core.models import load_model
from core.protocols import Model, condition


def _other(values: Sequence[str], value: str, shift: int) -> str:
    """Another value of the list, shift places on."""
    return values[(values.index(value) + shift) % len(values)]


@torch.no_grad()
def caption_gains(model: Model, pictures: int = 48, timesteps: Sequence[int] = (999, 950, 850, 600), seed: int = 5) -> dict:
    """{timestep: {"hair": %, "scene": %}}: the relative loss increase when the caption names a wrong value."""
    rng = np.random.default_rng(seed)
    subjects = [world.anonymous_subject(rng) for _ in range(pictures)]
    variables = [world.random_variable(rng) for _ in range(pictures)]
    images = np.stack([world.render(s, v, rng) for s, v in zip(subjects, variables)])
    denoiser = model.denoiser
    latents, _std = denoiser.encode_pixels(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    hairs, scenes = list(world.HAIR_COLOURS), list(world.NAMED_ATTRIBUTES["scene"])

    def scene(value: str) -> str:
        return world.PHRASES["scene"][value][0]

    pairs = {
        "hair": ([f"a photo of a person with {s.hair} hair" for s in subjects],
                 [f"a photo of a person with {_other(hairs, s.hair, 3)} hair" for s in subjects]),
        "scene": ([f"a photo of a person {scene(v['scene'])}" for v in variables],
                  [f"a photo of a person {scene(_other(scenes, v['scene'], 2))}" for v in variables]),
    }  # fmt: skip
    conds = {name: (condition(model, right, None), condition(model, wrong, None)) for name, (right, wrong) in pairs.items()}
    generator = torch.Generator().manual_seed(0)
    gains: dict = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        steps = torch.full((pictures,), int(t), device=latents.device)
        noisy, target = denoiser.add_noise(latents, noise, steps), denoiser.target(latents, noise, steps)
        gains[int(t)] = {}
        for name, (right, wrong) in conds.items():
            loss_right = F.mse_loss(denoiser.predict(noisy, steps, right).float(), target).item()
            loss_wrong = F.mse_loss(denoiser.predict(noisy, steps, wrong).float(), target).item()
            gains[int(t)][name] = 100 * (loss_wrong - loss_right) / loss_right
    return gains


def main(argv: Sequence[str] | None = None) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lab_caption_gain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lab", help="'lab' or a lab model folder")
    parser.add_argument("--pictures", type=int, default=48)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 950, 850, 600])
    args = parser.parse_args(argv)
    model = load_model(args.model, torch.device("cpu"))
    print(f"{model.name} ({model.denoiser.prediction_type}): loss increase with a wrong word in the caption")
    for t, gain in caption_gains(model, args.pictures, args.timesteps).items():
        print(f"t = {t:4d}: hair colour {gain['hair']:6.2f}%   scene {gain['scene']:7.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
