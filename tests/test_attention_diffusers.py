"""The diffusers backend's cross-attention: per-prompt identity rows, attention sites, map recording, key/value split."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from core.attention import AttentionRecorder, select_sites, spatial_shape
from core.backends.diffusers import unet_attention_sites
from core.errors import InputError
from core.protocols import SLOT, Conditioning, Model, condition
from core.tiny import tiny_model

LATENT_HW = (8, 6)  # not square, so a map's grid is checked in both directions
PROMPTS = [f"a photo of {SLOT} person", f"{SLOT} on a beach"]
CONFIGS = "core/configs"


def _inputs(model: Model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Noisy latents, timesteps and the conditioning of two plain prompts."""
    gen = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 4, *LATENT_HW, generator=gen)
    with torch.no_grad():
        cond = condition(model, ["a photo of a person", "a dog on a beach"], None)
    return noisy, torch.tensor([10, 600]), cond


def _other_context(cond: Conditioning, seed: int = 1) -> torch.Tensor:
    """A context of cond's shape with other values (stands in for a value prompt's encoding)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(cond.context.shape, generator=gen) * cond.context.std()


def _attn2_layers(model: Model) -> dict[str, torch.nn.Module]:
    """The UNet's attn2 modules by their path inside the UNet."""
    return {name: m for name, m in model.denoiser.unet.named_modules() if name.endswith("attn2")}


def _processors(model: Model) -> dict[str, object]:
    """Every attention module's processor object by module path."""
    return {name: m.processor for name, m in model.denoiser.unet.named_modules() if hasattr(m, "processor")}


