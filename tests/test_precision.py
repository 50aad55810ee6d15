"""fp16/bf16 training, loss scaling, micro-batches, one encoding per distinct prompt, and no host reads in a step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from core.backends.diffusers import place_components
from core.identity import Identity
from core.precision import fast_float32_matmuls
from core.protocols import SLOT, Model
from core.tiny import model_from_components, tiny_components
from core.trainer import Batch, Trainer, preset_config

# SD1.5 at 512 px, batch 4: a mean over 4 x 4 x 64 x 64 elements puts dL/dcontext below float16's normal range.
LATENT, BATCH = 64, 4


def _model(family: str, dtype: torch.dtype) -> Model:
    """A tiny model whose UNet, VAE and text encoders all compute in dtype, on the CPU."""
    parts = tiny_components(family)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].to(dtype)
    return model_from_components(family, parts)


def _trainer(model: Model, batch_size: int = 2, latent: int = 8, masks: torch.Tensor | None = None,
             **overrides: object) -> Trainer:
    """A trainer on two cached latents of latent x latent (no VAE pass), with the same start rows for every dtype."""
    gen = torch.Generator().manual_seed(7)
    mean, std = torch.randn(2, 4, latent, latent, generator=gen), 0.1 * torch.rand(2, 4, latent, latent, generator=gen)
    starts = {enc.key: 0.02 * torch.randn(2, enc.width, generator=gen) for enc in model.encoders}
    values = {"batch_size": batch_size, "resolution": latent * 8, "flip_p": 0.0, "token": "<prec>", "seed": 5,
              "attention_maps": False}  # the tests count and poison the training steps' predict calls
    config = preset_config("cross_init_fast", **{**values, **overrides})
    images = torch.zeros(2, 3, 8, 8)  # only their count is read when latents are given
    return Trainer(model, images, config, init=Identity(starts), masks=masks, latents=(mean, std))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """||got - want|| / ||want|| and the cosine between them."""
    got, want = got.flatten().double(), want.flatten().double()
    return float((got - want).norm() / want.norm()), float(F.cosine_similarity(got, want, dim=0))


def _row_gradient(model: Model, batch: Batch, **overrides: object) -> tuple[torch.Tensor, Trainer]:
    """The identity-row gradient of one trainer step on batch (unscaled by the trainer where it scaled)."""
    trainer = _trainer(model, batch_size=BATCH, latent=LATENT, reg_weight=0.0, **overrides)
    trainer.step(batch)
    assert bool(trainer.last_applied)
    return trainer.rows["clip_l"].grad.detach().clone(), trainer


@pytest.fixture(scope="module")
def realistic_batch() -> tuple[Batch, torch.Tensor]:
    """One 4 x 64 x 64 latent batch and its fp32 row gradient: the reference for the half-precision copies."""
    reference = _trainer(_model("sd1", torch.float32), batch_size=BATCH, latent=LATENT, reg_weight=0.0)
    batch = reference.sample_batch()
    reference.step(batch)
    return batch, reference.rows["clip_l"].grad.detach().clone()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_row_gradient_matches_fp32(realistic_batch: tuple[Batch, torch.Tensor], dtype: torch.dtype) -> None:
    batch, want = realistic_batch
    got, trainer = _row_gradient(_model("sd1", dtype), batch)
    assert trainer.rows["clip_l"].dtype == torch.float32 and trainer.scaler.enabled == (dtype == torch.float16)
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    error, cosine = _relative_error(got, want)
    assert error < 0.02 and cosine > 0.999, (error, cosine)


def test_fp16_without_loss_scaling_loses_the_gradient(realistic_batch: tuple[Batch, torch.Tensor]) -> None:
    """The check above has teeth: unscaled, float16 underflow spoils the gradient at this element count (30%)."""
    batch, want = realistic_batch
    got, trainer = _row_gradient(_model("sd1", torch.float16), batch, fp16_loss_scale=0.0)
    assert not trainer.scaler.enabled
    error, cosine = _relative_error(got, want)
    assert error > 0.1 and cosine < 0.99, (error, cosine)


def _poison_gradient_once(model: Model, monkeypatch: pytest.MonkeyPatch, calls: tuple[int, ...]) -> None:
    """Make the gradient flowing out of the UNet's prediction infinite in the given predict calls (1-based)."""
    real_predict = model.denoiser.predict
    seen = {"n": 0}

    def predict(*args: object, **kwargs: object) -> torch.Tensor:
        seen["n"] += 1
        out = real_predict(*args, **kwargs)
        if seen["n"] in calls:
            out.register_hook(lambda grad: grad * float("inf"))
        return out

    monkeypatch.setattr(model.denoiser, "predict", predict)


