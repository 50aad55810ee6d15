"""Gradient checkpointing of UNet blocks: same gradients, fewer saved activations, forward put back exactly."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from core.checkpointing import (
    BLOCKS,
    LAYERS,
    checkpointed,
    comfy_unet_blocks,
    diffusers_unet_blocks,
    gradient_checkpointing,
    is_checkpointed,
    recomputing,
)
from core.memory import SavedBytes
from core.tiny import tiny_components


def _deep_unet() -> torch.nn.Module:
    """A tiny UNet whose attentions hold two transformer blocks each, as SDXL's do, so LAYERS splits them."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        transformer_layers_per_block=2,
        use_linear_projection=True,
    )
    return unet.eval().requires_grad_(False)


UNETS = {
    "sd1": lambda: tiny_components("sd1")["unet"],
    "deep": _deep_unet,
}


@pytest.fixture(scope="module", params=sorted(UNETS))
def unet(request: pytest.FixtureRequest) -> torch.nn.Module:
    """A tiny fp32 diffusers UNet (the pack's SD1 one, or one with two-block attentions)."""
    return UNETS[request.param]()


def _context_grad(unet: torch.nn.Module, modules: list[torch.nn.Module], seed: int = 0) -> torch.Tensor:
    """d(loss)/d(context), the path identity rows take, with the given modules checkpointed."""
    gen = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    noisy = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, width, generator=gen).requires_grad_(True)
    timesteps = torch.tensor([10, 700])
    with gradient_checkpointing(modules):
        pred = unet(noisy, timesteps, encoder_hidden_states=context).sample
        ((pred - torch.randn(pred.shape, generator=gen)) ** 2).mean().backward()
    return context.grad


def _assert_same(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """got equals want to float32 rounding, relative to want's largest entry; want is not vacuous."""
    assert float(want.abs().max()) > 0, "reference gradient is zero"
    error = float((got - want).abs().max() / want.abs().max())
    assert error < rtol, f"relative error {error:.2e}"


@pytest.mark.parametrize("level", [BLOCKS, LAYERS])
def test_checkpointing_gives_the_same_context_gradient(unet: torch.nn.Module, level: str) -> None:
    """The identity-row path gets the same gradient with every block or layer checkpointed as without."""
    want = _context_grad(unet, [])
    chosen = diffusers_unet_blocks(unet, level)
    assert chosen
    _assert_same(_context_grad(unet, chosen), want)


def test_layers_split_attentions_with_several_transformer_blocks() -> None:
    """LAYERS takes a multi-block attention block by block, and a single-block one whole."""
    deep = _deep_unet()
    chosen = {id(m) for m in diffusers_unet_blocks(deep, LAYERS)}
    first = deep.down_blocks[0].attentions[0]
    assert id(first) not in chosen and all(id(b) in chosen for b in first.transformer_blocks)
    sd1 = tiny_components("sd1")["unet"]
    assert id(sd1.down_blocks[0].attentions[0]) in {id(m) for m in diffusers_unet_blocks(sd1, LAYERS)}


def test_unknown_level_is_refused() -> None:
    """A level name the selection does not know is an error naming the choices."""
    with pytest.raises(ValueError, match="blocks, layers"):
        diffusers_unet_blocks(_deep_unet(), "everything")


def _saved_bytes(unet: torch.nn.Module, modules: list[torch.nn.Module]) -> int:
    """Bytes of activations autograd keeps for the backward after one forward (weights excluded)."""
    noisy = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, requires_grad=True)
    saved = SavedBytes(ignore=[*unet.parameters(), *unet.buffers()])
    with gradient_checkpointing(modules), saved:
        unet(noisy, torch.tensor([1, 2]), encoder_hidden_states=context)
    return saved.total


def test_checkpointing_saves_fewer_activations(unet: torch.nn.Module) -> None:
    """Counted with saved_tensors_hooks: checkpointed layers keep well under half of the plain forward's bytes."""
    plain = _saved_bytes(unet, [])
    layers = _saved_bytes(unet, diffusers_unet_blocks(unet, LAYERS))
    blocks = _saved_bytes(unet, diffusers_unet_blocks(unet, BLOCKS))
    assert plain > 0
    assert layers < 0.5 * plain, f"{layers} of {plain} bytes"
    assert blocks < layers, f"blocks {blocks} vs layers {layers}"


