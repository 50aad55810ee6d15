"""Session fixtures for the in-process ComfyUI tests: the tiny models of each family built once as ComfyUI objects."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.comfy_tiny import TinyComfy, build

TinyFactory = Callable[[str], TinyComfy]


@pytest.fixture(scope="session")
def comfy_embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the session's tiny CLIPs read embedding:NAME files from (tests write identities there)."""
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="session")
def comfy_tiny(comfy_embeddings: Path) -> TinyFactory:
    """comfy_tiny(family): the session's shared tiny model of a family, built on first use."""
    cache: dict[str, TinyComfy] = {}

    def get(family: str) -> TinyComfy:
        if family not in cache:
            cache[family] = build(family, comfy_embeddings)
        return cache[family]

    return get


@pytest.fixture()
def fresh_comfy_tiny(comfy_embeddings: Path) -> TinyFactory:
    """fresh_comfy_tiny(family): a newly built tiny model whose ComfyUI weights are still inference tensors."""
    return lambda family: build(family, comfy_embeddings)


@pytest.fixture()
def embeddings(comfy_embeddings: Path) -> Iterator[Path]:
    """folder_paths' embeddings folder pointed at a new folder inside the one the tiny CLIPs' tokenizers search."""
    import folder_paths  # ComfyUI is importable once the tiny models are built (comfy_ready)

    folder = Path(tempfile.mkdtemp(dir=comfy_embeddings))
    saved = folder_paths.folder_names_and_paths.get("embeddings")
    folder_paths.folder_names_and_paths["embeddings"] = ([str(folder)], folder_paths.supported_pt_extensions)
    folder_paths.filename_list_cache.pop("embeddings", None)
    try:
        yield folder
    finally:
        if saved is None:
            folder_paths.folder_names_and_paths.pop("embeddings", None)
        else:
            folder_paths.folder_names_and_paths["embeddings"] = saved
        folder_paths.filename_list_cache.pop("embeddings", None)
