"""Shared fixtures: tiny random-weight models of each family and small training images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.protocols import Model  # noqa: E402
from core.tiny import tiny_model  # noqa: E402


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl"])
def any_model(request: pytest.FixtureRequest) -> Model:
    """A tiny model of each family in turn."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def sd1_model() -> Model:
    """The tiny SD1 model."""
    return tiny_model("sd1")


@pytest.fixture()
def photo_dir(tmp_path: Path) -> Path:
    """A folder with two small photos, one grayscale, for command-line runs."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (96, 80), (200, 120, 40)).save(folder / "a.png")
    Image.new("L", (80, 96), 90).save(folder / "b.jpg")
    return folder


@pytest.fixture()
def images() -> torch.Tensor:
    """Two 64 px images in [-1, 1] with some structure (gradients and a square)."""
    ramp = torch.linspace(-1, 1, 64)
    base = torch.stack(
        [ramp.view(1, -1).expand(64, 64), ramp.view(-1, 1).expand(64, 64), -ramp.view(1, -1).expand(64, 64)]
    )
    second = base.clone()
    second[:, 16:48, 16:48] = 0.8
    return torch.stack([base, second])


from tests.conftest_comfy import comfy_server  # noqa: E402, F401  (one ComfyUI server per session)
from tests.conftest_comfy_tiny import comfy_embeddings, comfy_tiny, embeddings, fresh_comfy_tiny  # noqa: E402, F401