class _Toy(torch.nn.Module):
    """A module with a sub-module, whose forward takes extra positional and keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: float, options: dict | None = None) -> torch.Tensor:
        """linear(x) * scale, times options['gain'] when given."""
        gain = 1.0 if options is None else options["gain"]
        return torch.tanh(self.linear(x)) * scale * gain


def test_forward_is_restored_to_the_very_same_objects() -> None:
    """A class forward comes back as the class's (no instance attribute left); an instance forward as the same object."""
    plain, patched_before = _Toy(), _Toy()
    own_forward = patched_before.forward  # a bound method stored on the instance, as other patches do
    patched_before.forward = own_forward
    with gradient_checkpointing([plain, patched_before]) as done:
        assert done == [plain, patched_before]
        assert is_checkpointed(plain) and is_checkpointed(patched_before)
        assert plain.forward.__wrapped__.__func__ is _Toy.forward
        assert patched_before.forward.__wrapped__ is own_forward
    assert "forward" not in plain.__dict__
    assert plain.forward.__func__ is _Toy.forward
    assert patched_before.__dict__["forward"] is own_forward


def test_forward_is_restored_after_an_exception() -> None:
    """An error inside the block still puts every forward back."""
    unet = tiny_components("sd1")["unet"]
    chosen = diffusers_unet_blocks(unet, LAYERS)
    with pytest.raises(RuntimeError, match="boom"), gradient_checkpointing(chosen):
        assert all(is_checkpointed(m) for m in chosen)
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_nested_blocks_patch_once_and_restore_in_order() -> None:
    """An inner block skips modules the outer one patched, and leaves them patched when it ends."""
    a, b = _Toy(), _Toy()
    with gradient_checkpointing([a]) as outer:
        wrapper = a.__dict__["forward"]
        with gradient_checkpointing([a, b, b]) as inner:
            assert outer == [a] and inner == [b]
            assert a.__dict__["forward"] is wrapper and is_checkpointed(b)
        assert a.__dict__["forward"] is wrapper
        assert "forward" not in b.__dict__
    assert "forward" not in a.__dict__ and "forward" not in b.__dict__


def test_a_non_module_is_refused_before_anything_is_patched() -> None:
    """A wrong entry in the list is an error, and the modules before it stay unpatched."""
    toy = _Toy()
    with pytest.raises(TypeError, match="torch.nn.Module"), gradient_checkpointing([toy, "down_blocks"]):
        pass
    assert "forward" not in toy.__dict__


