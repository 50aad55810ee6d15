"""The pack's __init__.py loads both as ComfyUI imports it (a package) and as a bare module (pytest, odd folder names).

As a package it reads the node mappings lazily, so that the installed `identity_tokens.core` (the command line,
batch jobs) never imports the ComfyUI layer, while ComfyUI's loader, which reads them with hasattr/getattr right after
importing the folder, still registers every node.
"""

from __future__ import annotations

import importlib
import importlib.util
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_folder(name: str, folder: Path) -> ModuleType:
    """Import a custom node folder as ComfyUI's nodes.py::load_custom_node does (March 2024 and today alike)."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")  # finds submodule_search_locations
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pack_name() -> Iterator[str]:
    """A module name for one import of the pack (with a hyphen, as a cloned folder has), removed afterwards."""
    name = "identity-tokens-under-test"
    yield name
    for key in [k for k in sys.modules if k == name or k.startswith(f"{name}.")]:
        del sys.modules[key]


def test_imports_as_package_like_comfyui(pack_name: str) -> None:
    module = load_folder(pack_name, ROOT)
    assert module.NODE_CLASS_MAPPINGS is sys.modules[f"{pack_name}.nodes"].NODE_CLASS_MAPPINGS
    assert module.WEB_DIRECTORY == "./web"


def test_comfyui_loader_registers_the_nodes(pack_name: str) -> None:
    module = load_folder(pack_name, ROOT)
    assert f"{pack_name}.nodes" not in sys.modules  # nothing of the ComfyUI layer until the mappings are read
    # the reads of load_custom_node, in its order: hasattr() first, then the value
    assert hasattr(module, "WEB_DIRECTORY") and (ROOT / module.WEB_DIRECTORY).is_dir()
    assert hasattr(module, "NODE_CLASS_MAPPINGS") and module.NODE_CLASS_MAPPINGS is not None
    assert hasattr(module, "NODE_DISPLAY_NAME_MAPPINGS") and module.NODE_DISPLAY_NAME_MAPPINGS is not None
    nodes = sys.modules[f"{pack_name}.nodes"]
    assert module.NODE_CLASS_MAPPINGS == nodes.NODE_CLASS_MAPPINGS and module.NODE_CLASS_MAPPINGS
    assert module.NODE_DISPLAY_NAME_MAPPINGS == nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(module.NODE_CLASS_MAPPINGS)
    assert "NODE_CLASS_MAPPINGS" in vars(module)  # read once, then a plain attribute
    assert {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"} <= set(dir(module))
    assert not hasattr(module, "comfy_entrypoint")  # other names stay missing: no V3 registration is claimed


def test_importing_the_engine_leaves_the_comfyui_layer_alone(pack_name: str) -> None:
    load_folder(pack_name, ROOT)  # what `import identity_tokens.core` does first, when installed with pip
    cli = importlib.import_module(f"{pack_name}.core.cli")
    assert callable(cli.main)
    assert f"{pack_name}.nodes" not in sys.modules


def test_a_broken_node_import_is_reported_not_skipped(pack_name: str, tmp_path: Path) -> None:
    folder = tmp_path / "pack"
    (folder / "nodes").mkdir(parents=True)
    (folder / "__init__.py").write_text((ROOT / "__init__.py").read_text())
    (folder / "nodes" / "__init__.py").write_text("raise AttributeError('some attribute missing at import time')\n")
    module = load_folder(pack_name, folder)
    # an AttributeError would make hasattr() False and ComfyUI skip the pack without saying why
    with pytest.raises(ImportError, match="some attribute missing"):
        hasattr(module, "NODE_CLASS_MAPPINGS")


def test_imports_as_bare_module() -> None:
    namespace = runpy.run_path(str(ROOT / "__init__.py"))  # no parent package, as pytest imports it
    assert namespace["NODE_CLASS_MAPPINGS"] == {} and namespace["WEB_DIRECTORY"] == "./web"
    assert namespace["NODE_DISPLAY_NAME_MAPPINGS"] == {}
