"""`pip wheel .` / `pip install .`: one package `identity_tokens` (never a bare `core` or `nodes`), its data files,
and the `identity-tokens` command line working from a fresh virtual environment, outside the repository.

The wheel is built offline (`--no-build-isolation`, with the setuptools of the interpreter running the tests) from a
copy of the source files, so the repository gets no build/ or egg-info. The fresh venv borrows the test environment's
dependencies through a .pth file and gets only the wheel installed, with --no-deps: nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "identity_tokens"
SCRIPT = "identity-tokens"
NOT_SOURCE = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", "out"}
SHIPPED_DIRS = ("core/", "nodes/", "web/", "example_workflows/")
DATA_SUFFIXES = (".json", ".txt", ".js")


@dataclass
class Installed:
    """The built wheel, the fresh venv it went into, and a working folder outside the repository."""

    wheel: Path
    names: list[str]
    source: list[str]
    python: Path
    script: Path
    work: Path


def source_files() -> list[str]:
    """Files a fresh commit would hold: git-tracked plus untracked-but-not-ignored; without git, a filtered walk."""
    try:
        out = [
            subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout
            for args in (["ls-files"], ["ls-files", "--others", "--exclude-standard"])
        ]
        files = {line for text in out for line in text.splitlines() if line}
    except (OSError, subprocess.CalledProcessError):  # an unpacked archive: no git
        files = {
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*")
            if p.is_file() and not NOT_SOURCE & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)
        }
    return sorted(f for f in files if (ROOT / f).is_file())


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for the fresh venv's processes: nothing that would put the repository on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1", **extra)
    return env


def run(args: list[str | Path], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command of the fresh venv from cwd and return what it said."""
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def borrowed_site_dirs() -> list[str]:
    """The site-packages folders that give this interpreter the pack's dependencies (never the repository)."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    found = []
    for folder in dirs:
        if os.path.isdir(folder) and Path(folder).resolve() != ROOT and folder not in found:
            found.append(folder)
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("packaging")
    source, dist, env_dir, work = base / "identity-tokens", base / "dist", base / "venv", base / "work"
    files = source_files()
    for name in files:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source],
        cwd=base,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("identity_tokens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()

    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)  # pip comes from the borrowed folders below
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base).stdout.strip()
    # plain path lines, appended after the venv's own site-packages: the installed wheel is found first, and
    # .pth files over there (say an editable install of this very repository) are not run
    (Path(purelib) / "_borrowed_dependencies.pth").write_text("\n".join(borrowed_site_dirs()) + "\n")
    install = run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], base)
    assert install.returncode == 0, install.stdout + install.stderr
    script = bin_dir / (f"{SCRIPT}.exe" if os.name == "nt" else SCRIPT)
    work.mkdir()
    return Installed(wheel, names, files, python, script, work)


def test_wheel_holds_one_package_and_its_data(installed: Installed) -> None:
    tops = {PurePosixPath(n).parts[0] for n in installed.names}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tops == {PACKAGE, f"{PACKAGE}-{version}.dist-info"}, tops  # no bare core/, nodes/, tests/, benchmarks/
    names = set(installed.names)
    assert f"{PACKAGE}/__init__.py" in names
    expected = {
        f"{PACKAGE}/{f}"
        for f in installed.source
        if f.startswith(SHIPPED_DIRS) and (f.endswith(".py") or f.endswith(DATA_SUFFIXES))
    }
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    for pattern in (
        "core/configs/*/*.json",
        "core/configs/*/*/*.json",
        "core/data/*.txt",
        "web/*.js",
        "example_workflows/*.json",
    ):
        assert any(PurePosixPath(n).match(f"{PACKAGE}/{pattern}") for n in names), f"no {pattern} in the wheel"
    assert not [n for n in names if "/tests/" in n or "/benchmarks/" in n or "__pycache__" in n or n.endswith(".pyc")]
    with zipfile.ZipFile(installed.wheel) as archive:
        dist_info = f"{PACKAGE}-{version}.dist-info"
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert f"{SCRIPT} = {PACKAGE}.core.cli:main" in entry_points
    requires = [
        line.split(":", 1)[1].strip().lower() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    runtime = [r for r in requires if "extra ==" not in r]
    assert runtime and not [r for r in runtime if r.startswith(("torch", "torchvision", "torchaudio"))], runtime


def test_installed_engine_comes_from_the_venv_without_comfyui(installed: Installed) -> None:
    probe = (
        "import importlib.metadata, sys; import identity_tokens, identity_tokens.core.cli; "
        "print(identity_tokens.__file__); print('\\n'.join(sys.path)); "
        "assert 'identity_tokens.nodes' not in sys.modules, 'the engine imported the ComfyUI layer'; "
        "version = identity_tokens.core.__version__; "
        "assert version == importlib.metadata.version('identity-tokens'), version; "
        "assert identity_tokens.WEB_DIRECTORY == './web'"
    )
    result = run([installed.python, "-c", probe], installed.work)
    assert result.returncode == 0, result.stdout + result.stderr
    location, *path = result.stdout.splitlines()
    assert Path(location).resolve().is_relative_to(installed.python.parent.parent.resolve()), location
    assert str(ROOT) not in [str(Path(p).resolve()) for p in path if p], path


def test_console_script_trains_and_inspects(installed: Installed) -> None:
    out = installed.work / "a.safetensors"
    args = ["train", "--model", "tiny", "--images", "sample", "--out", out, "--steps", "2", "--batch-size", "2"]
    train = run([installed.script, *args], installed.work, timeout=300)
    assert train.returncode == 0, train.stdout + train.stderr
    assert out.is_file() and out.stat().st_size > 0 and out.with_suffix(".loss.png").is_file()
    inspect = run([installed.script, "inspect", out], installed.work)
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    assert "token(s)" in inspect.stdout and "steps = 2" in inspect.stdout, inspect.stdout


def test_python_m_identity_tokens_core(installed: Installed) -> None:
    result = run([installed.python, "-m", f"{PACKAGE}.core", "--help"], installed.work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train" in result.stdout and "inspect" in result.stdout, result.stdout
