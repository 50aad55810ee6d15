"""The one prepared run for a lent GPU (issue 7): install the carried wheels, check, benchmark, all inside a budget.

A GPU is lent to few tasks, for 15 minutes of device time in all, a start included. So everything the issue asks a
GPU for runs from this one command, in order of worth, each part under its own time limit and starting only with half
of it left, each writing its JSON as it goes (after every check, after the side-by-side loops and after every memory
mode): a run cut short still returns what it measured. Here, once, where PyPI is reachable:

    python -m benchmarks.gpu_session --download-wheels       # diffusers and what the device image lacks, into .whl/
    python -m benchmarks.gpu_session --prepare-comfyui       # CI's ComfyUI core, trimmed, into .comfy/

Then the device tool's run, with carry [".whl", ".comfy"] and timeout_s 490 (DEVICE_TIMEOUT_S):

    python3 -m benchmarks.gpu_session --out "$OUT"

What comes back under $OUT: env.json (GPU, driver, versions), session.log (every part's output), checks.json
(benchmarks.gpu_checks), comfy.json (benchmarks.gpu_comfy_check), sd1_512.json, sdxl_1024.json, sd1_512_compile.json
(benchmarks.compare_baseline) and summary.md (the tables for BENCHMARKS.md, made by benchmarks.gpu_tables).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gpu_tables import summary

WHEELS = Path(".whl")
SITE = Path("/tmp/identity_tokens_site")  # where the carried wheels are installed on the device
# What the device image lacks (KINDS.md lists its packages): diffusers, importlib_metadata (diffusers imports it),
# open_clip_torch (for its CLIP vocabulary file only: core.vocab finds it without importing open_clip), and CI's
# ComfyUI core's requirements that are not there: torchsde with trampoline, kornia with kornia_rs.
CARRIED = ("diffusers", "importlib_metadata", "open_clip_torch", "torchsde", "trampoline", "kornia", "kornia_rs")
COMFY_COPY = Path(".comfy/ComfyUI")  # CI's ComfyUI core for the device (ignored by git: not this project's code)
COMFY_LEFT_OUT = ("web", "tests", "tests-ui", "script_examples", "notebooks", "*.png", ".git*", "__pycache__")
RESERVE_S = 15  # kept back from the budget for the summary and the copy home
# 7.7 minutes: with a start of 1-3 minutes, 15 minutes of device time leave room to rerun a part that failed early.
BUDGET_S = 460
DEVICE_TIMEOUT_S = 490  # the device tool's timeout_s for the session: the budget, Python's start and the copy home


@dataclass(frozen=True)
class Part:
    """One command of the session: its name, its arguments ({out} is the output folder) and its time limit."""

    name: str
    args: tuple[str, ...]
    seconds: int  # its limit: it is stopped after this long
    output: str = ""  # the JSON file it writes under {out}, if any
    env: tuple[tuple[str, str], ...] = ()  # environment variables it runs with

    @property
    def min_seconds(self) -> int:
        """It starts only with this long left: less would stop it before it measured anything worth the time."""
        return self.seconds // 2


def _compare(name: str, seconds: int, *args: str) -> Part:
    """A benchmarks.compare_baseline part on CUDA writing {out}/<name>.json."""
    return Part(name, ("-m", "benchmarks.compare_baseline", "--device", "cuda", *args, "--json", f"{{out}}/{name}.json"),
                seconds, f"{name}.json")


# In order of worth. Sizes: SD1.5 at 512 px and SDXL at 1024 px, random weights, batch 8 (issue 7, item 5).
PARTS: tuple[Part, ...] = (
    Part("checks", ("-m", "benchmarks.gpu_checks", "--device", "cuda", "--json", "{out}/checks.json"), 90, "checks.json"),
    _compare("sd1_512", 120, "--model", "sd1", "--resolution", "512", "--warmup", "2", "--steps", "5", "--rounds", "2"),
    # ComfyUI's main.py turns on this allocator for torch 2 on the GPUs it knows (cuda_malloc.py), so users run with it.
    Part("comfy", ("-m", "benchmarks.gpu_comfy_check", "--device", "cuda", "--comfyui", str(COMFY_COPY), "--json",
                   "{out}/comfy.json"), 75, "comfy.json", (("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync"),)),
    _compare("sdxl_1024", 160, "--model", "sdxl", "--resolution", "1024", "--warmup", "2", "--steps", "3", "--rounds", "2"),
    _compare("sd1_512_compile", 120, "--model", "sd1", "--resolution", "512", "--warmup", "2", "--steps", "5",
             "--rounds", "2", "--pack-compile", "--baseline-modes", "mixed", "--modes", "", "--no-flops"),
)  # limits, not durations: 565 s in all, so the default budget runs the compile part only if the others end early
QUICK: tuple[Part, ...] = (  # the same plumbing on the CPU with tiny models, for the tests
    Part("checks", ("-m", "benchmarks.gpu_checks", "--device", "cpu", "--only", "fp16_overflow_skips", "unet_stays",
                    "--json", "{out}/checks.json"), 120, "checks.json"),
    Part("tiny_32", ("-m", "benchmarks.compare_baseline", "--device", "cpu", "--model", "tiny", "--resolution", "32",
                     "--batch-size", "2", "--steps", "1", "--rounds", "1", "--no-flops", "--json", "{out}/tiny_32.json"),
         120, "tiny_32.json"),
)


def _pip_install(wheels: list[Path], site: Path) -> str:
    """'' when pip installed the wheels into site (no index, no deps), else why not."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", str(site), *map(str, wheels)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return "" if done.returncode == 0 else f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-1000:]}"