def test_fp16_overflow_skips_the_step_and_halves_the_scale() -> None:
    """A loss scale far too large overflows float16: the step is skipped, rows and AdamW state stay finite."""
    trainer = _trainer(_model("sd1", torch.float16), fp16_loss_scale=2.0**40)
    before = trainer.rows["clip_l"].detach().clone()
    loss = trainer.step(trainer.sample_batch())
    assert torch.isfinite(loss) and not bool(trainer.last_applied)
    assert torch.equal(trainer.rows["clip_l"].detach(), before)
    assert float(trainer.scaler.value) == 2.0**39
    state = trainer.optimizer.state[trainer.rows["clip_l"]]
    assert all(bool((v == 0).all()) for v in state.values())  # as if no step had been taken


def test_fp16_overflow_in_a_run_is_counted_and_retaken(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("sd1", torch.float16)
    _poison_gradient_once(model, monkeypatch, calls=(2,))
    trainer = _trainer(model, steps=3)
    result = trainer.run()
    assert not result.stopped and result.skipped == 1 and len(result.losses) == 3 and trainer.steps_done == 3
    assert torch.isfinite(result.identity.rows["clip_l"]).all()
    assert result.identity.metadata["skipped_steps"] == "1" and result.identity.metadata["compute_dtype"] == "float16"
    assert float(trainer.scaler.value) == 2.0**15


def test_fp32_non_finite_gradient_stops_with_the_last_good_rows(sd1_model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without loss scaling there is nothing to retry: a non-finite gradient ends training like a NaN loss."""
    trainer = _trainer(sd1_model, steps=5)
    _poison_gradient_once(sd1_model, monkeypatch, calls=(3,))
    rows: list[torch.Tensor] = []
    real_step = trainer.step
    monkeypatch.setattr(trainer, "step", lambda batch: (rows.append(trainer.rows["clip_l"].detach().clone()), real_step(batch))[1])
    result = trainer.run()
    assert torch.equal(result.identity.rows["clip_l"], rows[2])  # the rows step 3 started from
    assert result.stopped == "gradient became non-finite at step 3" and result.skipped == 0
    assert trainer.steps_done == 2 and len(result.losses) == 2
    assert torch.isfinite(result.identity.rows["clip_l"]).all() and result.identity.metadata["steps"] == "2"


def _masks() -> torch.Tensor:
    """Two soft masks in [0, 1] at image size (64 px for 8 x 8 latents)."""
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_micro_batches_give_the_full_batch_step(any_model: Model, masked: bool) -> None:
    """Micro-batches of 1 and of 3 (uneven) over a batch of 5: the same loss, gradient and rows as one pass."""
    masks = _masks() if masked else None
    whole = _trainer(any_model, batch_size=5, masks=masks, reg_weight=0.5)
    batch = whole.sample_batch()
    want_loss = float(whole.step(batch))
    want_grads = {k: v.grad.clone() for k, v in whole.rows.items()}
    for size in (1, 3):
        micro = _trainer(any_model, batch_size=5, masks=masks, reg_weight=0.5, micro_batch_size=size)
        assert micro.config.micro_batch == size
        loss = float(micro.step(batch))
        assert abs(loss - want_loss) < 1e-5 * want_loss, (size, loss, want_loss)
        for key, rows in micro.rows.items():
            torch.testing.assert_close(rows.grad, want_grads[key], atol=1e-8, rtol=1e-4)
            torch.testing.assert_close(rows.detach(), whole.rows[key].detach(), atol=1e-7, rtol=1e-6)


def test_step_loss_equals_the_one_pass_loss(sd1_model: Model) -> None:
    """The step's micro-batched, two-phase backward reports the loss Trainer.loss computes in one pass."""
    trainer = _trainer(sd1_model, batch_size=4, masks=_masks(), reg_weight=0.5, micro_batch_size=2)
    with torch.no_grad():
        trainer.rows["clip_l"].add_(0.3)  # away from the start, so the regulariser counts
    batch = trainer.sample_batch()
    want = float(trainer.loss(batch).detach())
    got = float(trainer.step(batch))
    assert abs(got - want) < 1e-5 * want, (got, want)


def test_each_distinct_prompt_is_encoded_once_per_step(any_model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: dict[str, list[list[str]]] = {enc.key: [] for enc in any_model.encoders}
    for enc in any_model.encoders:
        real = enc.encode

        def counting(prompts, rows, real=real, key=enc.key):  # noqa: ANN001, ANN202
            encoded[key].append(list(prompts))
            return real(prompts, rows)

        monkeypatch.setattr(enc, "encode", counting)
    trainer = _trainer(any_model, batch_size=6, micro_batch_size=2)
    batch = trainer.sample_batch()
    face = [f"a photo of a face of {SLOT} person", f"a close-up photo of a face of {SLOT} person"]
    batch.prompts = [face[0], face[1], face[0], face[0], face[1], face[0]]
    trainer.step(batch)
    for calls in encoded.values():
        assert calls == [face]  # one call per encoder per step, each distinct prompt once


def test_cpu_runs_are_deterministic_for_a_seed(sd1_model: Model) -> None:
    first = _trainer(sd1_model, steps=4, micro_batch_size=1).run()
    second = _trainer(sd1_model, steps=4, micro_batch_size=1).run()
    assert first.losses == second.losses
    assert torch.equal(first.identity.rows["clip_l"], second.identity.rows["clip_l"])


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")  # what waits for a GPU


@contextmanager
def _host_reads_refused() -> Iterator[None]:
    """Within the block, reading a tensor's value on the host raises."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a tensor value was read on the host inside a training step")

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@contextmanager
def _host_reads_allowed(saved: dict[str, object]) -> Iterator[None]:
    """Within the block, tensors behave normally again."""
    refused = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    for name, method in saved.items():
        setattr(torch.Tensor, name, method)
    try:
        yield
    finally:
        for name, method in refused.items():
            setattr(torch.Tensor, name, method)


def test_a_step_reads_nothing_back_from_the_device(any_model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling and a whole step (masks, micro-batches, regulariser, guarded update) never wait for the device.

    AdamW itself is exempt here: on the CPU it reads its step count on the host; on CUDA the trainer makes it
    capturable, which keeps the count on the device.
    """
    trainer = _trainer(any_model, batch_size=4, masks=_masks(), micro_batch_size=2)
    trainer.step(trainer.sample_batch())  # the first step fills the per-prompt and schedule caches
    normal = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    adamw_step = trainer.optimizer.step

    def exempt_step(*args: object, **kwargs: object) -> object:
        with _host_reads_allowed(normal):
            return adamw_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", exempt_step)
    with _host_reads_refused():
        trainer.step(trainer.sample_batch())


def test_text_encoders_follow_the_compute_dtype() -> None:
    parts = place_components(tiny_components("sdxl"), torch.device("cpu"), torch.bfloat16)
    model = model_from_components("sdxl", parts)
    assert [enc.dtype for enc in model.encoders] == [torch.bfloat16, torch.bfloat16]
    assert model.denoiser.dtype == torch.bfloat16


def test_penultimate_layer_without_the_last_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """SDXL: clip_l stops before its last layer; clip_g runs it for the pooled output; both give hidden_states[-2]."""
    model = model_from_components("sdxl", tiny_components("sdxl"))
    prompt = [f"a photo of {SLOT} person"]
    rows = {enc.key: torch.randn(2, enc.width) for enc in model.encoders}
    for enc in model.encoders:
        last = enc.model.text_model.encoder.layers[-1] if hasattr(enc.model, "text_model") else enc.model.encoder.layers[-1]
        ran: list[int] = []
        handle = last.register_forward_hook(lambda *_, ran=ran: ran.append(1))
        with torch.no_grad():
            got = enc.encode(prompt, rows[enc.key])
            handle.remove()
            ids, slots = enc.prompts.spliced(prompt, 2, torch.device("cpu"))
            embeds = enc.model.get_input_embeddings()(ids)
            embeds = torch.where((slots >= 0).unsqueeze(-1), rows[enc.key][slots.clamp_min(0)], embeds)
            reference = _hidden_states_from_embeddings(enc.model, ids, embeds)
        assert len(ran) == (1 if enc.projected_pooled else 0), enc.key
        torch.testing.assert_close(got.hidden, reference[-2])


def _hidden_states_from_embeddings(model: torch.nn.Module, ids: torch.Tensor, embeds: torch.Tensor) -> tuple:
    """transformers' own hidden states for ids whose token embeddings are replaced by embeds."""
    table = model.get_input_embeddings()
    handle = table.register_forward_hook(lambda *_: embeds)
    try:
        return model(ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()


def test_tf32_is_on_only_while_training_on_cuda() -> None:
    saved = torch.get_float32_matmul_precision()
    with fast_float32_matmuls(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == saved
    with fast_float32_matmuls(torch.device("cuda")):  # only flags are set: no GPU is needed
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == saved
