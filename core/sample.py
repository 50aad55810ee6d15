"""Generate pictures from a loaded diffusers-backend model: deterministic DDIM with classifier-free guidance.

The pack's images come from ComfyUI's samplers; this small sampler is for the CLI and the likeness lab, where no
ComfyUI runs. Identity rows go in through the same text-encoder splice as in training, so what is generated here is
what the trained identity means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .protocols import Conditioning, Model, condition

if TYPE_CHECKING:
    from .identity import Identity
    from .sefi import StagedRows


def ddim_timesteps(steps: int, train_steps: int = 1000, spacing: str = "leading") -> list[int]:
    """The DDIM timesteps from the noisiest down: SD's "leading" spacing with offset 1 (from 961 of 1000 at 25 steps),
    or "trailing" (from the last step, 999: what a zero-terminal-SNR schedule needs, Lin et al. 2023)."""
    if spacing == "trailing":
        return [round(train_steps - i * train_steps / steps) - 1 for i in range(steps)]
    if spacing != "leading":
        raise InputError(f"sampling: timestep spacing '{spacing}' is not supported; the sampler knows leading and trailing")
    ratio = train_steps // steps
    return [i * ratio + 1 for i in range(steps)][::-1]


def epsilon_and_x0(
    prediction: torch.Tensor, x: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(epsilon, x0) from a model output of either prediction type."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "v_prediction":
        x0 = a * x - s * prediction
        return a * prediction + s * x, x0
    return prediction, (x - s * prediction) / a


@torch.no_grad()
def generate(
    model: Model,
    prompts: Sequence[str],
    rows: Mapping[str, torch.Tensor] | None = None,
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    resolution: int = 32,
    staged: StagedRows | None = None,
) -> np.ndarray:
    """Pictures (N, H, W, 3) uint8 for prompts; rows (the identity's rows per encoder key) fill each prompt's SLOT,
    or, for a per-stage identity, staged does: each step's keys and values come from its timestep's stage.

    The noise comes from a CPU generator seeded with seed, so a seed gives the same pictures on every machine type up
    to float rounding. guidance 1 turns classifier-free guidance off (no unconditional pass).
    """
    if not 1 <= steps <= 500 or guidance < 0:
        raise InputError(f"sampling: steps must be 1 to 500 and guidance >= 0 (got {steps} and {guidance})")
    denoiser = model.denoiser
    unet, vae = getattr(denoiser, "unet", None), getattr(denoiser, "vae", None)
    if unet is None or vae is None:
        raise InputError("sampling: this sampler needs a diffusers-backend model (a folder, a file or a built-in)")
    device = denoiser.device
    dtype = next(unet.parameters()).dtype
    scale = denoiser.vae_scale
    channels = int(unet.config.in_channels)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((len(prompts), channels, resolution // scale, resolution // scale), generator=generator)
    x = x.to(device=device, dtype=torch.float32)
    if staged is not None and rows is not None:
        raise InputError("sampling: give an identity's rows or its per-stage rows, not both")
    cond = condition(model, list(prompts), rows) if staged is None else None
    by_stage: dict[int, Conditioning] = {}
    guided = guidance != 1.0
    if guided:
        empty = condition(model, [""] * len(prompts), None)
    abar_table = denoiser.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    spacing = str(getattr(denoiser.scheduler.config, "timestep_spacing", "leading"))
    schedule = ddim_timesteps(steps, denoiser.num_train_timesteps, spacing)
    for i, t in enumerate(schedule):
        timesteps = torch.full((len(prompts),), t, device=device, dtype=torch.long)
        if staged is not None:
            stage = int(staged.schedule.stage_of(timesteps[:1])[0])
            if stage not in by_stage:
                by_stage[stage] = staged.condition(model, list(prompts), timesteps)
            cond = by_stage[stage]
        prediction = denoiser.predict(x.to(dtype), timesteps, cond).float()
        if guided:
            unconditional = denoiser.predict(x.to(dtype), timesteps, empty).float()
            prediction = unconditional + guidance * (prediction - unconditional)
        abar = abar_table[t]
        abar_next = abar_table[schedule[i + 1]] if i + 1 < len(schedule) else torch.ones((), device=device)
        eps, x0 = epsilon_and_x0(prediction, x, abar, denoiser.prediction_type)
        x = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps
    vae_dtype = next(vae.parameters()).dtype
    pixels = vae.decode((x / denoiser.scaling_factor).to(vae_dtype)).sample.float()
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def generate_identity(model: Model, prompts: Sequence[str], identity: Identity, **sampling: object) -> np.ndarray:
    """Pictures of prompts whose SLOT is the identity: its rows, or stage by stage for a per-stage identity."""
    device = model.denoiser.device
    if identity.is_staged:
        from .sefi import StagedRows

        identity.schedule.check_covers(model.denoiser.num_train_timesteps)
        stages = {enc.key: identity.stage_rows_for(enc.key, enc.width).to(device) for enc in model.encoders}
        return generate(model, prompts, staged=StagedRows(stages, identity.schedule), **sampling)
    rows = {enc.key: identity.rows_for(enc.key, enc.width).to(device) for enc in model.encoders}
    return generate(model, prompts, rows, **sampling)


SHEET_TILE = 96  # px per picture on a sample sheet (small pictures are enlarged without smoothing)
SHEET_LABEL = 18  # px of label above each row


def sample_sheet(
    rows: Sequence[tuple[str, Sequence[np.ndarray]]], notes: Sequence[str] = (), tile: int = SHEET_TILE
) -> Image.Image:
    """Rows of labelled pictures (label, [H, W, 3] uint8 ...) on one white sheet, each picture tile x tile, and lines
    of notes below them."""
    from PIL import ImageDraw

    from .plot import BACKGROUND, TEXT_COLOUR, default_font

    columns = max((len(pictures) for _, pictures in rows), default=1)
    height = len(rows) * (tile + SHEET_LABEL) + 4 + len(notes) * SHEET_LABEL
    sheet = Image.new("RGB", (columns * tile + 8, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = default_font(12)
    for r, (label, pictures) in enumerate(rows):
        top = r * (tile + SHEET_LABEL)
        draw.text((4, top + 3), label, fill=TEXT_COLOUR, font=font)
        for c, picture in enumerate(pictures):
            small = Image.fromarray(np.asarray(picture, dtype=np.uint8))
            resample = Image.NEAREST if small.width <= tile else Image.LANCZOS
            sheet.paste(small.resize((tile, tile), resample), (4 + c * tile, top + SHEET_LABEL))
    for i, note in enumerate(notes):
        draw.text((4, len(rows) * (tile + SHEET_LABEL) + 4 + i * SHEET_LABEL), note, fill=TEXT_COLOUR, font=font)
    return sheet
