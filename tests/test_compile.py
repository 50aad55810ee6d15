"""The optional torch.compile switch: same training, the UNet restored, compile time reported, failures fall back."""

from __future__ import annotations

import logging

import pytest
import torch

from core import acceleration
from core.tiny import tiny_model
from core.trainer import Trainer, preset_config


@pytest.fixture()
def eager_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compile through dynamo's 'eager' backend: the whole compile path without minutes of C++ code generation."""
    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", "eager")


def _train(images: torch.Tensor, compile_unet: bool) -> tuple[Trainer, dict]:
    """Two steps on a fresh tiny SD1, compiled or not."""
    config = preset_config("cross_init", steps=2, batch_size=2, resolution=64, compile=compile_unet)
    trainer = Trainer(tiny_model("sd1"), images, config)
    result = trainer.run()
    assert not result.stopped
    return trainer, result.identity


def test_compiled_training_matches_eager_and_restores_the_unet(images: torch.Tensor, eager_backend: None) -> None:
    _, expected = _train(images, False)
    trainer, identity = _train(images, True)
    for key, rows in expected.rows.items():
        torch.testing.assert_close(identity.rows[key], rows, rtol=1e-5, atol=1e-6)
    assert "forward" not in trainer.model.denoiser.unet.__dict__  # the class's forward again
    assert identity.metadata["compile"] == "on"
    assert float(identity.metadata["compile_first_call_seconds"]) > 0


def test_compile_that_cannot_start_falls_back(images: torch.Tensor, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def no_compiler(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger="core.acceleration"):
        _, identity = _train(images, True)
    assert "no C++ compiler found" in identity.metadata["compile"] and "fell back" in identity.metadata["compile"]
    assert "training without it" in caplog.text


def test_compiled_forward_that_fails_runs_eagerly(images: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(function: object, **_kwargs: object) -> object:
        def run(*_args: object, **_kw: object) -> None:
            raise RuntimeError("inductor: codegen failed")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    _, expected = _train(images, False)
    _, identity = _train(images, True)
    assert "codegen failed" in identity.metadata["compile"]
    for key, rows in expected.rows.items():
        torch.testing.assert_close(identity.rows[key], rows)


def test_a_graph_that_fails_inside_dynamo_is_reported_as_a_fallback(images: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """With suppress_errors, a backend failure runs the frame eagerly without raising: the file must not say 'on'."""

    def failing_backend(_graph: torch.fx.GraphModule, _inputs: list) -> None:
        raise RuntimeError("backend: no kernel for this op")

    torch._dynamo.reset()  # no frame of the UNet compiled by an earlier test may be reused
    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", failing_backend)
    _, expected = _train(images, False)
    _, identity = _train(images, True)
    assert identity.metadata["compile"].startswith("fell back: no graph compiled"), identity.metadata["compile"]
    for key, rows in expected.rows.items():
        torch.testing.assert_close(identity.rows[key], rows)
