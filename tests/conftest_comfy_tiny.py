"""Session fixtures for the in-process ComfyUI tests: the tiny models of each family built once as ComfyUI objects."""

from __future__ import annotations

from collections.abc import Callable
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
