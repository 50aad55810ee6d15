"""Benchmark: training steps per second and peak memory for a preset on a model (default: tiny SD1 on the CPU)."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from core.models import default_resolution, load_model, resolve_device
from core.trainer import Trainer, preset_config


def measure(model_spec: str, preset: str, steps: int, batch_size: int, device_name: str) -> dict[str, object]:
    """Time model loading, trainer set-up (init + latent encoding) and the training steps."""
    device = resolve_device(device_name)
    started = time.perf_counter()
    model = load_model(model_spec, device)
    loaded = time.perf_counter()
    resolution = default_resolution(model)
    images = torch.rand(4, 3, resolution, resolution) * 2 - 1
    config = preset_config(preset, steps=steps, batch_size=batch_size, resolution=resolution, token="<bench>")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model, images, config)
    ready = time.perf_counter()
    trainer.run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    result = {
        "model": model_spec, "preset": preset, "device": str(device), "steps": steps, "batch_size": batch_size,
        "resolution": resolution, "load_s": round(loaded - started, 2), "setup_s": round(ready - loaded, 2),
        "train_s": round(done - ready, 2), "steps_per_s": round(steps / (done - ready), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    """Parse arguments, run once, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--preset", default="cross_init")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.preset, args.steps, args.batch_size, args.device), indent=2))


if __name__ == "__main__":
    main()
