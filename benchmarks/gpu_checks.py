"""Correctness checks of the trainer on a real device, for the few minutes a GPU is lent (issue 7).

The CPU test suite proves each behaviour with CPU kernels. This script repeats what could differ on CUDA, with
tiny random-weight models: half-precision gradients against fp32 on the same device, fp16 overflow handling, micro-
batches and gradient checkpointing against the default step, the same rows for the same seed, no host syncs inside a
step (torch.cuda.set_sync_debug_mode), a real CUDA out-of-memory error mid-run, the face loss's attention capture in
half precision, the UNet staying put, and torch.compile against eager. Checks that need CUDA say "not run: needs CUDA"
on the CPU; the others run anywhere, so the script is exercised by the CPU tests.

    python -m benchmarks.gpu_checks --device cuda --json checks.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from benchmarks.json_out import write_json
from core.acceleration import CompileTimer
from core.backends.diffusers import place_components
from core.checkpointing import is_checkpointed
from core.identity import Identity
from core.models import resolve_device
from core.protocols import Model
from core.sefi import FaceLoss
from core.tiny import model_from_components, tiny_components
from core.trainer import OUT_OF_MEMORY, Trainer, preset_config

NEEDS_CUDA = "not run: needs CUDA"
LATENT, BATCH = 64, 4  # as tests/test_precision.py: dL/dcontext falls below float16's normal range at this size


class CheckFailed(AssertionError):
    """A check's condition did not hold; the message says which numbers."""


def expect(condition: bool, message: str) -> None:
    """Raise CheckFailed(message) unless condition holds."""
    if not condition:
        raise CheckFailed(message)


def tiny_on(device: torch.device, dtype: torch.dtype = torch.float32, family: str = "sd1") -> Model:
    """A tiny model of family whose every module computes in dtype on device."""
    return model_from_components(family, place_components(tiny_components(family), device, dtype))


def trainer_on(model: Model, batch_size: int = 2, latent: int = 8, masks: torch.Tensor | None = None,
               face_masks: torch.Tensor | None = None, **overrides: object) -> Trainer:
    """A trainer on two fixed latents (no VAE pass) with the same start rows whatever the dtype or device."""
    gen = torch.Generator().manual_seed(7)
    mean, std = torch.randn(2, 4, latent, latent, generator=gen), 0.1 * torch.rand(2, 4, latent, latent, generator=gen)
    starts = {enc.key: 0.02 * torch.randn(2, enc.width, generator=gen) for enc in model.encoders}
    values = {"batch_size": batch_size, "resolution": latent * 8, "flip_p": 0.0, "token": "<gpu>", "seed": 5,
              "attention_maps": False, "memory": "default"}
    config = preset_config("cross_init_fast", **{**values, **overrides})
    images = torch.zeros(2, 3, latent * 8, latent * 8)
    return Trainer(model, images, config, init=Identity(starts), masks=masks, latents=(mean, std), face_masks=face_masks)


@contextmanager
def strict_float32() -> Iterator[None]:
    """Within the block float32 is float32 on CUDA too: no TF32 in matmuls or cuDNN convolutions (references only)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """||got - want|| / ||want|| and their cosine, in float64 on the CPU."""
    got, want = got.detach().flatten().double().cpu(), want.detach().flatten().double().cpu()
    return float((got - want).norm() / want.norm()), float(F.cosine_similarity(got, want, dim=0))


def check_half_precision_gradient(device: torch.device) -> dict[str, object]:
    """One step's identity-row gradient in fp16 (loss-scaled) and bf16 against fp32, same device, same batch."""
    reference = trainer_on(tiny_on(device), batch_size=BATCH, latent=LATENT, reg_weight=0.0)
    batch = reference.sample_batch()
    with strict_float32():
        reference.step(batch)
    want = reference.rows["clip_l"].grad.detach().clone()
    out: dict[str, object] = {}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        trainer = trainer_on(tiny_on(device, dtype), batch_size=BATCH, latent=LATENT, reg_weight=0.0)
        trainer.step(batch)
        error, cosine = relative_error(trainer.rows["clip_l"].grad, want)
        out[name] = {"relative_error": round(error, 5), "cosine": round(cosine, 6), "loss_scaled": trainer.scaler.enabled}
        expect(error < 0.02 and cosine > 0.999, f"{name}: relative error {error:.4f}, cosine {cosine:.5f}")
        expect(trainer.rows["clip_l"].dtype == torch.float32, f"{name}: the rows are {trainer.rows['clip_l'].dtype}")
    return out


