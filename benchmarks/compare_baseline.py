"""Side by side in one process: the diffusers-TI baseline loop (benchmarks/baseline_ti.py) and the pack's Trainer.

Same random weights (built once from core/configs/<model> with from_config, nothing downloaded), same images, same
batch size and resolution. Each loop is warmed up, then timed for --steps steps per round; with several rounds the
loops take turns (the order flips every round) so a change in machine load hits all of them. Reported per loop:
steps/s, samples/s, seconds per step per round, and the pack's samples/s over each baseline's.

The pack gets the model the way its loader builds one (core.backends.diffusers.place_components in
core.models.compute_dtype(device): float32 on the CPU, bf16/fp16 on CUDA; --pack-dtype overrides) and runs
Trainer.run() with the preset's settings (default: cross_init) except steps, batch size and resolution. The baseline
runs with its --mixed_precision off ("no") and on (fp16 on CUDA, bf16 on the CPU; --baseline-mixed overrides).

Also: the FLOPs of one step of each loop counted with torch.utils.flop_counter.FlopCounterMode, the achieved FLOP/s
from the timed steps, and the measured matmul peak (bf16, and the pack's dtype) of the device; on CUDA, the pack's
peak memory in each mode (default, gradient checkpointing, micro-batch 1, where TrainConfig has the fields), and the
time to a Cross-Init identity (320 steps) and a fast one (25 steps) extrapolated from the measured step time.

Run from the repository root, e.g.
  .venv/bin/python -m benchmarks.compare_baseline --model sd1 --resolution 128           # CPU scale
  .venv/bin/python -m benchmarks.compare_baseline --device cuda --model sd1 --resolution 512
  .venv/bin/python -m benchmarks.compare_baseline --device cuda --model sdxl --resolution 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.baseline_ti import MIXED_PRECISION, BaselineTI, cast_copy, family_of, random_components
from benchmarks.gpu_tables import loops_table
from benchmarks.json_out import write_json
from core.backends.diffusers import place_components
from core.models import compute_dtype, resolve_device
from core.templates import training_prompts
from core.tiny import model_from_components
from core.trainer import PRESETS, TrainConfig, Trainer, preset_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CROSS_INIT_STEPS, FAST_STEPS = PRESETS["cross_init"]["steps"], PRESETS["cross_init_fast"]["steps"]  # 320 and 25
MODES: dict[str, list[dict[str, object]]] = {  # mode -> TrainConfig overrides; the first whose fields all exist is used
    "default": [{"memory": "default"}, {}],
    "checkpointing": [{"memory": "checkpointing"}, {"gradient_checkpointing": True}],
    "micro1": [{"memory": "default", "micro_batch_size": 1}, {"micro_batch_size": 1}],
    "low": [{"memory": "low"}],  # checkpointing + micro-batch 1
}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sig(value: float, digits: int = 4) -> float:
    """value rounded to a few significant digits (FLOP counts span 1e-4 to 1e3 TFLOP)."""
    return float(f"{value:.{digits}g}")


def dtype_name(dtype: torch.dtype) -> str:
    """fp32 / bf16 / fp16."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(device: torch.device) -> dict[str, object]:
    """Versions, device, date, the exact command, threads and load: what BENCHMARKS.md rows need."""
    import diffusers
    import transformers

    info: dict[str, object] = {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), "-m", "benchmarks.compare_baseline", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    info.update(git())
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def git() -> dict[str, object]:
    """The commit measured and the files of core/ that differ from it (other work in progress is part of the run)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def out(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in out("status", "--porcelain", "--", "core").splitlines()]
    return {"commit": out("rev-parse", "--short", "HEAD").strip() or "unknown", "core_uncommitted": changed}


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 1.0) -> float:
    """Measured dense matmul FLOP/s of (size x size) @ (size x size) in dtype, best of a few timed batches."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best, spent = 0.0, 0.0
    reps = 20 if device.type == "cuda" else 2
    while spent < seconds:
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        took = time.perf_counter() - started
        spent += took
        best = max(best, 2 * size**3 * reps / took)
    return best


