"""Session fixture: one ComfyUI server (CI's core) with the pack, the tiny SD1.5 checkpoint and the sample photos."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.images import sample_photo_path
from tests.comfy_server import ComfyServer
from tests.comfyui_env import ensure_comfyui
from tests.tiny_sd15 import write_tiny_sd15


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """A started server; its folders are ComfyServer's input_dir, output_dir, embeddings_dir, ..."""
    comfyui = ensure_comfyui()
    checkpoint = write_tiny_sd15()
    server = ComfyServer()
    server.start(comfyui, tmp_path_factory.mktemp("comfy_server") / "base", checkpoint, sample_photo_path())
    try:
        yield server
    finally:
        server.stop()