def check_fp16_overflow_skips(device: torch.device) -> dict[str, object]:
    """A loss scale far too large: the step is skipped, the rows stay, the scale halves."""
    trainer = trainer_on(tiny_on(device, torch.float16), fp16_loss_scale=2.0**40)
    before = trainer.rows["clip_l"].detach().clone()
    trainer.step(trainer.sample_batch())
    applied, scale = bool(trainer.last_applied), float(trainer.scaler.value)
    expect(not applied, "the overflowing step was applied")
    expect(torch.equal(trainer.rows["clip_l"].detach(), before), "the rows changed in a skipped step")
    expect(scale == 2.0**39, f"the scale is {scale}, not 2^39")
    return {"applied": applied, "scale_after": scale}


def _gradients(device: torch.device, runs: dict[str, dict[str, object]], batch_size: int = 4) -> dict[str, torch.Tensor]:
    """One step's row gradient per named run, every run on the same batch and in strict float32.

    A run is TrainConfig overrides plus, under the key "within", a function of the model giving a context (the
    denoiser's checkpointing or compiled forward) the step runs in. Gradients, not rows after several AdamW steps, are
    compared: AdamW's first steps move each row element by about the learning rate whatever its gradient's size, so
    rounding noise on a near-zero element would show as a large difference in the rows.
    """
    model = tiny_on(device)
    batch = trainer_on(model, batch_size=batch_size).sample_batch()
    out: dict[str, torch.Tensor] = {}
    with strict_float32():
        for name, run in runs.items():
            overrides = {k: v for k, v in run.items() if k != "within"}
            trainer = trainer_on(model, batch_size=batch_size, reg_weight=0.5, **overrides)
            within = run.get("within")
            with within(model) if within is not None else nullcontext():
                trainer.step(batch)
            out[name] = trainer.rows["clip_l"].grad.detach().clone()
    return out


def _compare_gradients(grads: dict[str, torch.Tensor], bound: float) -> dict[str, object]:
    """Each run's gradient against the first's: relative errors, each under bound."""
    (reference, want), *others = grads.items()
    out: dict[str, object] = {}
    for name, got in others:
        error, cosine = relative_error(got, want)
        out[name] = {"gradient_relative_error": error, "cosine": round(cosine, 8)}
        expect(error < bound, f"{name}: the row gradient differs from {reference}'s by {error:.2e} (bound {bound:.0e})")
    return out


def check_micro_batches(device: torch.device) -> dict[str, object]:
    """Micro-batches of 1 and 3 over a batch of 5 give the full batch's row gradient."""
    runs = {"whole batch": {}, "micro-batch 1": {"micro_batch_size": 1}, "micro-batch 3": {"micro_batch_size": 3}}
    return _compare_gradients(_gradients(device, runs, batch_size=5), 1e-4)


@contextmanager
def _checkpointed(model: Model) -> Iterator[None]:
    """The denoiser's gradient checkpointing, seen to wrap the UNet's layers."""
    with model.denoiser.checkpointing():
        expect(any(is_checkpointed(m) for m in model.denoiser.unet.modules()), "checkpointing wrapped no UNet layer")
        yield


def check_checkpointing(device: torch.device) -> dict[str, object]:
    """Gradient checkpointing, alone and with micro-batch 1 (the low mode), gives the default step's gradient."""
    runs = {
        "default": {},
        "checkpointing": {"within": _checkpointed},
        "checkpointing + micro-batch 1": {"within": _checkpointed, "micro_batch_size": 1},
    }
    return _compare_gradients(_gradients(device, runs), 1e-4)


def _rows_after(device: torch.device, steps: int = 3, **overrides: object) -> tuple[torch.Tensor, Trainer]:
    """The rows after a short run of a fresh tiny model on device."""
    trainer = trainer_on(tiny_on(device), batch_size=4, steps=steps, **overrides)
    result = trainer.run()
    expect(not result.stopped, f"training stopped: {result.stopped}")
    return result.identity.rows["clip_l"], trainer