class PackRunner:
    """The pack's Trainer; steps(n) continues Trainer.run() for n more steps (the run's own loop, a no-op progress)."""

    def __init__(self, model: object, images: torch.Tensor, config: TrainConfig, name: str = "pack") -> None:
        self.name = name
        device = model.denoiser.device
        sync(device)
        started = time.perf_counter()
        self.trainer = Trainer(model, images, dataclasses.replace(config, attention_maps=False))  # the steps only, no heatmap
        sync(device)
        planned = time.perf_counter()
        self.trainer.plan_memory()  # run() plans again, from the estimator's cache: a user's first run pays this once
        self.plan_s = time.perf_counter() - planned
        self.setup_s = time.perf_counter() - started  # encoding the photos, the start rows, and the memory plan
        self.batch_size = config.batch_size
        self.dtype = model.denoiser.dtype if hasattr(model.denoiser, "dtype") else next(model.denoiser.unet.parameters()).dtype

    def plan(self) -> dict[str, object]:
        """The memory plan the trainer chose and the first compiled call's seconds, where the trainer has them."""
        out: dict[str, object] = {}
        plan = getattr(self.trainer, "memory_plan", None)
        if plan is not None:
            out["memory_plan"] = plan.describe() if hasattr(plan, "describe") else str(plan)
        timer = getattr(self.trainer, "compile_timer", None)
        if getattr(self.trainer.config, "compile", False) and timer is not None:
            out["compile_first_call_s"] = getattr(timer, "first_call_seconds", None)
            out["compile_fell_back"] = getattr(timer, "fell_back", None) or ""
        return out

    def steps(self, n: int) -> None:
        """Run n more training steps through Trainer.run()."""
        trainer = self.trainer
        trainer.config = dataclasses.replace(trainer.config, steps=trainer.steps_done + n)
        result = trainer.run(on_step=lambda *_: None)
        if result.stopped:
            raise RuntimeError(f"pack: training stopped: {result.stopped}")


class BaselineRunner:
    """The baseline loop; steps(n) calls its step n times."""

    def __init__(self, loop: BaselineTI) -> None:
        self.loop = loop
        self.name = f"baseline ({loop.mixed_precision})"
        self.batch_size = loop.batch_size
        self.dtype = loop.weight_dtype
        self.setup_s = 0.0

    def steps(self, n: int) -> None:
        """n baseline steps."""
        for _ in range(n):
            self.loop.step()


def timed(runner: PackRunner | BaselineRunner, n: int, device: torch.device) -> float:
    """Seconds for n steps of a runner, device work included."""
    sync(device)
    started = time.perf_counter()
    runner.steps(n)
    sync(device)
    return time.perf_counter() - started


def count_flops(runner: PackRunner | BaselineRunner) -> tuple[float, dict[str, float]] | str:
    """FLOPs of one training step (forward and backward) as FlopCounterMode counts them, with the share of each
    top-level module (UNet2DConditionModel, CLIPTextModel, Encoder = the VAE's encoder, ...), or why it failed."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter:
            runner.steps(1)
        parts = {k: float(sum(v.values())) for k, v in counter.get_flop_counts().items() if "." not in k and k != "Global"}
        return float(counter.get_total_flops()), parts
    except Exception as error:  # the count is a report line, not a reason to lose the timings
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"


def profile_step(runner: PackRunner | BaselineRunner, top: int = 8) -> list[dict[str, object]]:
    """torch.profiler over one step: the ops with the most self time (CPU time, or CUDA time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and getattr(runner, "dtype", None) is not None and _device_of(runner).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        runner.steps(1)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    return [{"op": e.key, "self_s": round(getattr(e, key, 0) / 1e6, 4), "calls": e.count} for e in rows]


def _device_of(runner: PackRunner | BaselineRunner) -> torch.device:
    """Where a loop's UNet runs."""
    return runner.loop.device if isinstance(runner, BaselineRunner) else runner.trainer.model.denoiser.device


def _seconds(fn: Callable[[], object], device: torch.device, reps: int = 2) -> float:
    """Mean seconds of fn over reps calls after one untimed call."""
    fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - started) / reps


