"""Our trainer and files agree with diffusers: one TI step with row restore, and load_textual_inversion."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from core.formats import save_identity
from core.protocols import SLOT
from core.tiny import model_from_components, tiny_components
from core.trainer import Trainer, preset_config


def _reference_step(parts: dict, start_rows: torch.Tensor, batch, lr: float, wd: float) -> torch.Tensor:
    """diffusers textual_inversion.py semantics: new tokens, whole-table AdamW, restore other rows after the step."""
    tokenizer, text_encoder = parts["tokenizer"], parts["text_encoder"]
    names = ["<ref>"] + [f"<ref>_{i}" for i in range(1, start_rows.shape[0])]
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = start_rows
    original = table.detach().clone()
    table.requires_grad_(True)
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
