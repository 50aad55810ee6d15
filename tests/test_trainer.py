"""The trainer learns, touches only the identity rows, is reproducible, and stops cleanly."""

from __future__ import annotations

import pytest
import torch

from core.errors import InputError
from core.identity import Identity
from core.protocols import SLOT, Model
from core.trainer import Batch, Trainer, preset_config


def _config(**overrides: object):
    """A fast Cross-Init config for 64 px tiny models."""
    values = {"resolution": 64, "batch_size": 2, "steps": 20, "token": "<tester>", "seed": 3}
    return preset_config("cross_init_fast", **{**values, **overrides})


def _fixed_batches(trainer: Trainer, count: int = 4) -> list[Batch]:
    """Fixed (latent, noise, timestep, prompt) sets drawn with a separate seed."""
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(count):
        latents = trainer.latent_mean[:2]
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, 1000, (2,), generator=gen)
        batches.append(Batch(latents, noise, timesteps, [f"a photo of a face of {SLOT} person"] * 2))
    return batches


def _mean_loss(trainer: Trainer, batches: list[Batch]) -> float:
    """Mean diffusion loss over fixed batches, without the regulariser."""
    with torch.no_grad():
        return sum(float(trainer.loss(b)) for b in batches) / len(batches)


def test_training_lowers_loss_on_fixed_pairs(any_model: Model, images: torch.Tensor) -> None:
    trainer = Trainer(any_model, images, _config(learning_rate=0.05, steps=40, reg_weight=0.0, flip_p=0.0))
    batches = _fixed_batches(trainer)
    before = _mean_loss(trainer, batches)
    result = trainer.run()
    after = _mean_loss(trainer, batches)
    assert len(result.losses) == 40 and not result.stopped
    assert after < before, (before, after)


def test_gradients_reach_only_identity_rows(any_model: Model, images: torch.Tensor) -> None:
    trainer = Trainer(any_model, images, _config())
    modules = [enc.model for enc in any_model.encoders] + [any_model.denoiser.unet, any_model.denoiser.vae]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    trainer.loss(trainer.sample_batch()).backward()
    for rows in trainer.rows.values():
        assert rows.grad is not None and float(rows.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for m in modules for p in m.parameters())
    trainer.optimizer.zero_grad()
    trainer.run()
    for module, saved in zip(modules, before):
        assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())


def test_same_seed_same_rows(sd1_model: Model, images: torch.Tensor) -> None:
    first = Trainer(sd1_model, images, _config(steps=5)).run().identity
    second = Trainer(sd1_model, images, _config(steps=5)).run().identity
    other = Trainer(sd1_model, images, _config(steps=5, seed=4)).run().identity
    assert torch.equal(first.rows["clip_l"], second.rows["clip_l"])
    assert not torch.equal(first.rows["clip_l"], other.rows["clip_l"])


def test_metadata_records_provenance(sd1_model: Model, images: torch.Tensor) -> None:
    identity = Trainer(sd1_model, images, _config(steps=2)).run().identity
    meta = identity.metadata
    assert (meta["method"], meta["base_family"], meta["steps"], meta["partial"]) == ("cross_init", "sd1", "2", "false")
    assert meta["init"] == "celebrity" and meta["seed"] == "3" and identity.n_tokens == 2


def test_non_finite_loss_keeps_last_good_rows(sd1_model: Model, images: torch.Tensor, monkeypatch) -> None:
    trainer = Trainer(sd1_model, images, _config(steps=10, attention_maps=False))  # predict counts training steps only
    real_predict = sd1_model.denoiser.predict
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        out = real_predict(*args, **kwargs)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(sd1_model.denoiser, "predict", sometimes_nan)
    rows_seen: list[torch.Tensor] = []
    result = trainer.run(on_step=lambda step, total, loss: rows_seen.append(trainer.rows["clip_l"].detach().clone()))
    assert result.stopped.startswith("loss became nan at step 4")
    assert trainer.steps_done == 3 and len(result.losses) == 3
    assert torch.equal(result.identity.rows["clip_l"], rows_seen[-1])
    assert result.identity.metadata["partial"] == "true"


def test_ctrl_c_returns_rows_so_far(sd1_model: Model, images: torch.Tensor) -> None:
    trainer = Trainer(sd1_model, images, _config(steps=10))

    def interrupt(step: int, total: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    result = trainer.run(on_step=interrupt)
    assert result.stopped == "interrupted" and result.identity.metadata["partial"] == "true"
    assert result.identity.metadata["steps"] == "2"


def test_cancel_check_stops_within_a_step(sd1_model: Model, images: torch.Tensor) -> None:
    trainer = Trainer(sd1_model, images, _config(steps=10))
    result = trainer.run(should_stop=lambda: trainer.steps_done >= 3)
    assert result.stopped == "cancelled" and trainer.steps_done == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"token": "person"}, "already a word of the CLIP vocabulary"),
        ({"n_tokens": 80}, "do not fit"),
        ({"steps": 0}, "steps: got 0"),
        ({"learning_rate": -1.0}, "learning rate"),
    ],
)
def test_bad_settings_are_refused(sd1_model: Model, images: torch.Tensor, overrides: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Trainer(sd1_model, images, _config(**overrides))


def test_no_images_refused(sd1_model: Model) -> None:
    with pytest.raises(InputError, match="got 0 images"):
        Trainer(sd1_model, torch.zeros(0, 3, 64, 64), _config())


def test_init_identity_of_wrong_width_refused(sd1_model: Model, images: torch.Tensor) -> None:
    wrong = Identity({"clip_l": torch.randn(2, 768)})
    with pytest.raises(InputError, match="768 wide but text encoder 'clip_l' takes 32"):
        Trainer(sd1_model, images, _config(), init=wrong)


def test_init_identity_sets_start_rows(sd1_model: Model, images: torch.Tensor) -> None:
    start = Identity({"clip_l": torch.randn(3, 32)})
    trainer = Trainer(sd1_model, images, _config(steps=1), init=start)
    assert trainer.config.n_tokens == 3
    assert torch.equal(trainer.init_rows["clip_l"].cpu(), start.rows["clip_l"])
