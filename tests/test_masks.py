"""Mask-weighted training loss and the tensor-batch checks the ComfyUI nodes rely on."""

from __future__ import annotations

import pytest
import torch

from core.errors import InputError
from core.images import check_masks, fit_tensor, join_batches
from core.protocols import Conditioning, Model
from core.trainer import Batch, Trainer, preset_config

REG = 0.5  # large, so that a loss that drops the regulariser is told apart


def test_join_batches_refuses_mixed_sizes_naming_both() -> None:
    with pytest.raises(InputError, match=r"images: .*64x48 and 32x32"):
        join_batches([torch.zeros(1, 48, 64, 3), torch.zeros(2, 32, 32, 3)], "images")
    assert join_batches([torch.zeros(1, 8, 8, 3), torch.ones(2, 8, 8, 3)], "images").shape == (3, 8, 8, 3)


def test_fit_tensor_resizes_short_side_and_crops_centre() -> None:
    batch = torch.zeros(1, 3, 40, 80)
    batch[..., :, 30:50] = 1.0  # a centred stripe survives the crop
    out = fit_tensor(batch, 16)
    assert out.shape == (1, 3, 16, 16)
    assert out[..., 8].mean() > 0.9 and out[..., 0].mean() < 0.1
    assert fit_tensor(batch, 0) is batch


def test_check_masks_size_count_and_emptiness() -> None:
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(InputError, match=r"mask: it is 16x16 but the images are 32x32"):
        check_masks(torch.ones(1, 16, 16), images)
    with pytest.raises(InputError, match=r"mask: got 3 masks for 2 images"):
        check_masks(torch.ones(3, 32, 32), images)
    with pytest.raises(InputError, match="mask: a mask is empty"):
        check_masks(torch.zeros(1, 32, 32), images)
    assert check_masks(torch.ones(1, 32, 32), images).shape == (2, 1, 32, 32)


def _masked_trainer(model: Model, images: torch.Tensor, masks: torch.Tensor, flip_p: float) -> Trainer:
    """A Cross-Init trainer with masks, a large reg_weight, and rows moved away from their start."""
    config = preset_config("cross_init_fast", batch_size=2, resolution=64, seed=3, flip_p=flip_p, reg_weight=REG)
    trainer = Trainer(model, images, config, masks=masks)
    with torch.no_grad():
        for rows in trainer.rows.values():
            rows.add_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(2)))
    return trainer


def _penalty(trainer: Trainer) -> float:
    """REG times the mean over rows of ||v - v_init + 1e-6||, written out independently of the trainer."""
    diff = trainer.rows["clip_l"].detach() - trainer.init_rows["clip_l"] + 1e-6
    return REG * float(diff.pow(2).sum(dim=1).sqrt().mean())


def _loss_with_bump(trainer: Trainer, batch: Batch, bump: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The trainer's loss when the UNet's prediction is shifted by bump, and the unshifted prediction."""
    denoiser = trainer.model.denoiser
    real_predict = denoiser.predict
    seen: list[torch.Tensor] = []

    def shifted(noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        seen.append(real_predict(noisy, timesteps, cond))
        return seen[-1] + bump

    denoiser.predict = shifted
    try:
        with torch.no_grad():
            return float(trainer.loss(batch)), seen[0]
    finally:
        del denoiser.predict  # back to the class's method


@pytest.mark.parametrize(("flip_p", "inside"), [(0.0, slice(0, 4)), (1.0, slice(4, 8))], ids=["plain", "mirrored"])
def test_mask_weights_the_loss_towards_the_masked_region(
    sd1_model: Model, images: torch.Tensor, flip_p: float, inside: slice
) -> None:
    """A left-half mask: the loss ignores errors outside it and is their mean inside it, plus the regulariser."""
    left = torch.zeros(2, 1, 64, 64)
    left[..., :32] = 1.0  # latent columns 0..3; a mirrored image (flip_p 1) gets the mirrored mask, columns 4..7
    masked = _masked_trainer(sd1_model, images, left, flip_p)
    batch = masked.sample_batch()
    assert torch.equal(Trainer(sd1_model, images, masked.config).sample_batch().latents, batch.latents)  # no extra draws
    outside = torch.ones(1, 1, 8, 8)
    outside[..., inside] = 0.0
    base, pred = _loss_with_bump(masked, batch, torch.zeros(()))
    far_off_outside, _ = _loss_with_bump(masked, batch, 100.0 * outside)
    off_by_one_inside, _ = _loss_with_bump(masked, batch, 1.0 - outside)
    penalty = _penalty(masked)
    assert penalty > 0.1
    # the tiny SD1 model predicts epsilon, so the target is the noise
    expected = float(((pred - batch.noise) ** 2)[..., inside].mean()) + penalty
    assert abs(base - expected) < 1e-5 * expected, (base, expected)
    assert abs(far_off_outside - base) < 1e-5 * base, (far_off_outside, base)
    shifted = float(((pred + 1.0 - batch.noise) ** 2)[..., inside].mean()) + penalty
    assert abs(off_by_one_inside - shifted) < 1e-5 * shifted, (off_by_one_inside, shifted)
