"""Integration: the face-aware example workflow (tests/workflows/face_identity.api.json) in a real ComfyUI server.

Three photos of different sizes -> Face Crop -> Train Identity Token with Face Attention Loss and per-stage tokens ->
attention heatmap preview -> Save Identity -> Apply Identity (CONDITIONING and the patched MODEL) -> KSampler.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from core.formats import load_identity
from core.stages import StageSchedule
from tests.comfy_server import ComfyServer, RunResult

WORKFLOW = Path(__file__).parent / "workflows" / "face_identity.api.json"
TRAIN, HEATMAP, SAVE, APPLY, SAMPLER, SAVE_IMAGE = "8", "9", "11", "12", "15", "17"
# astronaut_flip.png, not astronaut.png: the session's server would otherwise reuse (cache) other tests' Load Image
SIZES = {"astronaut_flip.png": (512, 512), "astronaut_small.png": (300, 220), "astronaut_wide.png": (900, 700)}


def _prompt() -> dict[str, Any]:
    """A fresh copy of the workflow."""
    return json.loads(WORKFLOW.read_text())


def _write_photos(folder: Path) -> None:
    """The astronaut cut to two more sizes (her face in each), next to the server's astronaut.png."""
    with Image.open(folder / "astronaut.png") as photo:
        rgb = photo.convert("RGB")
    rgb.resize((300, 300)).crop((0, 0, 300, 220)).save(folder / "astronaut_small.png")
    rgb.resize((900, 900)).crop((0, 0, 900, 700)).save(folder / "astronaut_wide.png")


@pytest.fixture(scope="module")
def face_run(comfy_server: ComfyServer) -> RunResult:
    """The face workflow, run once."""
    _write_photos(comfy_server.input_dir)
    return comfy_server.run(_prompt())


def test_face_workflow_trains_saves_and_samples(comfy_server: ComfyServer, face_run: RunResult) -> None:
    assert face_run.status == "success", face_run.describe()
    prompt = _prompt()
    for node in ("2", "3", "4"):
        name = prompt[node]["inputs"]["image"]
        with Image.open(comfy_server.input_dir / name) as photo:
            assert photo.size == SIZES[name]
    path = comfy_server.embeddings_dir / "face-ci.sefi.safetensors"
    assert path.is_file(), sorted(p.name for p in comfy_server.embeddings_dir.iterdir())
    identity = load_identity(path)
    assert identity.is_staged and identity.schedule == StageSchedule.uniform(5)
    assert identity.stages["clip_l"].shape == (2, 5, 2, 768)
    assert identity.metadata["face_loss"] == "mask" and identity.metadata["face_loss_weight"] == "0.003"
    heatmap = face_run.files("temp", HEATMAP)
    assert len(heatmap) == 1, face_run.outputs(HEATMAP)
    with Image.open(heatmap[0]) as picture:
        width, height = picture.size
        values = np.asarray(picture.convert("RGB"), dtype=np.float32)
    assert width > 3 * 64 and height > 3 * 64 and values.std() > 5  # photo, start and end columns, three rows
    images = face_run.files("output", SAVE_IMAGE)
    assert len(images) == 1 and images[0].name.startswith("identity_tokens_face_ci")


def test_per_stage_identity_without_the_model_is_an_error(comfy_server: ComfyServer, face_run: RunResult) -> None:
    prompt = _prompt()
    del prompt[APPLY]["inputs"]["model"]
    prompt[SAMPLER]["inputs"]["model"] = ["1", 0]
    prompt[SAVE]["inputs"]["name"] = "face-ci-2"
    result = comfy_server.run(prompt)
    assert result.status == "error"
    assert "per-stage identity" in result.describe() and "model input" in result.describe()
