"""Comfy Registry packaging: `comfy node validate` and `comfy node pack` pass offline, and the zip holds what users need."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEV_ONLY = ("tests/", "benchmarks/", ".ci/")  # never shipped: see .comfyignore
RUNTIME_FILES = ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md")
RUNTIME_DIRS = ("core/", "nodes/", "web/", "example_workflows/")


@dataclass
class Packed:
    """What `comfy node validate` and `comfy node pack` said, and the zip's file list."""

    validate: subprocess.CompletedProcess[str]
    pack: subprocess.CompletedProcess[str]
    names: list[str]
    source: list[str]
    zip_path: Path


def comfy_executable() -> Path:
    """The comfy-cli entry point of the interpreter running the tests (requirements-dev.txt installs it)."""
    here = Path(sys.executable).with_name("comfy.exe" if os.name == "nt" else "comfy")
    if here.exists():
        return here
    found = shutil.which("comfy")
    assert found, "comfy-cli is not installed: pip install -r requirements-dev.txt"
    return Path(found)


def source_files() -> list[str]:
    """Files a fresh commit of the working tree would track: git-tracked plus untracked-but-not-ignored ones."""

    def git(*args: str) -> list[str]:
        out = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if line]

    files = set(git("ls-files")) | set(git("ls-files", "--others", "--exclude-standard"))
    return sorted(f for f in files if (ROOT / f).is_file())  # tracked but deleted in the working tree: gone


def run_comfy(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """Run comfy-cli non-interactively and offline: no prompts, no telemetry, no update check, a private config dir."""
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        DO_NOT_TRACK="1",
        COMFY_NO_TELEMETRY="1",
        COMFY_NO_UPDATE_CHECK="1",
        NO_COLOR="1",
        COLUMNS="200",
    )
    return subprocess.run(
        [str(comfy_executable()), "--skip-prompt", "--no-json", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Packed:
    """A throw-away git repository holding the working tree's files, validated and packed by comfy-cli."""
    base = tmp_path_factory.mktemp("registry")
    repo, home = base / "identity-tokens", base / "home"
    home.mkdir()
    files = source_files()
    for name in files:
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    validate = run_comfy(["node", "validate"], repo, home)
    pack = run_comfy(["node", "pack"], repo, home)
    zip_path = repo / "node.zip"
    names = zipfile.ZipFile(zip_path).namelist() if zip_path.exists() else []
    return Packed(validate, pack, names, files, zip_path)


def test_validate_passes_without_warnings(packed: Packed) -> None:
    out = packed.validate.stdout + packed.validate.stderr
    assert packed.validate.returncode == 0, out
    assert "All validation checks passed" in out, out
    assert "warning" not in out.lower(), out  # comfy-cli only warns (exit 0) on bad classifiers, versions, licences


def test_pack_makes_a_zip(packed: Packed) -> None:
    out = packed.pack.stdout + packed.pack.stderr
    assert packed.pack.returncode == 0, out
    assert packed.zip_path.exists(), out
    assert "not found" not in out.lower() and "warning" not in out.lower(), out


def test_zip_holds_the_runtime_files(packed: Packed) -> None:
    names = set(packed.names)
    for name in (*RUNTIME_FILES, "nodes/__init__.py", "core/__init__.py"):
        assert name in names, f"{name} missing from node.zip"
    expected = {f for f in packed.source if f.startswith(RUNTIME_DIRS)}
    assert expected <= names, f"left out of node.zip: {sorted(expected - names)}"
    workflows = [n for n in names if PurePosixPath(n).match("example_workflows/*.json")]
    assert workflows, "no example_workflows/*.json in node.zip"
    assert any(n.startswith("web/") for n in names), "no web/ files in node.zip"


def test_zip_leaves_out_development_files(packed: Packed) -> None:
    shipped = [n for n in packed.names if n.startswith(DEV_ONLY) or n == "requirements-dev.txt"]
    assert not shipped, f"development files in node.zip: {shipped}"
    assert not [n for n in packed.names if "__pycache__" in n or n.endswith(".pyc")]


def test_shipped_code_needs_no_development_files(packed: Packed) -> None:
    pattern = re.compile(r"^\s*(from|import)\s+(\.+)?(tests|benchmarks)\b", re.MULTILINE)
    with zipfile.ZipFile(packed.zip_path) as archive:
        offenders = [n for n in packed.names if n.endswith(".py") and pattern.search(archive.read(n).decode())]
    assert not offenders, f"shipped modules import tests/ or benchmarks/: {offenders}"


def load_pyproject() -> dict:
    """The repository's pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def test_registry_metadata_follows_the_spec() -> None:
    data = load_pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    name = project["name"]
    # https://docs.comfy.org/registry/specifications: under 100 characters, alphanumerics and - _ . only, no two
    # special characters in a row, starts with a letter, "ComfyUI" left out; lowercase by this project's choice.
    assert len(name) < 100 and re.fullmatch(r"[a-z][a-z0-9]*([-_.][a-z0-9]+)*", name), name
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)", project["version"]), project["version"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*", comfy["PublisherId"]), comfy["PublisherId"]
    assert comfy["DisplayName"] == "Identity Tokens"
    licence = project["license"]
    assert isinstance(licence, dict) and set(licence) <= {"file", "text"}, licence
    if "file" in licence:
        assert (ROOT / licence["file"]).is_file() and licence["file"] in source_files()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", project["urls"]["Repository"])
    classifiers = project["classifiers"]
    assert "Environment :: GPU :: NVIDIA CUDA" in classifiers and "Operating System :: OS Independent" in classifiers
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy.get("requires-comfyui", "")), comfy.get("requires-comfyui")


def requirement_names(lines: list[str]) -> set[str]:
    """Distribution names of requirement lines (comments and blanks dropped), normalised."""
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_runtime_dependencies_agree_and_leave_torch_to_comfyui() -> None:
    from_pyproject = requirement_names(load_pyproject()["project"]["dependencies"])
    from_requirements = requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    assert from_pyproject == from_requirements  # registry installs use one, git clones the other
    assert not from_pyproject & {"torch", "torchvision", "torchaudio", "xformers"}
