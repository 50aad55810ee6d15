"""Mask-weighted training loss and the tensor-batch checks the ComfyUI nodes rely on."""

from __future__ import annotations

import pytest
import torch

from core.errors import InputError
from core.images import check_masks, fit_tensor, join_batches
from core.trainer import Trainer, preset_config


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


def test_mask_weights_the_loss_towards_the_masked_region(sd1_model, images: torch.Tensor) -> None:
    config = preset_config("cross_init_fast", batch_size=2, resolution=64, seed=3)
    left = torch.zeros(2, 1, 64, 64)
    left[..., :32] = 1.0
    plain = Trainer(sd1_model, images, config)
    masked = Trainer(sd1_model, images, config, masks=left)
    batch = masked.sample_batch()
    assert batch.weights is not None and batch.weights.shape == (2, 1, 8, 8)
    with torch.no_grad():
        plain_batch = plain.sample_batch()
        assert torch.equal(plain_batch.latents, batch.latents)  # masks draw no random numbers
        den = sd1_model.denoiser
        from core.protocols import condition

        cond = condition(sd1_model, batch.prompts, masked.rows)
        pred = den.predict(den.add_noise(batch.latents, batch.noise, batch.timesteps), batch.timesteps, cond)
        error = (pred - den.target(batch.latents, batch.noise, batch.timesteps)) ** 2
        w = batch.weights.expand_as(error)
        expected = (error * w).sum() / w.sum()
        assert torch.allclose(masked.loss(batch), expected, rtol=1e-5)
        assert not torch.allclose(masked.loss(batch), error.mean(), rtol=1e-3)