def install_wheels(wheels: Path, site: Path = SITE) -> str:
    """Install the carried wheels into site and put it on this process's and its children's path; what it did.

    One pip call for all; if that fails (one bad wheel stops pip), each wheel alone, so the others still go in.
    A failure is said, not raised, so the session still records what it can.
    """
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return f"no wheels in {wheels}: using what is installed"
    failed = {}
    if _pip_install(found, site):
        failed = {w.name: why for w in found if (why := _pip_install([w], site))}
    installed = [w.name for w in found if w.name not in failed]
    if installed:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
        sys.path.insert(0, str(site))
    said = f"installed {', '.join(installed) or 'nothing'} into {site}"
    return said + "".join(f"\ninstalling the wheels failed for {name} ({why})" for name, why in failed.items())


def download_wheels(wheels: Path = WHEELS) -> list[str]:
    """Fetch the wheels the device lacks (the versions installed here) for its Python 3.12 into wheels."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    wheels.mkdir(exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux2014_x86_64",
         "-d", str(wheels), *pins],
        check=True,
    )
    return sorted(w.name for w in wheels.glob("*.whl"))


def prepare_comfyui(target: Path = COMFY_COPY) -> str:
    """Copy CI's ComfyUI core (downloaded by the tests' helper if needed) to target, without its front-end and tests."""
    from tests.comfyui_env import ensure_comfyui

    source = ensure_comfyui()
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*COMFY_LEFT_OUT))
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return f"copied {source} to {target} ({size / 2**20:.1f} MiB)"


def _run(command: list[str], seconds: float, log: Path, env: tuple[tuple[str, str], ...] = ()) -> str:
    """Run command (env added to the environment) with its output appended to log; 'ok', 'exit N' or 'timed out'."""
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {' '.join(command)}  (limit {seconds:.0f} s)\n")
        handle.flush()
        try:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=seconds,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", **dict(env)}).returncode
        except subprocess.TimeoutExpired:
            return f"timed out after {seconds:.0f} s"
    return "ok" if code == 0 else f"exit {code}"


def environment() -> dict[str, object]:
    """The GPU as nvidia-smi names it, and the versions the results depend on."""
    info: dict[str, object] = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name in ("torch", "diffusers", "transformers", "huggingface_hub", "safetensors", "triton"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    try:
        smi = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        info["gpu"] = subprocess.run(smi, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        info["gpu"] = f"nvidia-smi: {error}"
    return info


def run_session(out: Path, parts: tuple[Part, ...] = PARTS, budget_s: float = BUDGET_S, wheels: Path = WHEELS) -> dict[str, object]:
    """Install the wheels, then run the parts in order while the budget lasts; what each did, saved to out."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "session.log"
    log.write_text(install_wheels(wheels) + "\n", encoding="utf-8")
    session: dict[str, object] = {"environment": environment(), "budget_s": budget_s, "parts": {}}
    (out / "env.json").write_text(json.dumps(session["environment"], indent=2), encoding="utf-8")
    for part in parts:
        left = budget_s - RESERVE_S - (time.monotonic() - started)
        if left < part.min_seconds:
            session["parts"][part.name] = f"not run: {max(left, 0):.0f} s left of the budget, it needs {part.min_seconds} s"
            continue
        command = [sys.executable, *(a.replace("{out}", str(out)) for a in part.args)]
        begun = time.monotonic()
        status = _run(command, min(part.seconds, left), log, part.env)
        session["parts"][part.name] = f"{status} in {time.monotonic() - begun:.0f} s"
        if part.output and not (out / part.output).is_file():
            session["parts"][part.name] += f", no {part.output} written (see session.log)"
        with log.open("a", encoding="utf-8") as handle:
            handle.write(f"== {part.name}: {session['parts'][part.name]}\n")
    session["total_s"] = round(time.monotonic() - started, 1)
    (out / "summary.md").write_text(summary(out, session), encoding="utf-8")
    return session


def main() -> None:
    """Download the wheels here, or run the session there."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download-wheels", action="store_true", help="fetch the wheels the device lacks into --wheels")
    parser.add_argument("--prepare-comfyui", action="store_true", help=f"copy CI's ComfyUI core to {COMFY_COPY}")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_session_out")))
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole session")
    parser.add_argument("--wheels", type=Path, default=WHEELS)
    parser.add_argument("--quick", action="store_true", help="the CPU plumbing check with tiny models")
    args = parser.parse_args()
    if args.download_wheels or args.prepare_comfyui:
        if args.download_wheels:
            print("\n".join(download_wheels(args.wheels)))
        if args.prepare_comfyui:
            print(prepare_comfyui())
        return
    session = run_session(args.out, QUICK if args.quick else PARTS, args.budget, args.wheels)
    print(json.dumps(session, indent=2))
    print((args.out / "summary.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