def breakdown(runner: PackRunner | BaselineRunner, device: torch.device) -> dict[str, float]:
    """Seconds of the parts of one step of a loop, each timed alone at the loop's own shapes and dtypes.

    vae: encoding a batch (baseline only); text: the text encoder(s) forward + backward to the trained table or rows;
    unet: the UNet forward + backward to its context; table: AdamW over the whole table(s) + the row restore (baseline).
    """
    from core.protocols import condition

    times: dict[str, float] = {}
    if isinstance(runner, BaselineRunner):
        loop = runner.loop
        pixels, ids = loop._batch()
        pixels = pixels.to(loop.weight_dtype)
        with torch.no_grad():
            latents = loop.vae.encode(pixels).latent_dist.sample() * loop.vae.config.scaling_factor
        times["vae"] = _seconds(lambda: loop.vae.encode(pixels).latent_dist.sample(), device)

        def text() -> None:
            loop._context(ids)[0].float().square().mean().backward()

        times["text"] = _seconds(text, device)
        context, added = loop._context(ids)
        context = context.detach()
        kwargs = {} if added is None else {"added_cond_kwargs": {k: v.detach() for k, v in added.items()}}
        unet, dtype = loop.unet, loop.weight_dtype

        def table() -> None:
            for t in loop.tables:
                t.grad = torch.zeros_like(t)
            loop.optimizer.step()
            loop.optimizer.zero_grad()
            loop._restore_other_rows()

        times["table"] = _seconds(table, device)
    else:
        trainer = runner.trainer
        batch = trainer.sample_batch()
        model, rows = trainer.model, trainer.rows

        def text() -> None:
            condition(model, batch.prompts, rows).context.float().square().mean().backward()

        times["text"] = _seconds(text, device)
        for row in rows.values():
            row.grad = None
        den = model.denoiser
        unet = den.unet
        dtype = next(unet.parameters()).dtype
        latents = batch.latents
        cond = condition(model, batch.prompts, rows)
        context = cond.context.detach()
        kwargs = {}
        if cond.pooled is not None:
            res = latents.shape[-1] * 8
            time_ids = torch.tensor([[res, res, 0, 0, res, res]] * latents.shape[0], device=device, dtype=dtype)
            kwargs = {"added_cond_kwargs": {"text_embeds": cond.pooled.detach().to(dtype), "time_ids": time_ids}}
    steps = torch.randint(0, 1000, (latents.shape[0],), device=device)
    context = context.to(dtype).requires_grad_(True)

    def unet_step() -> None:
        out = unet(latents.to(dtype), steps, context, **kwargs).sample
        out.float().square().mean().backward()

    times["unet"] = _seconds(unet_step, device)
    return {k: round(v, 4) for k, v in times.items()}


def is_oom(error: BaseException) -> bool:
    """Out of device or host memory."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free(device: torch.device) -> None:
    """Collect garbage and give cached device blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_pack_model(family: str, master: dict[str, object], device: torch.device, dtype: torch.dtype, name: str):  # noqa: ANN201
    """The pack's Model over the master weights, placed as the pack's loader places a model (the master is kept)."""
    parts = {k: cast_copy(v, torch.float32) if isinstance(v, torch.nn.Module) else v for k, v in master.items()}
    return model_from_components(family, place_components(parts, device, dtype), name=name)


def time_to_identity(setup_s: float, step_s: float) -> dict[str, float]:
    """Seconds to a Cross-Init identity and to a fast one: the set-up plus the preset's steps at step_s (extrapolated)."""
    return {
        f"cross_init_{CROSS_INIT_STEPS}_steps_s": round(setup_s + CROSS_INIT_STEPS * step_s, 1),
        f"fast_{FAST_STEPS}_steps_s": round(setup_s + FAST_STEPS * step_s, 1),
    }