def check_same_seed_same_rows(device: torch.device) -> dict[str, object]:
    """Two runs with one seed on one device type: the same rows (exactly on the CPU; CUDA may differ in rounding)."""
    first, _ = _rows_after(device, steps=4)
    second, _ = _rows_after(device, steps=4)
    error, _ = relative_error(second, first)
    out = {"bitwise_equal": bool(torch.equal(first, second)), "rows_relative_error": error}
    if device.type == "cpu":
        expect(out["bitwise_equal"], f"CPU rows differ by {error:.2e} between two runs with one seed")
    expect(error < 1e-3, f"rows differ by {error:.2e} between two runs with one seed")
    return out


def check_unet_stays(device: torch.device) -> dict[str, object]:
    """A run moves no module (no Module.to/_apply) and leaves the UNet's weights where they were."""
    model = tiny_on(device)
    unet = model.denoiser.unet
    moved: list[str] = []
    original = torch.nn.Module._apply

    def counting(module: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
        moved.append(type(module).__name__)
        return original(module, *args, **kwargs)

    trainer = trainer_on(model, steps=3)
    torch.nn.Module._apply = counting
    try:
        result = trainer.run()
    finally:
        torch.nn.Module._apply = original
    expect(not result.stopped, f"training stopped: {result.stopped}")
    devices = sorted({str(p.device) for p in unet.parameters()})
    expect(not moved, f"modules moved during the run: {moved[:5]}")
    expect(devices == [str(next(unet.parameters()).device)] and devices[0].startswith(device.type), f"UNet on {devices}")
    return {"module_moves": len(moved), "unet_devices": devices}


@contextmanager
def sync_debug_errors() -> Iterator[None]:
    """Within the block, an operation that makes the host wait for the GPU raises (torch.cuda.set_sync_debug_mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_no_host_sync(device: torch.device) -> dict[str, object]:
    """A whole step (sampling, masks, micro-batches, regulariser, fp16 scaling, capturable AdamW) never waits."""
    if device.type != "cuda":
        return {"status": NEEDS_CUDA}
    masks = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    out: dict[str, object] = {}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        trainer = trainer_on(tiny_on(device, dtype), batch_size=4, masks=masks, micro_batch_size=2, reg_weight=0.5)
        trainer.step(trainer.sample_batch())  # the first step fills the prompt and schedule caches
        torch.cuda.synchronize(device)
        try:
            with sync_debug_errors():
                trainer.step(trainer.sample_batch())
        except RuntimeError as error:
            raise CheckFailed(f"{name}: a step synchronised with the host: {error}") from error
        out[name] = "no sync"
    return out


def check_out_of_memory_keeps_rows(device: torch.device) -> dict[str, object]:
    """A real CUDA out-of-memory error at step 2 ends the run with step 1's rows and a message naming the settings."""
    if device.type != "cuda":
        return {"status": NEEDS_CUDA}
    trainer = trainer_on(tiny_on(device), batch_size=4, latent=32, steps=4)
    filler: list[torch.Tensor] = []

    def fill_memory(step: int, _total: int, _loss: float) -> None:
        if step == 1 and not filler:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            for chunk in (2**28, 2**24, 2**20, 2**16):  # take every free byte, in ever smaller pieces
                while True:
                    try:
                        filler.append(torch.empty(chunk, dtype=torch.uint8, device=device))
                    except torch.OutOfMemoryError:
                        break

    try:
        result = trainer.run(on_step=fill_memory)
    finally:
        filler.clear()
        torch.cuda.empty_cache()
    rows = result.identity.rows["clip_l"]
    expect(result.stopped.startswith(OUT_OF_MEMORY), f"the run ended with '{result.stopped}'")
    expect("batch size 4" in result.stopped, f"the message names no batch size: '{result.stopped}'")
    expect(bool(torch.isfinite(rows).all()) and trainer.steps_done >= 1, f"{trainer.steps_done} steps kept")
    return {"stopped": result.stopped, "steps_kept": trainer.steps_done, "partial": result.identity.metadata.get("partial")}


def _face_gradient(device: torch.device, dtype: torch.dtype, weight: float = 0.3) -> tuple[float, torch.Tensor]:
    """The loss and identity-row gradient of a one-step run with the face loss (its capture is on inside run only)."""
    face = torch.zeros(2, 1, 64, 64)
    face[:, :, 16:48, 16:48] = 1.0
    loss = FaceLoss(weight=weight)
    trainer = trainer_on(tiny_on(device, dtype), face_masks=face, face_loss=loss, reg_weight=0.0, steps=1)
    result = trainer.run()
    expect(not result.stopped and len(result.losses) == 1, f"{dtype}: the face-loss step stopped: {result.stopped}")
    return result.losses[0], trainer.rows["clip_l"].grad.detach().clone()


def check_face_loss_half_precision(device: torch.device) -> dict[str, object]:
    """The face loss's attention capture trains in fp16 and bf16: a finite loss and a gradient near fp32's."""
    _, want = _face_gradient(device, torch.float32)  # with TF32 on CUDA, as run() trains: the bound below allows it
    _, without = _face_gradient(device, torch.float32, weight=0.0)
    share, _ = relative_error(want, without)
    expect(share > 0.01, f"the face term moves the fp32 gradient by only {share:.2e}: the check would not see it")
    out: dict[str, object] = {"face_term_share": round(share, 4)}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        loss, got = _face_gradient(device, dtype)
        error, cosine = relative_error(got, want)
        out[name] = {"loss": loss, "relative_error": round(error, 5), "cosine": round(cosine, 6)}
        expect(math.isfinite(loss), f"{name}: loss {loss}")
        expect(cosine > 0.99, f"{name}: gradient cosine {cosine:.4f} against fp32")
    return out


def check_compile_matches_eager(device: torch.device) -> dict[str, object]:
    """torch.compile of the UNet gives eager's row gradient, with a graph compiled (no fallback); the first call's seconds."""
    if device.type != "cuda":
        return {"status": NEEDS_CUDA}
    timer = CompileTimer()
    runs = {"eager": {}, "compiled": {"within": lambda model: model.denoiser.compiled(timer)}}
    out = _compare_gradients(_gradients(device, runs), 1e-3)
    out.update(fell_back=timer.fell_back, first_call_s=timer.first_call_seconds)
    expect(not timer.fell_back, f"compile fell back: {timer.fell_back}")
    return out


CHECKS: dict[str, Callable[[torch.device], dict[str, object]]] = {
    "half_precision_gradient": check_half_precision_gradient,
    "fp16_overflow_skips": check_fp16_overflow_skips,
    "micro_batches": check_micro_batches,
    "checkpointing": check_checkpointing,
    "same_seed_same_rows": check_same_seed_same_rows,
    "unet_stays": check_unet_stays,
    "no_host_sync": check_no_host_sync,
    "out_of_memory_keeps_rows": check_out_of_memory_keeps_rows,
    "face_loss_half_precision": check_face_loss_half_precision,
    "compile_matches_eager": check_compile_matches_eager,  # last: the slowest
}


def run_checks(
    device: str = "auto", only: tuple[str, ...] = (), log: Callable[[str], None] = print,
    save: Callable[[dict[str, object]], None] | None = None,
    checks: dict[str, Callable[[torch.device], dict[str, object]]] = CHECKS,
) -> dict[str, object]:
    """Run the checks (all, or those named in only) on device; each result has status pass, FAIL, or not run.

    save, when given, gets the results so far after each check, so a run cut short keeps the checks it finished.
    """
    unknown = sorted(set(only) - set(checks))
    if unknown:
        raise SystemExit(f"--only: unknown check(s) {unknown}; choose from {sorted(checks)}")
    dev = resolve_device(device)
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results: dict[str, dict[str, object]] = {}
    for name, check in checks.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        try:
            found = check(dev)
            entry = found if str(found.get("status", "")).startswith("not run") else {"status": "pass", **found}
        except CheckFailed as failure:
            entry = {"status": f"FAIL: {failure}"}
        except Exception as error:  # noqa: BLE001 - a crash is a failed check; the others still run
            entry = {"status": f"FAIL: {type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=-8)}
        entry["seconds"] = round(time.perf_counter() - started, 2)
        results[name] = entry
        log(f"{name}: {entry['status']} ({entry['seconds']} s)")
        if save is not None:
            save({"info": info, "checks": results})
    return {"info": info, "checks": results}


def failures(result: dict[str, object]) -> list[str]:
    """The names of the checks that failed."""
    return [name for name, entry in result["checks"].items() if str(entry["status"]).startswith("FAIL")]


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--only", nargs="*", default=(), choices=list(CHECKS), help="run only these checks")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser


def main() -> None:
    """Parse arguments, run the checks, print and save them; exit 1 when one failed."""
    args = build_parser().parse_args()
    save = (lambda so_far: write_json(args.json, so_far)) if args.json else None
    result = run_checks(args.device, tuple(args.only), save=save)
    print(json.dumps(result, indent=2, default=str))
    sys.exit(1 if failures(result) else 0)


if __name__ == "__main__":
    main()
