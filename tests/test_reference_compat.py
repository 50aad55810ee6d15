"""Our trainer and files agree with diffusers: one TI step with row restore, and load_textual_inversion."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from core.formats import save_identity
from core.models import load_model
from core.protocols import SLOT
from core.tiny import model_from_components, tiny_components
from core.trainer import Trainer, preset_config


def _reference_step(parts: dict, start_rows: torch.Tensor, batch, lr: float, wd: float) -> torch.Tensor:
    """diffusers textual_inversion.py semantics: new tokens, whole-table AdamW, restore other rows after the step."""
    tokenizer, text_encoder = parts["tokenizer"], parts["text_encoder"]
    names, ids, table = _placeholder_table(parts, start_rows)
    original = table.detach().clone()
    optimizer = torch.optim.AdamW([table], lr=lr, betas=(0.9, 0.999), weight_decay=wd, eps=1e-8)
    prompts = [p.replace(SLOT, " ".join(names)) for p in batch.prompts]
    input_ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    context = text_encoder(input_ids)[0]
    scheduler, unet = parts["scheduler"], parts["unet"]
    noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    pred = unet(noisy, batch.timesteps, context).sample
    loss = F.mse_loss(pred.float(), batch.noise.float(), reduction="mean")
    loss.backward()
    optimizer.step()
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[ids] = False
    with torch.no_grad():
        table[keep] = original[keep]
        return table[ids].detach().clone()


def test_one_step_equals_diffusers_reference(images: torch.Tensor) -> None:
    ours = model_from_components("sd1", tiny_components("sd1"))
    config = preset_config(
        "textual_inversion", resolution=64, batch_size=2, steps=1, token="<ref>", learning_rate=0.005, n_tokens=2
    )
    trainer = Trainer(ours, images, config)
    start = trainer.rows["clip_l"].detach().clone()
    batch = trainer.sample_batch()
    trainer.step(batch)
    expected = _reference_step(tiny_components("sd1"), start, batch, lr=0.005, wd=0.01)
    assert not torch.equal(trainer.rows["clip_l"].detach(), start)
    torch.testing.assert_close(trainer.rows["clip_l"].detach(), expected, atol=1e-6, rtol=1e-5)


V_REG = 0.05  # large enough that the regulariser shows in the gradient
V_LR = 0.005


def _placeholder_table(parts: dict, start_rows: torch.Tensor) -> tuple[list[str], list[int], torch.Tensor]:
    """diffusers TI set-up: new tokens <ref>, <ref>_1..., a resized table holding start_rows at their ids."""
    tokenizer, text_encoder = parts["tokenizer"], parts["text_encoder"]
    names = ["<ref>"] + [f"<ref>_{i}" for i in range(1, start_rows.shape[0])]
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = start_rows
    table.requires_grad_(True)
    return names, ids, table


def _v_loss(parts: dict, names: list[str], batch, rows: torch.Tensor, init_rows: torch.Tensor) -> torch.Tensor:
    """MSE against v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0, plus V_REG * mean_i ||v_i - v_init,i + 1e-6||."""
    tokenizer, text_encoder, unet = parts["tokenizer"], parts["text_encoder"], parts["unet"]
    prompts = [p.replace(SLOT, " ".join(names)) for p in batch.prompts]
    input_ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    context = text_encoder(input_ids)[0]  # diffusers SD2 text_encoder output [0]: its last layer after final LN
    abar = parts["scheduler"].alphas_cumprod.to(torch.float32)[batch.timesteps].view(-1, 1, 1, 1)
    x0, noise = batch.latents, batch.noise
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    pred = unet(noisy, batch.timesteps, context).sample
    mse = ((pred.float() - velocity) ** 2).mean()
    distance = ((rows - init_rows + 1e-6) ** 2).sum(dim=1).sqrt()
    return mse + V_REG * distance.mean()


def _adamw_first_step(param: torch.Tensor, grad: torch.Tensor, lr: float, wd: float) -> torch.Tensor:
    """torch's AdamW update at step 1 (betas 0.9/0.999, eps 1e-8), written out: decoupled decay, then Adam."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    decayed = param * (1 - lr * wd)
    m_hat = ((1 - beta1) * grad) / (1 - beta1)
    v_hat = ((1 - beta2) * grad * grad) / (1 - beta2)
    return decayed - lr * m_hat / (v_hat.sqrt() + eps)


def test_one_v_prediction_step_equals_an_independent_reference(images: torch.Tensor) -> None:
    """tiny-sd2 (v-prediction): Trainer.step's loss, gradient and updated rows match a by-hand computation."""
    model = load_model("tiny-sd2", torch.device("cpu"))
    assert model.denoiser.prediction_type == "v_prediction"
    config = preset_config(
        "cross_init_fast", resolution=64, batch_size=2, steps=1, token="<ref>", learning_rate=V_LR, reg_weight=V_REG
    )
    trainer = Trainer(model, images, config)
    assert (config.weight_decay, config.adam_betas, config.adam_eps) == (0.01, (0.9, 0.999), 1e-8)
    init = trainer.init_rows["clip_h"].detach().clone()
    with torch.no_grad():  # start away from the initial rows, so the regulariser has a direction
        trainer.rows["clip_h"].add_(torch.randn(init.shape, generator=torch.Generator().manual_seed(9)))
    start = trainer.rows["clip_h"].detach().clone()
    batch = trainer.sample_batch()
    batch.timesteps = torch.tensor([50, 950])  # one nearly clean and one nearly pure-noise sample: v is far from eps
    loss = trainer.step(batch)

    parts = tiny_components("sd2")
    names, ids, table = _placeholder_table(parts, start)
    expected_loss = _v_loss(parts, names, batch, table[ids], init)
    (grad_table,) = torch.autograd.grad(expected_loss, table)
    expected_grad = grad_table[ids]
    expected_rows = _adamw_first_step(start, expected_grad, lr=V_LR, wd=0.01)
    reference_loss = float(expected_loss.detach())
    assert abs(loss - reference_loss) < 1e-6 * reference_loss, (loss, reference_loss)
    torch.testing.assert_close(trainer.rows["clip_h"].grad, expected_grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(trainer.rows["clip_h"].detach(), expected_rows, atol=1e-6, rtol=1e-6)


def test_saved_file_loads_in_diffusers_pipeline(tmp_path: Path, images: torch.Tensor) -> None:
    from diffusers import StableDiffusionPipeline

    ours = model_from_components("sd1", tiny_components("sd1"))
    config = preset_config("cross_init_fast", resolution=64, batch_size=2, steps=2, token="<astro>")
    identity = Trainer(ours, images, config).run().identity
    path = save_identity(identity, tmp_path / "astro.safetensors", token="<astro>")

    parts = tiny_components("sd1")
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_textual_inversion(str(path))
    prompt = pipe.maybe_convert_prompt("a photo of <astro> person", pipe.tokenizer)
    assert prompt == "a photo of <astro> <astro>_1 person"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
        mine = ours.encoders[0].encode([f"a photo of {SLOT} person"], identity.rows["clip_l"]).hidden
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