def test_without_gradients_the_forward_is_a_plain_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad (sampling, latents) the wrapper never enters torch.utils.checkpoint."""
    toy = _Toy()
    x = torch.randn(3, 4)
    want = toy(x, 2.0)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("checkpoint called without gradients")

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", refuse)
    with torch.no_grad(), gradient_checkpointing([toy]):
        got = toy(x, 2.0)
    torch.testing.assert_close(got, want.detach())


def test_recompute_sees_dict_arguments_as_they_were_at_the_call() -> None:
    """A caller that changes an options dict after the call (as ComfyUI's UNet does) does not change the recompute."""
    toy = _Toy()
    seen: list[tuple[float, bool]] = []
    original = toy.forward

    def recording(x: torch.Tensor, scale: float, options: dict | None = None) -> torch.Tensor:
        seen.append((options["gain"], recomputing()))
        return original(x, scale, options=options)

    x = torch.randn(3, 4, requires_grad=True)
    want = torch.autograd.grad((original(x, 0.5, options={"gain": 3.0}) ** 2).sum(), x)[0]
    wrapped = checkpointed(recording)
    options = {"gain": 3.0}
    out = wrapped(x, 0.5, options=options)
    options["gain"] = -100.0  # the caller moves on, as transformer_options["block"] does
    got = torch.autograd.grad((out**2).sum(), x)[0]
    assert seen == [(3.0, False), (3.0, True)]
    assert not recomputing()
    torch.testing.assert_close(got, want)


# ComfyUI's own UNet (CI's core), built directly at a tiny size.


@pytest.fixture(scope="module")
def comfy_unet() -> torch.nn.Module:
    """ComfyUI's UNetModel with two-block transformers on the lower level, random weights, frozen."""
    from tests.comfy_tiny import comfy_ready

    comfy_ready()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    model = UNetModel(
        image_size=None, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, channel_mult=(1, 2),
        num_heads=2, use_spatial_transformer=True, transformer_depth=[1, 2], transformer_depth_output=[1, 1, 2, 2],
        transformer_depth_middle=2, context_dim=16, use_linear_in_transformer=True,
        operations=comfy.ops.disable_weight_init,
    )
    with torch.no_grad():
        for param in model.parameters():  # disable_weight_init leaves them uninitialised
            param.normal_(0.0, 0.1)
    return model.eval().requires_grad_(False)


def _residuals_in_place() -> bool:
    """Whether this ComfyUI's transformer blocks add residuals in place (the 2024 core CI runs)."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    return "x += n" in inspect.getsource(BasicTransformerBlock)


def _keep_saved(tensor: torch.Tensor) -> torch.Tensor:
    """The ComfyUI backend's hook for in-place cores: copy activations when autograd saves them."""
    return tensor.clone() if tensor.grad_fn is not None else tensor


def _comfy_grad(model: torch.nn.Module, modules: list[torch.nn.Module], inplace_safe: bool,
                record: list | None = None) -> torch.Tensor:
    """d(loss)/d(context) through ComfyUI's UNet, with an attn2 patch that records the block it runs in."""
    gen = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 16, generator=gen).requires_grad_(True)

    def attn2_patch(n: torch.Tensor, ctx: torch.Tensor, value: torch.Tensor, extra: dict) -> tuple:
        if record is not None:
            record.append((extra["block"], extra.get("block_index"), recomputing()))
        return n, ctx, value

    options = {"patches": {"attn2_patch": [attn2_patch]}}
    hook = torch.autograd.graph.saved_tensors_hooks(_keep_saved, lambda t: t) if _residuals_in_place() else None
    with hook or contextlib.nullcontext(), gradient_checkpointing(modules, inplace_safe=inplace_safe):
        out = model(x, torch.tensor([10.0, 500.0]), context, transformer_options=options)
        out.square().mean().backward()
    return context.grad


def test_comfy_layers_are_what_its_unet_calls(comfy_unet: torch.nn.Module) -> None:
    """ResBlocks, resamplers, single-block SpatialTransformers whole and two-block ones block by block; no blocks."""
    names = [type(m).__name__ for m in comfy_unet_blocks(comfy_unet)]
    assert {"ResBlock", "SpatialTransformer", "BasicTransformerBlock", "Downsample", "Upsample"} == set(names)
    assert "TimestepEmbedSequential" not in names and "Conv2d" not in names


def test_comfy_checkpointing_gives_the_same_gradient_and_block_options(comfy_unet: torch.nn.Module) -> None:
    """Same context gradient through ComfyUI's UNet; patches see the same transformer_options block in the recompute."""
    plain: list = []
    want = _comfy_grad(comfy_unet, [], inplace_safe=False, record=plain)
    seen: list = []
    got = _comfy_grad(comfy_unet, comfy_unet_blocks(comfy_unet), inplace_safe=_residuals_in_place(), record=seen)
    _assert_same(got, want)
    forward = [(block, index) for block, index, again in seen if not again]
    again = [(block, index) for block, index, again in seen if again]
    assert forward == [(block, index) for block, index, _ in plain]
    assert sorted(again) == sorted(forward)  # every recomputed attention ran with its own block, not the last one
    assert not any("forward" in m.__dict__ for m in comfy_unet.modules())


def test_in_place_residuals_need_inplace_safe(comfy_unet: torch.nn.Module) -> None:
    """On a core with `x += n`, plain checkpointing would silently change the gradient; inplace_safe keeps it exact."""
    if not _residuals_in_place():
        pytest.skip("this ComfyUI adds residuals out of place")
    want = _comfy_grad(comfy_unet, [], inplace_safe=False)
    wrong = _comfy_grad(comfy_unet, comfy_unet_blocks(comfy_unet), inplace_safe=False)
    assert float((wrong - want).abs().max() / want.abs().max()) > 1e-3
