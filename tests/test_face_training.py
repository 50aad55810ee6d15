"""The trainer's face-aware parts: the face-wise attention loss, per-stage key/value tokens, attention snapshots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.attention import select_sites
from core.errors import InputError
from core.identity import Identity
from core.protocols import Model, condition
from core.sefi import FaceLoss, StagedRows
from core.stages import StageSchedule
from core.tiny import tiny_model
from core.trainer import Trainer, preset_config


def _face_masks(n: int, size: int = 64) -> torch.Tensor:
    """A square 'face' in the upper middle of each photo: a quarter of the picture."""
    masks = torch.zeros(n, 1, size, size)
    masks[:, :, size // 8 : size // 8 + size // 2, size // 4 : size // 4 + size // 2] = 1.0
    return masks


def _config(**overrides: object):
    """A short Cross-Init run on 64 px photos."""
    values = {"steps": 30, "batch_size": 2, "resolution": 64, "seed": 5, "learning_rate": 0.05}
    return preset_config("cross_init_fast", **{**values, **overrides})


def test_mask_loss_puts_more_attention_inside_the_mask(sd1_model: Model, images: torch.Tensor) -> None:
    masks = _face_masks(images.shape[0])
    plain = Trainer(sd1_model, images, _config(learning_rate=0.2), face_masks=masks).run()
    setting = FaceLoss("mask", weight=10.0)
    face = Trainer(sd1_model, images, _config(learning_rate=0.2, face_loss=setting), face_masks=masks).run()
    start = float(np.mean(plain.attention.inside_start))
    assert start == pytest.approx(float(np.mean(face.attention.inside_start)), abs=1e-6)  # same seed, same start
    without, with_loss = float(np.mean(plain.attention.inside_end)), float(np.mean(face.attention.inside_end))
    # Measured on the tiny SD1 model (seed 5, 30 steps, lr 0.2, weight 10): 0.2457 of the attention inside the mask
    # at the start (the mask is a quarter of the picture), 0.2446 after training without the loss, 0.2605 with it.
    # The random-weight UNet's queries hardly vary over the pixels, so no token can do much better: 60 steps at
    # lr 0.5 or with 4 tokens reach 0.261 too.
    assert with_loss > without + 0.01, (start, without, with_loss)
    assert with_loss > start + 0.01


def test_reference_loss_pulls_the_identity_map_towards_the_class_word(sd1_model: Model, images: torch.Tensor) -> None:
    setting = FaceLoss("reference", weight=50.0)
    trainer = Trainer(sd1_model, images, _config(face_loss=setting, steps=20))
    batch = trainer.sample_batch()

    def attention_loss() -> float:
        noisy = sd1_model.denoiser.add_noise(batch.latents, batch.noise, batch.timesteps)
        with sd1_model.denoiser.recording(trainer.recorder):
            reference = trainer.attention_term.reference_maps(noisy, batch.timesteps, batch.prompts)
            with trainer.recorder.recording(), torch.no_grad():
                sd1_model.denoiser.predict(noisy, batch.timesteps, condition(sd1_model, batch.prompts, trainer.rows))
            maps = trainer.recorder.take()
        return float(trainer.attention_term.loss(maps, batch.prompts, None, (8, 8), reference))

    before = attention_loss()
    result = trainer.run()
    assert not result.stopped
    assert attention_loss() < before * 0.8, before


def test_face_loss_is_in_the_step_loss_and_its_gradient(sd1_model: Model, images: torch.Tensor) -> None:
    masks = _face_masks(images.shape[0])
    plain = Trainer(sd1_model, images, _config(), face_masks=masks)
    face = Trainer(sd1_model, images, _config(face_loss=FaceLoss("mask", weight=2.0)), face_masks=masks)
    batch = plain.sample_batch()
    with sd1_model.denoiser.recording(face.recorder):
        total = face.loss(batch)
        total.backward()
    diffusion = plain.loss(batch)
    assert float(total.detach()) > float(diffusion.detach()) + 1e-4  # 2.0 x (1 - inside share) was added
    assert face.rows["clip_l"].grad is not None and float(face.rows["clip_l"].grad.abs().sum()) > 0


def test_micro_batches_give_the_same_face_loss_step(sd1_model: Model, images: torch.Tensor) -> None:
    masks = _face_masks(images.shape[0])
    results = []
    for micro in (0, 1):
        config = _config(face_loss=FaceLoss("mask", weight=1.0), steps=3, micro_batch_size=micro, memory="default")
        results.append(Trainer(sd1_model, images, config, face_masks=masks).run())
    for key in results[0].identity.rows:
        assert torch.allclose(results[0].identity.rows[key], results[1].identity.rows[key], atol=1e-5)
    assert results[0].losses == pytest.approx(results[1].losses, rel=1e-4)


def test_one_stage_with_equal_keys_and_values_is_plain_conditioning(any_model: Model) -> None:
    rows = {enc.key: torch.randn(2, enc.width, generator=torch.Generator().manual_seed(1)) for enc in any_model.encoders}
    staged = StagedRows({k: v.expand(2, 1, -1, -1) for k, v in rows.items()}, StageSchedule.uniform(1))
    prompts = ["a photo of {}", "a close-up photo of the {}"]
    timesteps = torch.tensor([3, 999])
    plain = condition(any_model, prompts, rows)
    split = staged.condition(any_model, prompts, timesteps)
    assert torch.equal(split.context, plain.context) and torch.equal(split.value_context, plain.context)
    assert (split.pooled is None) == (plain.pooled is None)
    if plain.pooled is not None:
        assert torch.equal(split.pooled, plain.pooled)
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    den = any_model.denoiser
    assert torch.equal(den.predict(noisy, timesteps, split), den.predict(noisy, timesteps, plain))


def test_one_stage_trainer_step_equals_the_plain_step(sd1_model: Model, images: torch.Tensor) -> None:
    plain = Trainer(sd1_model, images, _config(steps=2))
    staged = Trainer(sd1_model, images, _config(steps=2, stages=1))
    assert staged.rows["clip_l"].shape == (2, 1, 2, 32)
    batch = plain.sample_batch()
    assert torch.equal(plain.loss(batch), staged.loss(batch))


def test_each_sample_gets_its_stage_rows(sd1_model: Model) -> None:
    schedule = StageSchedule.uniform(5)
    stage_rows = torch.randn(2, 5, 2, 32, generator=torch.Generator().manual_seed(3))
    staged = StagedRows({"clip_l": stage_rows}, schedule)
    timesteps = torch.tensor([0, 199, 200, 999])
    cond = staged.condition(sd1_model, ["a photo of {}"] * 4, timesteps)
    for index, stage in enumerate((0, 0, 1, 4)):
        keys = condition(sd1_model, ["a photo of {}"], {"clip_l": stage_rows[0, stage]})
        values = condition(sd1_model, ["a photo of {}"], {"clip_l": stage_rows[1, stage]})
        assert torch.allclose(cond.context[index], keys.context[0], atol=1e-6)
        assert torch.allclose(cond.value_context[index], values.context[0], atol=1e-6)


def test_per_stage_training_moves_keys_and_values_apart(sd1_model: Model, images: torch.Tensor) -> None:
    result = Trainer(sd1_model, images, _config(stages=5, steps=20)).run()
    identity = result.identity
    assert identity.is_staged and identity.schedule == StageSchedule.uniform(5)
    stages = identity.stages["clip_l"]
    assert stages.shape == (2, 5, 2, 32)
    assert not torch.allclose(stages[0], stages[1])  # keys and values were trained apart
    assert torch.equal(identity.rows["clip_l"], stages[1, 2])  # a plain prompt carries the middle stage's values


def test_attention_maps_at_start_and_end(sd1_model: Model, images: torch.Tensor) -> None:
    result = Trainer(sd1_model, images, _config(steps=3)).run()
    maps = result.attention
    assert maps is not None and maps.end_step == 3
    assert maps.start.shape == (2, 8, 8) and maps.end.shape == (2, 8, 8)
    assert maps.inside_start is None
    assert np.all(maps.start >= 0) and not np.allclose(maps.start, maps.end)
    off = Trainer(sd1_model, images, _config(steps=3, attention_maps=False)).run()
    assert off.attention is None


def test_default_layers_are_the_quarter_resolution_ones(sd1_model: Model) -> None:
    sites = sd1_model.denoiser.attention_sites()
    chosen = select_sites(sites)
    assert chosen and all(s.part != "mid" and s.level == max(x.level for x in sites if x.part != "mid") for s in chosen)
    assert len(select_sites(sites, "all")) == len(sites)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"face_loss": FaceLoss("mask", weight=-0.1)}, r"face loss weight: got -0.1"),
        ({"face_loss": FaceLoss("mask", weight=math.nan)}, r"face loss weight: got nan"),
        ({"face_loss": FaceLoss("mask", weight=math.inf)}, r"face loss weight: got inf"),
        ({"face_loss": FaceLoss("masks")}, r"face loss: unknown mode 'masks'"),
        ({"face_loss": FaceLoss("reference", reference_word="")}, r"reference word: got ''"),
        ({"face_loss": FaceLoss("reference", reference_word="identitytokens")}, r"reference word: 'identitytokens' is 3"),
        ({"stages": 0}, r"stages: got 0"),
        ({"stages": 40, "steps": 30}, r"stages: 40 stages but only 30 steps"),
    ],
)
def test_bad_face_settings_are_refused_before_training(
    sd1_model: Model, images: torch.Tensor, overrides: dict, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        Trainer(sd1_model, images, _config(**overrides), face_masks=_face_masks(2))


def test_mask_mode_needs_a_non_empty_mask_per_photo(sd1_model: Model, images: torch.Tensor) -> None:
    config = _config(face_loss=FaceLoss("mask"))
    with pytest.raises(InputError, match="mask: the face loss's mask mode needs a face mask per photo"):
        Trainer(sd1_model, images, config)
    empty = _face_masks(2)
    empty[1] = 0
    with pytest.raises(InputError, match="mask: the face mask of photo 2 is empty"):
        Trainer(sd1_model, images, config, face_masks=empty)
    with pytest.raises(InputError, match="mask: got 1 face masks for 2 photos"):
        Trainer(sd1_model, images, config, face_masks=_face_masks(1))


def test_per_stage_init_keeps_its_stages(sd1_model: Model, images: torch.Tensor) -> None:
    first = Trainer(sd1_model, images, _config(stages=3, steps=4)).run().identity
    again = Trainer(sd1_model, images, _config(steps=2), init=first)
    assert again.schedule == StageSchedule.uniform(3)
    assert torch.equal(again.rows["clip_l"].detach(), first.stages["clip_l"])
    with pytest.raises(InputError, match="stages: the init identity has 3 stages"):
        Trainer(sd1_model, images, _config(stages=5, steps=10), init=first)


def test_plain_identity_is_unchanged_by_the_face_parts(sd1_model: Model, images: torch.Tensor) -> None:
    identity = Trainer(sd1_model, images, _config(steps=2)).run().identity
    assert isinstance(identity, Identity) and not identity.is_staged
    assert identity.rows["clip_l"].shape == (2, 32)


def test_sdxl_trains_with_both_face_modes_and_stages(images: torch.Tensor) -> None:
    model = tiny_model("sdxl")
    for setting in (FaceLoss("mask", weight=1.0), FaceLoss("reference", weight=1.0)):
        result = Trainer(model, images, _config(steps=2, face_loss=setting, stages=2), face_masks=_face_masks(2)).run()
        assert not result.stopped and result.identity.is_staged
        assert set(result.identity.stages) == {"clip_l", "clip_g"}
