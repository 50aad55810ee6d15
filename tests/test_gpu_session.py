"""The prepared GPU session cannot rot: its checks run on the CPU, its parts parse, its budget holds, its tables add up."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import compare_baseline, gpu_checks, gpu_comfy_check, gpu_session
from benchmarks.gpu_checks import CHECKS, NEEDS_CUDA, failures, run_checks
from benchmarks.gpu_session import PARTS, QUICK, Part, install_wheels, run_session
from benchmarks.gpu_tables import mode_rows, summary
from core import precision

CUDA_ONLY = {"no_host_sync", "out_of_memory_keeps_rows", "compile_matches_eager"}


@pytest.fixture(scope="module")
def cpu_checks() -> dict[str, object]:
    """Every check, once, on the CPU."""
    return run_checks("cpu", log=lambda _: None)


def test_checks_pass_on_the_cpu_and_say_which_need_cuda(cpu_checks: dict[str, object]) -> None:
    results = cpu_checks["checks"]
    assert set(results) == set(CHECKS) and not failures(cpu_checks)
    for name, entry in results.items():
        assert entry["status"] == (NEEDS_CUDA if name in CUDA_ONLY else "pass"), (name, entry)
    precision_numbers = results["half_precision_gradient"]
    assert precision_numbers["fp16"]["loss_scaled"] and not precision_numbers["bf16"]["loss_scaled"]
    assert results["face_loss_half_precision"]["face_term_share"] > 0.01


def test_a_broken_loss_scaler_fails_its_check_and_the_rest_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision.LossScaler, "update", lambda self, ok: None)  # never lowers the scale on overflow
    monkeypatch.setitem(CHECKS, "unet_stays", lambda device: 1 / 0)
    result = run_checks("cpu", only=("fp16_overflow_skips", "unet_stays", "micro_batches"), log=lambda _: None)
    checks = result["checks"]
    assert checks["fp16_overflow_skips"]["status"].startswith("FAIL: the scale is")
    assert checks["unet_stays"]["status"].startswith("FAIL: ZeroDivisionError") and "traceback" in checks["unet_stays"]
    assert checks["micro_batches"]["status"] == "pass"
    assert failures(result) == ["fp16_overflow_skips", "unet_stays"]


def test_unknown_check_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown check"):
        run_checks("cpu", only=("no_such_check",))


PARSERS = {"benchmarks.compare_baseline": compare_baseline.build_parser, "benchmarks.gpu_checks": gpu_checks.build_parser,
           "benchmarks.gpu_comfy_check": gpu_comfy_check.build_parser}


@pytest.mark.parametrize("part", [*PARTS, *QUICK], ids=lambda p: p.name)
def test_every_session_part_is_a_command_its_script_accepts(part: Part) -> None:
    assert part.args[0] == "-m" and part.args[1] in PARSERS
    args = [a.replace("{out}", "/out") for a in part.args[2:]]
    parsed = PARSERS[part.args[1]]().parse_args(args)
    assert parsed.json == f"/out/{part.output}"
    if part in PARTS:
        assert parsed.device == "cuda"
    if part.args[1] == "benchmarks.gpu_comfy_check":
        assert parsed.comfyui == gpu_session.COMFY_COPY


def test_the_session_fits_the_device_run_it_documents() -> None:
    """The budget fits the documented timeout_s, and the checks and both benchmarks fit the budget at their limits."""
    assert f"timeout_s {gpu_session.DEVICE_TIMEOUT_S}" in gpu_session.__doc__
    assert gpu_session.BUDGET_S + 20 <= gpu_session.DEVICE_TIMEOUT_S <= 600  # 600 s: the device's per-command limit
    essential = [p for p in PARTS if p.name in ("checks", "sd1_512", "comfy", "sdxl_1024")]
    assert len(essential) == 4 and sum(p.seconds for p in essential) + gpu_session.RESERVE_S <= gpu_session.BUDGET_S
    assert len(PARTS) + 3 <= 8  # env.json, session.log and summary.md too: the device returns at most 8 files


def test_session_runs_parts_in_order_within_the_budget(tmp_path: Path) -> None:
    parts = (
        Part("fast", ("-c", "import os; print('fast part ran', os.environ['PROBE'])"), 10, "fast.json", (("PROBE", "x1"),)),
        Part("slow", ("-c", "import time; time.sleep(60)"), 4),
        Part("late", ("-c", "print('late part ran')"), 40),
        Part("short", ("-c", "print('short part ran')"), 2),
    )
    session = run_session(tmp_path, parts, budget_s=38, wheels=tmp_path / "none")
    assert session["parts"]["fast"].startswith("ok in") and session["parts"]["fast"].endswith("no fast.json written (see session.log)")
    assert session["parts"]["slow"].startswith("timed out after 4 s")
    # 38 s - 15 s reserve - ~4 s leaves ~19 s: under the late part's minimum (20 s), over the short one's (1 s)
    assert session["parts"]["late"].startswith("not run: 19 s left of the budget, it needs 20 s")
    assert session["parts"]["short"].startswith("ok in")
    log = (tmp_path / "session.log").read_text(encoding="utf-8")
    assert "fast part ran x1" in log and "late part ran" not in log and "short part ran" in log and "no wheels in" in log
    assert json.loads((tmp_path / "env.json").read_text(encoding="utf-8"))["python"]
    assert "Parts: fast: ok" in (tmp_path / "summary.md").read_text(encoding="utf-8")


def _wheel(folder: Path, package: str = "it_probe_pkg") -> Path:
    """A minimal pure-Python wheel of one module that prints where it was imported from."""
    path = folder / f"{package}-1.0-py3-none-any.whl"
    files = {f"{package}/__init__.py": b"LOADED = 'from the carried wheel'\n",
             f"{package}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n".encode(),
             f"{package}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
              for name, data in files.items()]
    files[f"{package}-1.0.dist-info/RECORD"] = ("\n".join([*record, f"{package}-1.0.dist-info/RECORD,,"]) + "\n").encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_carried_wheels_are_installed_for_the_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    said = install_wheels(wheels, tmp_path / "site")
    assert said.startswith("installed it_probe_pkg-1.0-py3-none-any.whl")
    child = subprocess.run([sys.executable, "-c", "import it_probe_pkg; print(it_probe_pkg.LOADED)"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "from the carried wheel"


def test_a_wheel_that_fails_leaves_the_others_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip archive")  # pip refuses it, and with it the call
    _wheel(wheels)
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = "import it_probe_pkg; print(it_probe_pkg.LOADED)"
    session = run_session(tmp_path / "out", (Part("probe", ("-c", code), 20),), budget_s=70, wheels=wheels)
    log = (tmp_path / "out" / "session.log").read_text(encoding="utf-8")
    assert log.startswith("installed it_probe_pkg-1.0-py3-none-any.whl into ")
    assert "installing the wheels failed for broken-1.0-py3-none-any.whl (exit " in log
    assert "from the carried wheel" in log
    assert session["parts"]["probe"].startswith("ok in") and (tmp_path / "out" / "summary.md").is_file()


def _gpu_result(chosen: str) -> dict[str, object]:
    """A compare_baseline result as CUDA writes it (plan strings with the estimate and free memory), modes made up."""
    plans = {
        "default": "estimated peak 8.3 GB without gradient checkpointing; 70.1 GB free",
        "checkpointing": "estimated peak 3.9 GB with gradient checkpointing; 70.1 GB free",
        "micro1": "estimated peak 2.9 GB without gradient checkpointing, micro-batch 1 of 8; 70.1 GB free",
    }
    modes = {
        mode: {"status": "ok", "steps_per_s": 4.0, "samples_per_s": 32.0, "step_s": 0.25, "setup_s": 2.0,
               "time_to_identity_extrapolated": {"cross_init_320_steps_s": 82.0, "fast_25_steps_s": 8.2},
               "memory_plan": plan, "peak_gib": 7.5}
        for mode, plan in plans.items()
    }
    modes["low"] = {"status": "out of memory"}
    info = {"model": "sd1", "resolution": 512, "batch_size": 8, "memory_plan": plans[chosen].replace("70.1", "69.0"),
            "matmul_peak_tflops": {"bf16": 800.0}, "baseline_mixed_precision": "fp16"}
    pack = {"status": "ok", "tflop_per_step": 100.0, "ratio_vs_baseline (fp16)": 2.5}
    return {"info": info, "loops": {"pack": pack}, "modes": modes}


@pytest.mark.parametrize("chosen", ["default", "checkpointing"])
def test_the_ratio_goes_on_the_row_of_the_mode_auto_chose(chosen: str) -> None:
    rows = {r.split(" | ")[3]: r for r in mode_rows(_gpu_result(chosen))}
    label = {"default": "default", "checkpointing": "checkpointing"}[chosen]
    assert [name for name, row in rows.items() if row.endswith("| 2.5x |")] == [label]
    assert "| 7.5 GiB (estimated 8.3) |" in rows["default"] and "| 82.0 s | 8.2 s |" in rows["default"]
    assert "| 400.0 TFLOP/s, 50 % of 800 |" in rows["micro-batch 1"]  # 100 TFLOP per 0.25 s step
    assert rows["low (checkpointing + micro-batch 1)"].endswith("| out of memory | | | | | | |")


def test_failure_messages_stay_in_their_table_cell(tmp_path: Path) -> None:
    checks = {"info": {}, "checks": {"no_host_sync": {"status": "FAIL: a | b\nc", "seconds": 1.0}}}
    (tmp_path / "checks.json").write_text(json.dumps(checks), encoding="utf-8")
    (tmp_path / "sd1_512.json").write_text('{"info": {"trunc', encoding="utf-8")  # a part killed mid-write
    text = summary(tmp_path)
    assert "| no_host_sync | FAIL: a \\| b c | {} | 1.0 |" in text and "sd1_512" not in text


def test_summary_turns_a_result_into_the_gpu_table_rows(tmp_path: Path, cpu_checks: dict[str, object]) -> None:
    result = compare_baseline.compare(
        model="tiny", resolution=32, batch_size=2, warmup=1, steps=1, rounds=1, flops=False, log=lambda _: None,
        modes=("default", "micro1"),
    )
    (tmp_path / "tiny_32.json").write_text(json.dumps(result), encoding="utf-8")
    (tmp_path / "checks.json").write_text(json.dumps(cpu_checks), encoding="utf-8")
    rows = mode_rows(result)
    assert [r.split(" | ")[3] for r in rows] == ["default", "micro-batch 1"]
    micro = result["modes"]["micro1"]
    want = micro["setup_s"] + compare_baseline.CROSS_INIT_STEPS * micro["step_s"]
    assert abs(micro["time_to_identity_extrapolated"]["cross_init_320_steps_s"] - want) < 0.1  # setup_s is rounded
    assert f"{micro['time_to_identity_extrapolated']['cross_init_320_steps_s']:.1f} s" in rows[1]
    assert "n/a on the CPU" in rows[1]
    assert f"| {result['loops']['pack']['ratio_vs_baseline (bf16)']}x |" in rows[0]  # auto chose the default mode
    assert not rows[1].endswith("x |")
    text = summary(tmp_path)
    assert "| no_host_sync | not run: needs CUDA |" in text and "## tiny_32.json" in text and rows[1] in text


def test_the_comfyui_checks_pass_on_the_cpu(tmp_path: Path) -> None:
    """The ComfyUI part as the session runs it (its own process), on CI's ComfyUI started with --cpu."""
    from tests.comfyui_env import ensure_comfyui

    out = tmp_path / "comfy.json"
    command = [sys.executable, "-m", "benchmarks.gpu_comfy_check", "--device", "cpu", "--comfyui", str(ensure_comfyui()),
               "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(out.read_text(encoding="utf-8"))["checks"]
    assert set(checks) == set(gpu_comfy_check.COMFY_CHECKS) and all(c["status"] == "pass" for c in checks.values())
    assert checks["photos_encoded_before_the_unet_loads"]["events"][:2] == ["load AutoencoderKL", "load BaseModel"]
    text = summary(tmp_path)
    assert "## comfy.json" in text and "| identity_applies | pass |" in text
    assert checks["unet_loaded_by_a_sampler_is_kept"]["events"] == ["load AutoencoderKL", "load TinySD1ClipModel"]


def test_without_a_comfyui_folder_every_comfy_check_says_so(tmp_path: Path) -> None:
    result = gpu_comfy_check.run_comfy_checks("cpu", tmp_path / "nowhere")
    assert all(c["status"].startswith("not run: no ComfyUI at") for c in result["checks"].values())
    assert not failures(result)
