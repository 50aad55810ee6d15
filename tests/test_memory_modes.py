"""Memory modes wired into the trainer: checkpointing and micro-batches change memory, never the step."""

from __future__ import annotations

import pytest
import torch

from core import trainer as trainer_module
from core.checkpointing import is_checkpointed
from core.memory import select_memory_plan
from core.tiny import tiny_model
from core.trainer import Trainer, preset_config

GB = 2**30


def _rows_after(memory: str, images: torch.Tensor, steps: int = 2, **extra: object) -> tuple[Trainer, dict]:
    """Train a fresh tiny SD1 for a few steps in a memory mode; the trainer and its final rows."""
    config = preset_config("cross_init", steps=steps, batch_size=4, resolution=64, memory=memory, **extra)
    trainer = Trainer(tiny_model("sd1"), images, config)
    result = trainer.run()
    assert not result.stopped
    return trainer, result.identity.rows


@pytest.mark.parametrize("memory", ["checkpointing", "low"])
def test_modes_give_the_default_step(images: torch.Tensor, memory: str) -> None:
    """Checkpointing (and checkpointing + micro-batch 1) train to the same rows as the default mode."""
    _, expected = _rows_after("default", images)
    trainer, rows = _rows_after(memory, images)
    assert trainer.memory_plan.checkpointing
    assert trainer.memory_plan.micro_batch == (1 if memory == "low" else 4)
    for key, value in expected.items():
        torch.testing.assert_close(rows[key], value, rtol=1e-5, atol=1e-6)


def test_checkpointing_is_on_during_steps_and_undone_after(images: torch.Tensor, monkeypatch) -> None:
    """The UNet's layers are checkpointed while steps run, and their forwards are the originals afterwards."""
    model = tiny_model("sd1")
    unet = model.denoiser.unet
    layer = unet.down_blocks[0].resnets[0]
    original = layer.forward
    seen: list[bool] = []
    real_step = Trainer.step

    def spy(self: Trainer, batch: object) -> torch.Tensor:
        seen.append(is_checkpointed(layer))
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", spy)
    config = preset_config("cross_init", steps=2, batch_size=2, resolution=64, memory="checkpointing")
    Trainer(model, images, config).run()
    assert seen == [True, True] and not is_checkpointed(layer) and layer.forward == original


def test_auto_on_the_cpu_is_the_default_mode(images: torch.Tensor) -> None:
    """No GPU, no estimate: auto neither checkpoints nor splits the batch, and says so in the file."""
    trainer, _ = _rows_after("auto", images, steps=1)
    assert not trainer.memory_plan.checkpointing and trainer.memory_plan.micro_batch == 4
    assert trainer.identity().metadata["memory_mode"] == "default"


def test_auto_on_a_gpu_estimates_and_picks_what_fits(images: torch.Tensor, monkeypatch) -> None:
    """On a (simulated) CUDA device with a real model, auto asks the estimator and takes the cheapest mode that fits."""
    asked: list[tuple] = []

    def estimator(family: str, resolution: int, batch: int, dtype: torch.dtype, n_rows: int) -> object:
        asked.append((family, resolution, batch))
        return lambda checkpointing, micro: (2 if checkpointing else 9) * GB * micro // batch + GB

    trainer = Trainer(tiny_model("sd1"), images, preset_config("cross_init", steps=1, batch_size=4, resolution=64))
    trainer.device = torch.device("cuda")
    trainer.model.name = "my-sd15"
    monkeypatch.setattr(trainer_module, "training_estimator", estimator)
    monkeypatch.setattr(trainer_module, "free_memory_bytes", lambda device, resident: 6 * GB)
    plan = trainer.plan_memory()
    assert asked == [("sd1", 64, 4)]
    assert plan.checkpointing and plan.micro_batch == 4 and plan.fits  # 10 GB default > 5.4 usable > 3 GB


@pytest.mark.parametrize(
    ("mode", "micro", "free", "expected"),
    [
        ("default", None, 1 * GB, (False, 8)),
        ("checkpointing", None, None, (True, 8)),
        ("low", None, None, (True, 1)),
        ("auto", None, None, (False, 8)),  # nothing known: the default mode
        ("auto", None, 100 * GB, (False, 8)),
        ("auto", None, 5 * GB, (True, 8)),
        ("auto", None, 2 * GB, (True, 4)),  # 90% of free memory is the budget
        ("auto", None, 1 * GB, (True, 2)),
        ("auto", 4, 100 * GB, (False, 4)),  # the user's micro-batch is kept
        ("auto", 4, 4 * GB, (True, 4)),
    ],
)
def test_select_memory_plan(mode: str, micro: int | None, free: int | None, expected: tuple[bool, int]) -> None:
    def estimate(checkpointing: bool, micro_batch: int) -> int:
        return int((0.4 if checkpointing else 1.0) * micro_batch * GB)

    plan = select_memory_plan(mode, 8, micro, estimate if free is not None else None, free)
    assert (plan.checkpointing, plan.micro_batch) == expected


def test_unknown_memory_mode_is_refused(images: torch.Tensor) -> None:
    from core.errors import InputError

    with pytest.raises(InputError, match="memory: unknown mode 'tiny'"):
        Trainer(tiny_model("sd1"), images, preset_config("cross_init", steps=1, resolution=64, memory="tiny"))
