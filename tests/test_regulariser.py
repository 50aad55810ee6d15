"""The Cross-Init regulariser (METHODS.md 2.3): reg_weight * mean_i ||v_i - v_init,i + 1e-6||, per encoder."""

from __future__ import annotations

from dataclasses import replace

import torch

from core.protocols import Model
from core.trainer import Batch, Trainer, preset_config

REG_WEIGHT = 0.5
PAIRWISE_EPS = 1e-6  # torch.nn.functional.pairwise_distance adds this inside the norm


def _trainer(model: Model, images: torch.Tensor) -> Trainer:
    """A Cross-Init trainer whose rows were moved well away from their initial values."""
    config = preset_config("cross_init_fast", resolution=64, batch_size=2, reg_weight=REG_WEIGHT, seed=5)
    trainer = Trainer(model, images, config)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for rows in trainer.rows.values():
            rows.add_(torch.randn(rows.shape, generator=gen).to(rows.device))
    return trainer


def _loss_and_grads(trainer: Trainer, batch: Batch, reg_weight: float) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and its gradient on every encoder's rows at one reg_weight."""
    trainer.config = replace(trainer.config, reg_weight=reg_weight)
    for rows in trainer.rows.values():
        rows.grad = None
    loss = trainer.loss(batch)
    loss.backward()
    return float(loss.detach()), {k: v.grad.detach().clone() for k, v in trainer.rows.items()}


def _expected_penalty(rows: torch.Tensor, init: torch.Tensor) -> float:
    """Mean over rows of the plain (non-squared) L2 norm of v - v_init + eps, written out element by element."""
    diff = rows.detach().double() - init.double() + PAIRWISE_EPS
    return float(torch.stack([torch.sqrt((d * d).sum()) for d in diff]).mean())


def _expected_gradient(rows: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """d/dv of mean_i ||v_i - v_init,i + eps||: (v_i - v_init,i + eps) / (n * ||...||) for each row."""
    diff = rows.detach() - init + PAIRWISE_EPS
    return diff / (diff.norm(dim=1, keepdim=True) * rows.shape[0])


def test_regulariser_adds_the_mean_row_distance(any_model: Model, images: torch.Tensor) -> None:
    """loss(r) - loss(0) on the same batch is r * the mean row distance, summed over encoders."""
    trainer = _trainer(any_model, images)
    batch = trainer.sample_batch()
    with_reg, _ = _loss_and_grads(trainer, batch, REG_WEIGHT)
    without, _ = _loss_and_grads(trainer, batch, 0.0)
    expected = REG_WEIGHT * sum(_expected_penalty(trainer.rows[k], trainer.init_rows[k]) for k in trainer.rows)
    assert expected > 0.1  # the rows really were moved, so the term is large enough to see
    assert abs((with_reg - without) - expected) < 1e-5 * max(1.0, expected), (with_reg - without, expected)


def test_regulariser_gradient_points_away_from_init(any_model: Model, images: torch.Tensor) -> None:
    """The gradient the term adds to each encoder's rows is r * (v - v_init + eps) / (n ||v - v_init + eps||)."""
    trainer = _trainer(any_model, images)
    batch = trainer.sample_batch()
    _, with_reg = _loss_and_grads(trainer, batch, REG_WEIGHT)
    _, without = _loss_and_grads(trainer, batch, 0.0)
    for key, rows in trainer.rows.items():
        expected = REG_WEIGHT * _expected_gradient(rows, trainer.init_rows[key])
        torch.testing.assert_close(with_reg[key] - without[key], expected, atol=2e-6, rtol=1e-4)

