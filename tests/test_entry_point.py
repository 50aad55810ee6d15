"""The pack's __init__.py loads both as ComfyUI imports it (a package) and as a bare module (pytest, odd folder names)."""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_as_package_like_comfyui() -> None:
    name = "identity-tokens-under-test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert module.NODE_CLASS_MAPPINGS is sys.modules[f"{name}.nodes"].NODE_CLASS_MAPPINGS
        assert module.WEB_DIRECTORY == "./web"
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(f"{name}.")]:
            del sys.modules[key]


def test_imports_as_bare_module() -> None:
    namespace = runpy.run_path(str(ROOT / "__init__.py"))  # no parent package, as pytest imports it
    assert namespace["NODE_CLASS_MAPPINGS"] == {} and namespace["WEB_DIRECTORY"] == "./web"
