"""The Markdown for BENCHMARKS.md from benchmark JSON files (benchmarks.gpu_session), so nothing is copied by hand.

JSON in, text out: no torch or diffusers import, so a session whose set-up failed still gets its summary.

    python -m benchmarks.gpu_tables /work/.device/<files_at>      # the folder a device run's files came back to
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

MODE_NAMES = {"default": "default", "checkpointing": "checkpointing", "micro1": "micro-batch 1",
              "low": "low (checkpointing + micro-batch 1)"}
ARCHITECTURES = {"sd1": "SD1.5 arch., random weights", "sdxl": "SDXL arch., random weights"}


def _load(path: Path) -> dict[str, object] | None:
    """A JSON file's content, or None when the part did not write it (or left it unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cell(value: object, limit: int = 300) -> str:
    """value as one Markdown table cell: one line, no column bar, at most limit characters."""
    return " ".join(str(value).split()).replace("|", "\\|")[:limit]


def loops_table(result: dict[str, object]) -> str:
    """A Markdown table of the loops, as BENCHMARKS.md shows them."""
    lines = [
        "| loop | UNet dtype | s/step: mean (each round) | steps/s | samples/s | samples/s ratio (best rounds) | TFLOP/step | achieved TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in result["loops"].items():
        if e.get("status") != "ok":
            lines.append(f"| {name} | {e['dtype']} | {cell(e.get('status'))} | | | | | |")
            continue
        ratio = "; ".join(
            f"{v}x vs {k[9:]} ({e['best_round_ratio_vs_' + k[9:]]}x)" for k, v in e.items() if k.startswith("ratio_vs_")
        )
        lines.append(
            f"| {name} | {e['dtype']} | {e['step_s']} ({', '.join(map(str, e['round_step_s']))}) | {e['steps_per_s']} "
            f"| {e['samples_per_s']} | {ratio} | {e.get('tflop_per_step', e.get('flops_per_step', ''))} "
            f"| {e.get('achieved_tflops', '')} |"
        )
    return "\n".join(lines)


def mode_rows(result: dict[str, object]) -> list[str]:
    """BENCHMARKS.md's GPU table rows for one compare_baseline result: one per memory mode, measured on the device.

    Time to an identity: the mode's measured set-up plus 320 (or 25) times its mean step time, extrapolated. FLOP/s:
    the pack's counted FLOPs of one step (the model's work; checkpointing's recomputation is not counted) over the
    mode's step time, against the measured bf16 matmul peak. The ratio to the fp16 baseline is the side-by-side run's,
    whose pack ran in memory 'auto'; it goes on the row of the mode 'auto' chose.
    """
    info, loops, modes = result["info"], result["loops"], result.get("modes", {})
    pack = loops.get("pack", {})
    flops = pack.get("tflop_per_step") if isinstance(pack.get("tflop_per_step"), (int, float)) else None
    peak = (info.get("matmul_peak_tflops") or {}).get("bf16")
    chosen = str(info.get("memory_plan", ""))
    baseline = f"baseline ({info.get('baseline_mixed_precision', 'fp16')})"
    ratio = pack.get(f"ratio_vs_{baseline}")
    name = ARCHITECTURES.get(str(info.get("model")), f"{info.get('model')}, random weights")
    rows = []
    for mode, entry in modes.items():
        label = MODE_NAMES.get(mode, mode)
        lead = f"| {name} | {info['resolution']} | {info['batch_size']} | {label} |"
        if entry.get("status") != "ok":
            rows.append(f"{lead} {cell(entry.get('status'))} | | | | | | |")
            continue
        step = entry["step_s"]
        extrapolated = [f"{seconds:.1f} s" for seconds in entry["time_to_identity_extrapolated"].values()]
        achieved = "not counted"
        if flops is not None and peak:
            achieved = f"{flops / step:.1f} TFLOP/s, {100 * flops / step / peak:.0f} % of {peak:.0f}"
        plan = str(entry.get("memory_plan", ""))
        mode_ratio = f"{ratio}x" if ratio is not None and plan and plan.split(";")[0] == chosen.split(";")[0] else ""
        peak_gib = entry.get("peak_gib")
        memory = f"{peak_gib} GiB" if isinstance(peak_gib, (int, float)) else str(peak_gib)
        estimate = re.search(r"estimated peak ([0-9.]+) GB", plan)  # core.memory's GB are 2**30 bytes
        if estimate:
            memory += f" (estimated {estimate.group(1)})"
        rows.append(
            f"{lead} {entry['samples_per_s']} | {entry['steps_per_s']} | {memory} | "
            f"{' | '.join(extrapolated)} | {achieved} | "
            f"{mode_ratio} |"
        )
    return rows


MODE_HEADER = (
    "| model | resolution | batch | mode | samples/s | steps/s | peak memory (measured) | Cross-Init (320 steps), "
    "extrapolated | fast (25 steps), extrapolated | achieved / % of bf16 matmul peak | pack ÷ baseline (fp16) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def checks_table(checks: dict[str, object]) -> str:
    """One row per correctness check: its status, its numbers and its seconds."""
    lines = ["| check | status | numbers | seconds |", "|---|---|---|---|"]
    for name, entry in checks["checks"].items():
        numbers = {k: v for k, v in entry.items() if k not in ("status", "seconds", "traceback")}
        lines.append(f"| {name} | {cell(entry['status'])} | {cell(json.dumps(numbers))} | {entry.get('seconds', '')} |")
    return "\n".join(lines)


def summary(folder: Path, session: dict[str, object] | None = None) -> str:
    """Everything a session wrote under folder, as Markdown: environment, checks, and each benchmark's tables."""
    parts = [f"# GPU session: {folder}"]
    env = _load(folder / "env.json")
    if env:
        parts.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if session:
        parts.append("Parts: " + "; ".join(f"{k}: {v}" for k, v in session["parts"].items()))
    mode_lines: list[str] = []
    for path in sorted(folder.glob("*.json")):
        result = _load(path)
        if path.name == "env.json" or not isinstance(result, dict):
            continue
        if "checks" in result:  # benchmarks.gpu_checks, benchmarks.gpu_comfy_check
            parts.append(f"## {path.name}\n\n{checks_table(result)}")
            continue
        if "loops" not in result:
            continue
        info = result["info"]
        keep = ("device", "torch", "command", "matmul_peak_tflops", "memory_plan", "target_3x_vs_mixed",
                "time_to_identity_extrapolated", "pack_setup_s", "build_s", "compile_first_call_s", "compile_fell_back")
        facts = "\n".join(f"- {k}: {info[k]}" for k in keep if k in info)
        parts.append(f"## {path.name}\n\n{facts}\n\n{loops_table(result)}")
        mode_lines += mode_rows(result)
    if mode_lines:
        parts.append("## Memory modes (BENCHMARKS.md's GPU table)\n\n" + MODE_HEADER + "\n" + "\n".join(mode_lines))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    """Print the summary of a folder of session files."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    print(summary(parser.parse_args().folder))


if __name__ == "__main__":
    main()
