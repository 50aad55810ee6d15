"""Benchmark: estimated peak training memory per model family and memory mode, from meta-device counts (no GPU needed).

Run from the repository root: ``python -m benchmarks.memory_estimate`` (SD1.5 at 512 px and SDXL at 1024 px, batch 8,
fp16, modes default / checkpointing / checkpointing + micro-batch 1). ``--free 8`` adds the mode the pack would pick
with 8 GB free. GB are 2**30 bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from core.memory import GB, choose_memory_mode, estimate_training_memory, training_estimator

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = (("default", False, None), ("checkpointing", True, None), ("checkpointing + micro-batch 1", True, 1))


def rows(targets: list[tuple[str, int]], batch: int, dtype: torch.dtype) -> list[dict[str, object]]:
    """One row per family, resolution and mode: the estimate's parts in GB and the seconds it took."""
    table = []
    for family, resolution in targets:
        for mode, checkpointing, micro_batch in MODES:
            started = time.perf_counter()
            footprint = estimate_training_memory(
                family, resolution, micro_batch or batch, dtype, checkpointing, prompts=batch
            )
            table.append({
                "family": family, "resolution": resolution, "batch": batch, "mode": mode,
                "weights_gb": round(footprint.weights / GB, 2), "activations_gb": round(footprint.activations / GB, 2),
                "saved_gb": round(footprint.saved / GB, 2), "peak_gb": round(footprint.peak / GB, 2),
                "seconds": round(time.perf_counter() - started, 1),
            })
    return table


def print_table(table: list[dict[str, object]]) -> None:
    """The rows as an aligned text table."""
    header = ("family", "res", "batch", "mode", "weights", "activations", "saved", "peak GB", "s")
    keys = ("family", "resolution", "batch", "mode", "weights_gb", "activations_gb", "saved_gb", "peak_gb", "seconds")
    widths = (6, 5, 5, 30, 8, 11, 7, 8, 5)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(str(row[k]).ljust(w) for k, w in zip(keys, widths)))


def parse_target(text: str) -> tuple[str, int]:
    """'sd1:512' -> ('sd1', 512)."""
    family, _, resolution = text.partition(":")
    return family, int(resolution or 512)


def main() -> None:
    """Parse arguments, estimate every row, print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["sd1:512", "sdxl:1024"], help="family:resolution pairs")
    parser.add_argument("--batch", type=int, default=8, help="the method's batch (Cross-Init: 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="UNet and text-encoder compute dtype")
    parser.add_argument("--free", type=float, default=None, help="GB free: also print the mode the pack would choose")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    targets = [parse_target(t) for t in args.targets]
    table = rows(targets, args.batch, DTYPES[args.dtype])
    plans = []
    if args.free is not None:
        for family, resolution in targets:
            estimate = training_estimator(family, resolution, args.batch, DTYPES[args.dtype])
            plan = choose_memory_mode(estimate, int(args.free * GB), args.batch)
            plans.append(f"{family} {resolution} px: {plan.mode}: {plan.describe()}")
    if args.json:
        meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "dtype": args.dtype}
        print(json.dumps({"rows": table, "plans": plans, **meta}, indent=2))
        return
    print(f"estimated peak training memory, {args.dtype}, meta-device counts (torch {torch.__version__}); GB = 2**30 B")
    print_table(table)
    for line in plans:
        print(line)


if __name__ == "__main__":
    main()
