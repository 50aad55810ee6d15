"""Integration: the encoder example workflows (tests/workflows/encoder_*.api.json) in a real ComfyUI server.

Load Image + Load CLIP Vision (a random full-size ViT-L/14: ComfyUI only loads CLIP vision files of real sizes) +
Load Identity Encoder (a tiny untrained encoder for that tower and SD1's 768-wide CLIP-L) -> Encoder Customize ->
Apply Identity -> KSampler; and the same identity as Train Identity Token's init (3 steps) -> Apply Identity -> KSampler.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from core.encoders.files import save_encoder
from core.encoders.mapper import EncoderSpec, IdentityEncoder
from core.encoders.vision import VisionSpec
from tests.comfy_server import ComfyServer, RunResult
from tests.random_clip_vision import IMAGE, LAYERS, PATCH, WIDTH, write_clip_vision

WORKFLOWS = Path(__file__).parent / "workflows"
CLIP_VISION, ENCODER = "3", "4"  # node ids of Load CLIP Vision and Load Identity Encoder in both workflows
SAVE_ENCODED, LOSS_PREVIEW, SAVE_TRAINED = "11", "13", "17"


def workflow(name: str) -> dict[str, Any]:
    """A fresh copy of an API-format workflow from tests/workflows."""
    return json.loads((WORKFLOWS / f"{name}.api.json").read_text())


@pytest.fixture(scope="module")
def encoder_models(comfy_server: ComfyServer) -> dict[str, Path]:
    """The workflows' CLIP vision model and encoder, in the server's models folders."""
    prompt = workflow("encoder_identity")
    models = comfy_server.base / "models"
    vision = models / "clip_vision" / prompt[CLIP_VISION]["inputs"]["clip_name"]
    vision.symlink_to(write_clip_vision())
    (models / "identity_encoders").mkdir(exist_ok=True)
    spec = EncoderSpec(vision=VisionSpec("clip-vit-l-14", WIDTH, LAYERS, IMAGE, PATCH), widths={"clip_l": 768},
                       family="sd1", hidden=32)
    base = torch.randn(spec.n_tokens, 768, generator=torch.Generator().manual_seed(0)) * 0.3
    encoder = save_encoder(IdentityEncoder(spec, {"clip_l": base}),
                           models / "identity_encoders" / prompt[ENCODER]["inputs"]["encoder_name"])
    return {"clip_vision": vision, "encoder": encoder}


def _real_image(result: RunResult, node: str) -> np.ndarray:
    """The one 64 x 64 image a Save Image node wrote, as floats; not flat."""
    (path,) = result.files("output", node)
    with Image.open(path) as image:
        assert image.size == (64, 64)
        values = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert values.std() > 1.0, f"{path.name} is flat"
    return values


def test_the_server_lists_the_encoders_folder(comfy_server: ComfyServer, encoder_models: dict[str, Path]) -> None:
    info = comfy_server.object_info("IdentityTokens_EncoderLoader")["IdentityTokens_EncoderLoader"]
    assert encoder_models["encoder"].name in info["input"]["required"]["encoder_name"][0]
    assert info["output"] == ["IDENTITY_ENCODER"]


def test_encoder_identity_workflow(comfy_server: ComfyServer, encoder_models: dict[str, Path]) -> None:
    result = comfy_server.run(workflow("encoder_identity"))
    assert result.status == "success", result.describe()
    _real_image(result, SAVE_ENCODED)


def test_encoder_init_train_workflow(comfy_server: ComfyServer, encoder_models: dict[str, Path]) -> None:
    result = comfy_server.run(workflow("encoder_init_train"))
    assert result.status == "success", result.describe()
    encoded, trained = _real_image(result, SAVE_ENCODED), _real_image(result, SAVE_TRAINED)
    assert np.abs(encoded - trained).max() > 0  # the 3 training steps changed the identity, so the picture
    assert len(result.files("temp", LOSS_PREVIEW)) == 1


def test_an_encoder_for_another_tower_is_refused(comfy_server: ComfyServer, encoder_models: dict[str, Path]) -> None:
    prompt = workflow("encoder_identity")
    spec = EncoderSpec(vision=VisionSpec("clip-vit-h-14", 1280, 32, 224, 14), widths={"clip_l": 768}, family="sd1",
                       hidden=8)
    other = save_encoder(IdentityEncoder(spec, {"clip_l": torch.zeros(2, 768)}),
                         encoder_models["encoder"].with_name("ci-encoder-vit-h.safetensors"))
    prompt[ENCODER]["inputs"]["encoder_name"] = other.name
    result = comfy_server.run(prompt)
    assert result.status == "error", result.describe()
    assert "clip_vision: the encoder was trained for the vision tower 'clip-vit-h-14'" in result.error, result.error