def mode_config(config: TrainConfig, mode: str) -> TrainConfig | str:
    """The config for a memory mode, or 'not available (...)' when TrainConfig has none of the fields it needs."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for overrides in MODES[mode]:
        if set(overrides) <= fields:
            return dataclasses.replace(config, **overrides)
    wanted = " or ".join("+".join(o) for o in MODES[mode])
    return f"not available (TrainConfig has no {wanted} field)"


def measure_modes(
    modes: list[str], model: object, images: torch.Tensor, config: TrainConfig, warmup: int, steps: int, device: torch.device,
    on_mode: Callable[[dict[str, dict[str, object]]], None] = lambda _: None,
) -> dict[str, dict[str, object]]:
    """The pack alone in each mode: steps/s, samples/s, and on CUDA the peak memory of training (set-up apart).

    on_mode gets the modes measured so far after each one.
    """
    results: dict[str, dict[str, object]] = {}
    for mode in modes:
        cfg = mode_config(config, mode)
        if isinstance(cfg, str):
            results[mode] = {"status": cfg}
            print(f"mode {mode}: {cfg}", flush=True)
            continue
        free(device)
        entry: dict[str, object] = {"status": "ok"}
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runner = PackRunner(model, images, cfg)
            if device.type == "cuda":
                entry["setup_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                torch.cuda.reset_peak_memory_stats(device)
            runner.steps(warmup)
            took = timed(runner, steps, device)
            entry.update(
                steps_per_s=round(steps / took, 4),
                samples_per_s=round(steps * config.batch_size / took, 3),
                step_s=round(took / steps, 4),
                setup_s=round(runner.setup_s, 2),
                time_to_identity_extrapolated=time_to_identity(runner.setup_s, took / steps),
                **runner.plan(),
            )
            if device.type == "cuda":
                entry["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                entry["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
            else:
                entry["peak_gib"] = "n/a on the CPU"
            del runner
        except Exception as error:
            if not is_oom(error):
                raise
            entry = {"status": "out of memory"}
        results[mode] = entry
        print(f"mode {mode}: {entry}", flush=True)
        on_mode(results)
    return results


def _baselines(
    family: str, master: dict[str, object], images: torch.Tensor, templates: tuple[str, ...], config: TrainConfig,
    precisions: list[str], seed: int,
) -> list[PackRunner | BaselineRunner]:
    """One baseline loop per --mixed_precision value, each with the UNet/VAE in its weight dtype."""
    runners: list[PackRunner | BaselineRunner] = []
    for precision in precisions:
        dtype = MIXED_PRECISION[precision]
        parts = {**master, "unet": cast_copy(master["unet"], dtype), "vae": cast_copy(master["vae"], dtype)}
        loop = BaselineTI(
            family, parts, images, templates, mixed_precision=precision, num_vectors=config.n_tokens,
            batch_size=config.batch_size, learning_rate=config.effective_lr, seed=seed,
        )
        runners.append(BaselineRunner(loop))
    return runners


def _side_by_side(
    runners: list[PackRunner | BaselineRunner], warmup: int, steps: int, rounds: int, batch_size: int,
    device: torch.device, log: Callable[[str], None],
) -> dict[str, dict[str, object]]:
    """Warm every loop up, then time them in turns, the order flipped every round; a loop out of memory is dropped."""
    results: dict[str, dict[str, object]] = {
        r.name: {"dtype": dtype_name(r.dtype), "status": "ok", "round_step_s": []} for r in runners
    }
    live = []
    for runner in runners:
        try:
            runner.steps(warmup)
            live.append(runner)
        except Exception as error:
            if not is_oom(error):
                raise
            results[runner.name]["status"] = "out of memory"
            log(f"{runner.name}: out of memory at batch {batch_size}")
            if isinstance(runner, BaselineRunner):
                runner.loop = None  # its own weights and state go
            free(device)
    for r in range(rounds):
        for runner in live if r % 2 == 0 else live[::-1]:
            took = timed(runner, steps, device)
            results[runner.name]["round_step_s"].append(round(took / steps, 4))
            load = f", 1-min load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
            log(f"round {r + 1}/{rounds} {runner.name}: {took / steps:.3f} s/step{load}")
    for runner in live:
        entry = results[runner.name]
        total, n = sum(entry["round_step_s"]) * steps, steps * rounds
        entry.update(
            steps_per_s=round(n / total, 4), samples_per_s=round(n * batch_size / total, 3), step_s=round(total / n, 4),
            best_step_s=min(entry["round_step_s"]),
        )
    return results


def compare(
    model: str = "sd1",
    resolution: int = 128,
    batch_size: int = 8,
    warmup: int = 1,
    steps: int = 2,
    rounds: int = 2,
    device: str = "auto",
    seed: int = 0,
    preset: str = "cross_init",
    pack_dtype: str = "auto",
    pack_compile: bool = False,
    baseline_modes: tuple[str, ...] = ("no", "mixed"),
    baseline_mixed: str = "auto",
    modes: tuple[str, ...] | None = None,
    extra_pack_dtypes: tuple[str, ...] = (),
    flops: bool = True,
    parts_breakdown: bool = False,
    profile: bool = False,
    n_images: int = 4,
    log: Callable[[str], None] = print,
    components: dict[str, object] | None = None,
    save: Callable[[dict[str, object]], None] = lambda _: None,
) -> dict[str, object]:
    """Run the comparison and return every number (see the module docstring).

    components: float32 components of `model` on the device as random_components gives them (built when None).
    save: gets the result so far after the side-by-side loops and after each memory mode (a run cut short keeps them).
    """
    dev = resolve_device(device)
    info = header(dev)
    family = family_of(model)
    mixed = baseline_mixed if baseline_mixed != "auto" else ("fp16" if dev.type == "cuda" else "bf16")
    pack_dt = compute_dtype(dev) if pack_dtype == "auto" else DTYPES[pack_dtype]
    modes = list(modes) if modes is not None else (list(MODES) if dev.type == "cuda" else [])
    info.update(
        model=model, family=family, resolution=resolution, latent=resolution // 8, batch_size=batch_size,
        warmup_steps=warmup, timed_steps_per_round=steps, rounds=rounds, preset=preset, seed=seed,
        pack_dtype=dtype_name(pack_dt), baseline_mixed_precision=mixed,
    )
    log(json.dumps(info))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False  # torch's default; the same for every loop

    torch.manual_seed(seed)  # the baseline's noise and timesteps come from the global generator, as the example's
    started = time.perf_counter()
    master = components if components is not None else random_components(model, seed, dev)
    info["build_s"] = round(time.perf_counter() - started, 1)
    images = torch.rand(n_images, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    config = preset_config(preset, steps=1, batch_size=batch_size, resolution=resolution, token="<pack>", seed=seed)
    if pack_compile:
        if "compile" not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise SystemExit("--pack-compile: TrainConfig has no 'compile' field in this version")
        config = dataclasses.replace(config, compile=True)
    templates = training_prompts(config.templates)

    runners: list[PackRunner | BaselineRunner] = _baselines(
        family, master, images, templates, config, [mixed if m == "mixed" else m for m in baseline_modes], seed
    )
    pack_model = build_pack_model(family, master, dev, pack_dt, name=f"random-{model}")
    extra_master = master if extra_pack_dtypes else None
    del master  # each loop holds what it uses; the float32 master goes once no loop needs it
    runners.insert(0, PackRunner(pack_model, images, config))
    info["pack_setup_s"] = round(runners[0].setup_s, 2)
    info["pack_memory_plan_s"] = round(runners[0].plan_s, 2)  # inside the set-up; the estimate on CUDA, cold here
    info["pack_config"] = {k: getattr(config, k) for k in ("memory", "micro_batch_size", "compile") if hasattr(config, k)}
    other = None
    for extra in extra_pack_dtypes:  # the pack with the model placed in another dtype, for information
        other = build_pack_model(family, extra_master, dev, DTYPES[extra], name=f"random-{model}-{extra}")
        runners.insert(1, PackRunner(other, images, config, name=f"pack ({extra})"))
    del extra_master
    results = _side_by_side(runners, warmup, steps, rounds, batch_size, dev, log)
    live = [r for r in runners if results[r.name]["status"] == "ok"]
    pack = results["pack"]
    for packed in [e for n, e in results.items() if n.startswith("pack") and e["status"] == "ok"]:
        for name, entry in results.items():
            if name.startswith("baseline") and entry["status"] == "ok":
                packed[f"ratio_vs_{name}"] = round(packed["samples_per_s"] / entry["samples_per_s"], 3)
                packed[f"best_round_ratio_vs_{name}"] = round(entry["best_step_s"] / packed["best_step_s"], 3)
    mixed_name = f"baseline ({mixed})"
    if "ratio_vs_" + mixed_name in pack:
        ratio = pack["ratio_vs_" + mixed_name]
        info["target_3x_vs_mixed"] = "holds" if ratio >= 3 else f"misses: {ratio:.2f}x of 3x"

    if flops:
        peaks = {"bf16": matmul_peak(dev, torch.bfloat16)}
        if pack_dt != torch.bfloat16:
            peaks[dtype_name(pack_dt)] = matmul_peak(dev, pack_dt)
        info["matmul_peak_tflops"] = {k: _sig(v / 1e12) for k, v in peaks.items()}
        for runner in live:
            entry = results[runner.name]
            counted = count_flops(runner)
            if isinstance(counted, str):
                entry["flops_per_step"] = counted
                continue
            counted, by_module = counted
            entry["tflop_per_step_by_module"] = {k: _sig(v / 1e12) for k, v in by_module.items() if v}
            entry["tflop_per_step"] = _sig(counted / 1e12)
            entry["achieved_tflops"] = _sig(counted / entry["step_s"] / 1e12)
            entry["share_of_bf16_peak"] = _sig(counted / entry["step_s"] / peaks["bf16"])

    if profile:
        for runner in live:
            results[runner.name]["profile_top_ops"] = profile_step(runner)
            log(f"profile {runner.name}: {results[runner.name]['profile_top_ops']}")

    if parts_breakdown:
        for runner in live:
            results[runner.name]["breakdown_s"] = breakdown(runner, dev)
            log(f"breakdown {runner.name}: {results[runner.name]['breakdown_s']} (step {results[runner.name]['step_s']} s)")

    info.update(runners[0].plan())
    if pack["status"] == "ok":
        info["time_to_identity_extrapolated"] = {
            "note": "pack set-up (measured) + steps x the measured mean step time; not a measured full run",
            **time_to_identity(runners[0].setup_s, pack["step_s"]),
        }
    live.clear()
    runners.clear()  # every loop's weights and state go: the per-mode peaks below are the pack's alone
    runner = other = None  # noqa: F841 - the loop variables held the last loop (and extra model) alive
    free(dev)
    save({"info": info, "loops": results, "modes": {}})
    mode_results = {}
    if modes:
        mode_results = measure_modes(
            modes, pack_model, images, config, warmup, steps * rounds, dev,
            on_mode=lambda so_far: save({"info": info, "loops": results, "modes": so_far}),
        )
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"info": info, "loops": results, "modes": mode_results}


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd1", help="sd1, sd2, sd2_v, sdxl (core/configs) or tiny, tiny-sdxl, ...")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per loop first")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per loop per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the loops take turns, the order flips")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="cross_init")
    parser.add_argument("--pack-dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--pack-compile", action="store_true", help="the pack with compile=True (compile time apart)")
    parser.add_argument("--extra-pack-dtype", default="", help="comma list (bf16, fp16, fp32): more pack loops, the model in that dtype")
    parser.add_argument("--baseline-mixed", default="auto", choices=["auto", "fp16", "bf16"])
    parser.add_argument("--baseline-modes", default="no,mixed", help="comma list of no, mixed, fp16, bf16")
    parser.add_argument("--modes", default=None, help="pack memory modes: default,checkpointing,micro1,low (CUDA: all)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count and the matmul peak")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of a step (VAE, text, UNet, table)")
    parser.add_argument("--profile", action="store_true", help="also profile one step of each loop (top ops)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    return parser


def main() -> None:
    """Parse arguments, run, print the table and the JSON."""
    args = build_parser().parse_args()
    save = (lambda so_far: write_json(args.json, so_far)) if args.json else (lambda _: None)
    result = compare(
        model=args.model, resolution=args.resolution, batch_size=args.batch_size, warmup=args.warmup,
        steps=args.steps, rounds=args.rounds, device=args.device, seed=args.seed, preset=args.preset,
        pack_dtype=args.pack_dtype, pack_compile=args.pack_compile, baseline_modes=tuple(args.baseline_modes.split(",")),
        baseline_mixed=args.baseline_mixed, modes=None if args.modes is None else tuple(m for m in args.modes.split(",") if m),
        flops=not args.no_flops, parts_breakdown=args.breakdown, profile=args.profile,
        extra_pack_dtypes=tuple(d for d in args.extra_pack_dtype.split(",") if d), save=save,
    )
    print(loops_table(result))
    print(json.dumps(result, indent=2))
    save(result)


if __name__ == "__main__":
    main()