@contextmanager
def _layer_calls(layers: dict[str, torch.nn.Module]) -> Iterator[dict[str, list[dict]]]:
    """Within the block, each call of each layer is kept: its input, context, processor at call time, and output."""
    calls: dict[str, list[dict]] = {name: [] for name in layers}
    handles = []
    for name, layer in layers.items():

        def before(module: torch.nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            context = kwargs.get("encoder_hidden_states")
            calls[name].append({"hidden": args[0], "context": context, "processor": module.processor})

        def after(
            _module: torch.nn.Module, _args: tuple, _kwargs: dict, output: torch.Tensor, name: str = name
        ) -> None:
            calls[name][-1]["output"] = output

        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(after, with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    batch, tokens, inner = x.shape
    return x.reshape(batch, tokens, heads, inner // heads).permute(0, 2, 1, 3)


def _manual_probabilities(layer: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) per head from the layer's own to_q/to_k weights, (B, H, N, L) in float64."""
    q = F.linear(
        hidden.double(), layer.to_q.weight.double(), None if layer.to_q.bias is None else layer.to_q.bias.double()
    )
    k = F.linear(
        context.double(), layer.to_k.weight.double(), None if layer.to_k.bias is None else layer.to_k.bias.double()
    )
    qh, kh = _heads(q, layer.heads), _heads(k, layer.heads)
    scores = torch.einsum("bhnd,bhld->bhnl", qh, kh) / math.sqrt(qh.shape[-1])
    return scores.softmax(dim=-1)


def _manual_layer(
    layer: torch.nn.Module, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """One cross-attention layer by hand: keys from one context, values from another, then the output projection."""
    probs = _manual_probabilities(layer, hidden, keys)
    v = _heads(F.linear(values.double(), layer.to_v.weight.double()), layer.heads)
    mixed = (probs @ v).permute(0, 2, 1, 3).flatten(2)
    return F.linear(mixed, layer.to_out[0].weight.double(), layer.to_out[0].bias.double()).float()


def _expected_grid(level: int) -> tuple[int, int]:
    """The (h, w) of a level of a LATENT_HW latent: each level halves, rounding up."""
    height, width = LATENT_HW
    for _ in range(level):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width


class _Counting:
    """A processor that counts its calls and runs diffusers' own one inside."""

    def __init__(self, inner: Callable[..., torch.Tensor]) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """Count, then run the inner processor."""
        self.calls += 1
        return self.inner(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )


# --- per-prompt identity rows ----------------------------------------------------------------------------------------


def test_per_prompt_rows_all_equal_give_exactly_the_shared_rows_result(any_model: Model) -> None:
    gen = torch.Generator().manual_seed(3)
    for encoder in any_model.encoders:
        rows = torch.randn(2, encoder.width, generator=gen)
        with torch.no_grad():
            shared = encoder.encode(PROMPTS, rows)
            per_prompt = encoder.encode(PROMPTS, rows.unsqueeze(0).expand(len(PROMPTS), -1, -1))
        assert torch.equal(per_prompt.hidden, shared.hidden)
        if shared.pooled is not None:
            assert torch.equal(per_prompt.pooled, shared.pooled)


def test_per_prompt_rows_give_each_prompt_its_own_encoding(any_model: Model) -> None:
    gen = torch.Generator().manual_seed(4)
    for encoder in any_model.encoders:
        rows = torch.randn(len(PROMPTS), 2, encoder.width, generator=gen)
        with torch.no_grad():
            together = encoder.encode(PROMPTS, rows)
            alone = [encoder.encode([prompt], rows[b]) for b, prompt in enumerate(PROMPTS)]
            swapped = encoder.encode(PROMPTS, rows.flip(0))
        for b, single in enumerate(alone):
            torch.testing.assert_close(together.hidden[b], single.hidden[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(together.hidden, swapped.hidden, atol=1e-3)  # which set goes where matters


def test_per_prompt_rows_get_gradient_only_from_their_own_prompt(any_model: Model) -> None:
    gen = torch.Generator().manual_seed(5)
    for encoder in any_model.encoders:
        rows = torch.randn(len(PROMPTS), 2, encoder.width, generator=gen).requires_grad_(True)
        encoder.encode(PROMPTS, rows).hidden[1].square().sum().backward()
        assert torch.count_nonzero(rows.grad[0]) == 0
        assert torch.count_nonzero(rows.grad[1]) == rows.grad[1].numel()


def test_rows_of_the_wrong_shape_are_refused(sd1_model: Model) -> None:
    encoder = sd1_model.encoders[0]
    with pytest.raises(InputError, match="identity rows"):
        encoder.encode(PROMPTS, torch.zeros(3, 2, encoder.width))  # 3 sets for 2 prompts
    with pytest.raises(InputError, match="identity rows"):
        encoder.encode(PROMPTS, torch.zeros(2, encoder.width + 1))


# --- attention sites -------------------------------------------------------------------------------------------------


def test_tiny_sites_are_every_attn2_layer_in_forward_order(any_model: Model) -> None:
    den = any_model.denoiser
    sites = den.attention_sites()
    assert [(s.part, s.level, s.name) for s in sites] == [
        ("down", 0, "down_blocks.0.attentions.0.transformer_blocks.0.attn2"),
        ("mid", 1, "mid_block.attentions.0.transformer_blocks.0.attn2"),
        ("up", 0, "up_blocks.1.attentions.0.transformer_blocks.0.attn2"),
        ("up", 0, "up_blocks.1.attentions.1.transformer_blocks.0.attn2"),
    ]
    layers = _attn2_layers(any_model)
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda *_, n=n: order.append(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            den.predict(*_inputs(any_model))
    finally:
        for handle in handles:
            handle.remove()
    assert order == [s.name for s in sites]


@pytest.mark.parametrize(
    ("family", "total", "chosen_blocks"),
    [("sd1", 16, {"down_blocks.2": 2, "up_blocks.1": 3}), ("sdxl", 70, {"down_blocks.2": 20, "up_blocks.0": 30})],
)
def test_real_architectures_give_the_quarter_size_layers_by_default(
    family: str, total: int, chosen_blocks: dict[str, int]
) -> None:
    """SD1.5: 16x16 at 512 px is down_blocks.2 and up_blocks.1; SDXL: 32x32 at 1024 px is down_blocks.2, up_blocks.0."""
    from diffusers import UNet2DConditionModel

    with open(f"{CONFIGS}/{family}/unet/config.json") as handle:
        config = json.load(handle)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    sites = unet_attention_sites(unet)
    assert len(sites) == total
    assert sorted(s.name for s in sites) == sorted(n for n, _ in unet.named_modules() if n.endswith("attn2"))
    rank = {"down": 0, "mid": 1, "up": 2}
    assert [rank[s.part] for s in sites] == sorted(rank[s.part] for s in sites)
    for site in sites:
        if site.part != "mid":
            index = int(site.name.split(".")[1])
            assert site.level == (index if site.part == "down" else len(unet.up_blocks) - 1 - index)
    chosen = select_sites(sites)
    assert {s.level for s in chosen} == {2}
    counts: dict[str, int] = {}
    for site in chosen:
        block = site.name.split(".attentions")[0]
        counts[block] = counts.get(block, 0) + 1
    assert counts == chosen_blocks
    mid = [s for s in sites if s.part == "mid"]
    assert mid and {s.level for s in mid} == {len(unet.down_blocks) - 1}


# --- recording ---------------------------------------------------------------------------------------------------------


def test_a_recorded_map_is_softmax_of_the_layers_own_queries_and_keys(any_model: Model) -> None:
    den = any_model.denoiser
    noisy, timesteps, cond = _inputs(any_model)
    recorder = AttentionRecorder(select_sites(den.attention_sites(), "all"))
    with (
        _layer_calls(_attn2_layers(any_model)) as calls,
        den.recording(recorder),
        recorder.recording(),
        torch.no_grad(),
    ):
        den.predict(noisy, timesteps, cond)
    maps = recorder.take()
    assert len(maps) == len(recorder.sites)
    for site, probs in zip(recorder.sites, maps):
        layer = den.unet.get_submodule(site.name)
        (call,) = calls[site.name]
        expected = _manual_probabilities(layer, call["hidden"], call["context"]).mean(dim=1).float()
        torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(call["context"], cond.context)  # the keys' context is the conditioning's


def test_recording_keeps_the_output_and_records_only_the_wanted_layers(any_model: Model) -> None:
    den = any_model.denoiser
    noisy, timesteps, cond = _inputs(any_model)
    recorder = AttentionRecorder(select_sites(den.attention_sites(), "default"))
    assert 0 < len(recorder.sites) < len(den.attention_sites())
    with torch.no_grad():
        plain = den.predict(noisy, timesteps, cond)
        with den.recording(recorder):
            outside = den.predict(noisy, timesteps, cond)  # the recorder is not recording: nothing is kept
            assert recorder.take() == []
            with recorder.recording():
                recorded = den.predict(noisy, timesteps, cond)
            maps = recorder.take()
    assert torch.equal(outside, plain)
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)
    assert len(maps) == len(recorder.sites)
    for site, probs in zip(recorder.sites, maps):
        grid = _expected_grid(site.level)
        assert probs.shape == (2, grid[0] * grid[1], 77) and probs.dtype == torch.float32
        assert spatial_shape(probs.shape[1], LATENT_HW) == grid
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(probs.shape[:2]))


def test_unrecorded_layers_keep_their_own_processor() -> None:
    model = tiny_model("sd1")
    den = model.denoiser
    layers = _attn2_layers(model)
    counting = {name: _Counting(layer.processor) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.processor = counting[name]
    recorder = AttentionRecorder(select_sites(den.attention_sites(), "default"))
    with torch.no_grad(), den.recording(recorder), recorder.recording():
        den.predict(*_inputs(model))
    assert len(recorder.take()) == len(recorder.sites)
    wanted = {s.name for s in recorder.sites}
    assert {name: c.calls for name, c in counting.items()} == {name: 0 if name in wanted else 1 for name in layers}
    assert all(layers[name].processor is counting[name] for name in layers)


def test_maps_carry_gradients_to_the_context(any_model: Model) -> None:
    den = any_model.denoiser
    noisy, timesteps, cond = _inputs(any_model)
    context = cond.context.clone().requires_grad_(True)
    recorder = AttentionRecorder(select_sites(den.attention_sites(), "default"))
    with den.recording(recorder), recorder.recording():
        den.predict(noisy, timesteps, Conditioning(context, cond.pooled))
    maps = recorder.take()
    assert all(m.requires_grad for m in maps)
    sum(m[..., 2:4].square().sum() for m in maps).backward()
    assert context.grad is not None and context.grad.abs().max() > 0
    assert torch.count_nonzero(context.grad[:, 2:4]) > 0  # the tokens the loss looked at


def _maps_loss_and_gradient(model: Model, checkpointing: bool, backward_inside: bool) -> tuple[torch.Tensor, ...]:
    """As the trainer runs a step: maps and prediction of one forward, their loss, its gradient to the context."""
    den = model.denoiser
    noisy, timesteps, cond = _inputs(model)
    context = cond.context.clone().requires_grad_(True)
    recorder = AttentionRecorder(select_sites(den.attention_sites(), "all"))
    with den.checkpointing() if checkpointing else _nothing():
        with den.recording(recorder):
            with recorder.recording():
                out = den.predict(noisy, timesteps, Conditioning(context, cond.pooled))
            maps = recorder.take()
            loss = sum(m[..., 1:5].sum(-1).square().mean() for m in maps) + out.square().mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        assert recorder.take() == []  # the recompute added nothing
    return loss.detach(), context.grad, torch.tensor(len(maps))


@contextmanager
def _nothing() -> Iterator[None]:
    """An empty with-block."""
    yield


@pytest.mark.parametrize("backward_inside", [True, False])
def test_maps_give_the_same_loss_and_gradient_under_checkpointing(any_model: Model, backward_inside: bool) -> None:
    plain = _maps_loss_and_gradient(any_model, checkpointing=False, backward_inside=backward_inside)
    checkpointed = _maps_loss_and_gradient(any_model, checkpointing=True, backward_inside=backward_inside)
    assert int(plain[2]) == int(checkpointed[2]) == len(any_model.denoiser.attention_sites())
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(checkpointed[1], plain[1], rtol=1e-5, atol=1e-9)


# --- key/value split ---------------------------------------------------------------------------------------------------


def test_plain_predict_runs_the_unets_own_processors(any_model: Model) -> None:
    den = any_model.denoiser
    noisy, timesteps, cond = _inputs(any_model)
    own = _processors(any_model)
    layers = _attn2_layers(any_model)
    with _layer_calls(layers) as calls, torch.no_grad():
        den.predict(noisy, timesteps, cond)
    assert all(calls[name][0]["processor"] is own[name] for name in layers)
    assert all(calls[name][0]["context"] is not None for name in layers)


def test_value_context_equal_to_context_reproduces_the_plain_output(any_model: Model) -> None:
    """Bit for bit: the split runs the same to_q/to_k/to_v, the same fused kernel and to_out, in the same order."""
    den = any_model.denoiser
    noisy, timesteps, cond = _inputs(any_model)
    with torch.no_grad():
        plain = den.predict(noisy, timesteps, cond)
        same = den.predict(noisy, timesteps, Conditioning(cond.context, cond.pooled, cond.context.clone()))
    assert torch.equal(same, plain)


def test_values_come_from_the_value_context_in_every_layer(any_model: Model) -> None:
    den = any_model.denoiser
    noisy, timesteps, cond = _inputs(any_model)
    values = _other_context(cond)
    layers = _attn2_layers(any_model)
    own = _processors(any_model)
    with torch.no_grad():
        plain = den.predict(noisy, timesteps, cond)
        with _layer_calls(layers) as calls:
            split = den.predict(noisy, timesteps, Conditioning(cond.context, cond.pooled, values))
    assert not torch.allclose(split, plain, atol=1e-4)
    for name, layer in layers.items():
        (call,) = calls[name]
        torch.testing.assert_close(call["context"], cond.context)
        expected = _manual_layer(layer, call["hidden"], cond.context, values)
        torch.testing.assert_close(call["output"], expected, rtol=1e-5, atol=1e-5)
        from_keys = _manual_layer(layer, call["hidden"], cond.context, cond.context)
        assert not torch.allclose(call["output"], from_keys, atol=1e-4)
    assert all(p is own[name] for name, p in _processors(any_model).items())


def test_value_split_gives_the_same_gradients_under_checkpointing(any_model: Model) -> None:
    """The backward, after predict has returned, recomputes the layers with the values of that forward."""
    den = any_model.denoiser
    noisy, timesteps, cond = _inputs(any_model)
    results = []
    for checkpointing in (False, True):
        context = cond.context.clone().requires_grad_(True)
        values = _other_context(cond).requires_grad_(True)
        with den.checkpointing() if checkpointing else _nothing():
            out = den.predict(noisy, timesteps, Conditioning(context, cond.pooled, values))
            out.square().mean().backward()
        results.append((context.grad, values.grad))
    (context_plain, values_plain), (context_checkpointed, values_checkpointed) = results
    torch.testing.assert_close(context_checkpointed, context_plain, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(values_checkpointed, values_plain, rtol=1e-5, atol=1e-9)


def test_value_context_of_another_shape_is_refused(sd1_model: Model) -> None:
    noisy, timesteps, cond = _inputs(sd1_model)
    with pytest.raises(InputError, match="value context"):
        sd1_model.denoiser.predict(noisy, timesteps, Conditioning(cond.context, None, cond.context[:, :10]))


# --- processors put back ---------------------------------------------------------------------------------------------


def test_processors_are_the_same_objects_after_recording_and_split(any_model: Model) -> None:
    den = any_model.denoiser
    noisy, timesteps, cond = _inputs(any_model)
    own = _processors(any_model)
    recorder = AttentionRecorder(select_sites(den.attention_sites(), "default"))
    with den.checkpointing():
        with den.recording(recorder):
            assert any(p is not own[n] for n, p in _processors(any_model).items())
            with recorder.recording():
                den.predict(noisy, timesteps, Conditioning(cond.context, cond.pooled, _other_context(cond)))
        assert recorder.take()
    assert all(p is own[name] for name, p in _processors(any_model).items())


def test_processors_are_put_back_when_an_exception_is_raised() -> None:
    model = tiny_model("sd1")
    den = model.denoiser
    noisy, timesteps, cond = _inputs(model)
    own = _processors(model)
    recorder = AttentionRecorder(select_sites(den.attention_sites(), "all"))
    with pytest.raises(RuntimeError, match="inside"), den.recording(recorder):
        raise RuntimeError("inside the recording")
    assert all(p is own[name] for name, p in _processors(model).items())

    def fail(*_args: object) -> None:
        raise RuntimeError("inside the UNet")

    handle = den.unet.up_blocks[-1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="inside"), torch.no_grad():
            den.predict(noisy, timesteps, Conditioning(cond.context, None, _other_context(cond)))
    finally:
        handle.remove()
    assert all(p is own[name] for name, p in _processors(model).items())


def test_a_layer_the_split_cannot_reproduce_is_refused_before_anything_changes() -> None:
    model = tiny_model("sd1")
    den = model.denoiser
    noisy, timesteps, cond = _inputs(model)
    own = _processors(model)
    last = den.unet.get_submodule(den.attention_sites()[-1].name)
    last.residual_connection = True
    recorder = AttentionRecorder(den.attention_sites())
    with pytest.raises(InputError, match="residual connection"), den.recording(recorder):
        pass
    with pytest.raises(InputError, match="residual connection"), torch.no_grad():
        den.predict(noisy, timesteps, Conditioning(cond.context, None, _other_context(cond)))
    assert all(p is own[name] for name, p in _processors(model).items())
