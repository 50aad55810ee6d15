"""The lab model's machinery, on fresh random weights: sizes, the folder core loads, deterministic resumable
pretraining, the sampler, and Cross-Init's use of the lab's own famous names."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cross_init import column_means, initial_rows, output_rows
from core.errors import InputError
from core.lab import world
from core.lab.model import LabSpec, build_components, is_lab_folder, parameter_counts
from core.lab.pretrain import PretrainConfig, Run, draw_timesteps, export, loss_weight, run, world_batch
from core.models import LAB_NAME, check_model_spec, default_resolution, load_diffusers_folder
from core.protocols import SLOT
from core.sample import ddim_timesteps, generate
from core.templates import training_prompts

SMALL = PretrainConfig(batch=2, vae_steps=2, steps=2, warmup=2, famous=20)


@pytest.fixture(scope="module")
def lab_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 VAE + 2 UNet steps, exported as a lab folder."""
    root = tmp_path_factory.mktemp("lab")
    run(SMALL, root / "run", checkpoint_every=1000, preview_every=1000)
    return export(root / "run", root / "model")


def test_sizes_follow_the_spec() -> None:
    parts = build_components(LabSpec())
    counts = parameter_counts(parts)
    assert counts["text_encoder"] == pytest.approx(3.32e6, rel=0.01)  # the real vocabulary at width 64
    latents = parts["vae"].encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert tuple(latents.shape) == (1, 4, LabSpec().latent_size, LabSpec().latent_size) == (1, 4, 16, 16)
    assert parts["unet"].config.cross_attention_dim == parts["text_encoder"].config.hidden_size == 64


def test_exported_folder_loads_as_the_lab_model(lab_folder: Path) -> None:
    assert is_lab_folder(lab_folder)
    model = load_diffusers_folder(lab_folder, torch.device("cpu"))
    assert model.name == LAB_NAME and model.family == "sd1"
    assert default_resolution(model) == 32
    famous = world.celebrity_names(world.famous_subjects(SMALL.famous))
    assert list(model.celebrity_names) == famous
    recipe = json.loads((lab_folder / "lab.json").read_text())
    assert recipe["steps_done"] == 2 and recipe["vae_steps_done"] == 2 and recipe["config"]["batch"] == 2
    weights = model.denoiser.unet.state_dict()
    assert all(v.dtype == torch.float32 for v in weights.values())  # fp16 on disk, fp32 on the CPU
    assert next(iter(lab_folder.glob("unet/*.safetensors"))).stat().st_size < 9_000_000  # fp16


def test_cross_init_averages_the_models_own_names(lab_folder: Path) -> None:
    model = load_diffusers_folder(lab_folder, torch.device("cpu"))
    encoder = model.encoders[0]
    rows = initial_rows(model, "celebrity", 2)["clip_l"]
    wanted = output_rows(encoder, column_means(encoder, model.celebrity_names, 2))
    assert torch.allclose(rows, wanted)
    model.celebrity_names = None  # the pack's real-celebrity list gives other rows
    assert not torch.allclose(initial_rows(model, "celebrity", 2)["clip_l"], wanted)


def test_pretraining_resumes_exactly(tmp_path: Path) -> None:
    """2 + 2 steps in one go equal 1 VAE step, a stop, then the rest (the stop falls inside the VAE stage)."""
    whole = run(SMALL, tmp_path / "whole", checkpoint_every=1000, preview_every=1000)
    run(replace(SMALL, vae_steps=1, steps=0), tmp_path / "parts", checkpoint_every=1000, preview_every=1000)
    state_path = tmp_path / "parts" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    state["config"]["vae_steps"] = SMALL.vae_steps  # continue the same recipe with its full length
    torch.save(state, state_path)
    resumed = run(SMALL, tmp_path / "parts", resume=True, checkpoint_every=1000, preview_every=1000)
    assert (resumed.vae_step, resumed.step) == (2, 2)
    for key, value in whole.unet.state_dict().items():
        assert torch.equal(value, resumed.unet.state_dict()[key]), key
    for key, value in whole.ema.items():
        assert torch.equal(value, resumed.ema[key]), key
    assert resumed.scaling_factor == whole.scaling_factor


def test_a_run_refuses_to_overwrite_or_resume_another_recipe(tmp_path: Path) -> None:
    run(replace(SMALL, steps=0, vae_steps=1), tmp_path / "r", checkpoint_every=1000, preview_every=1000)
    with pytest.raises(InputError, match="--resume"):
        run(SMALL, tmp_path / "r")
    with pytest.raises(InputError, match="other settings.*batch: saved 2, given 3"):
        run(replace(SMALL, batch=3), tmp_path / "r", resume=True)
    with pytest.raises(InputError, match="--warm-start.*exists already"):
        run(SMALL, tmp_path / "r", resume=True, warm_start=tmp_path)
    with pytest.raises(InputError, match="--resume: there is no"):
        run(SMALL, tmp_path / "new", resume=True)
    with pytest.raises(InputError, match="no state.pt"):
        export(tmp_path / "new", tmp_path / "model")


def test_world_batches_depend_only_on_seed_stage_and_step() -> None:
    a_pixels, a_text = world_batch(SMALL, 2, 5)
    b_pixels, b_text = world_batch(SMALL, 2, 5)
    c_pixels, _ = world_batch(SMALL, 2, 6)
    assert torch.equal(a_pixels, b_pixels) and a_text == b_text
    assert not torch.equal(a_pixels, c_pixels)
    assert a_pixels.shape == (2, 3, 32, 32) and -1 <= a_pixels.min() and a_pixels.max() <= 1


def test_sampler_is_deterministic_and_uses_identity_rows(lab_folder: Path) -> None:
    model = load_diffusers_folder(lab_folder, torch.device("cpu"))
    first = generate(model, ["a photo of a person"], steps=3, seed=4)
    again = generate(model, ["a photo of a person"], steps=3, seed=4)
    assert first.shape == (1, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, generate(model, ["a photo of a person"], steps=3, seed=5))
    seen: list[torch.Tensor] = []  # the contexts the UNet is given (a 4-step random model barely reacts to them)
    predict = model.denoiser.predict
    model.denoiser.predict = lambda x, t, cond: seen.append(cond.context) or predict(x, t, cond)
    width = model.encoders[0].width
    generate(model, [f"a photo of {SLOT}"], {"clip_l": torch.zeros(2, width)}, steps=1, seed=4)
    generate(model, [f"a photo of {SLOT}"], {"clip_l": torch.full((2, width), 3.0)}, steps=1, seed=4)
    with_a, empty_a, with_b, empty_b = seen
    assert not torch.allclose(with_a, with_b)  # the rows reach the conditional pass
    assert torch.equal(empty_a, empty_b)  # and not the unconditional one


def test_the_sampler_refuses_more_steps_than_the_schedule_spaces(lab_folder: Path) -> None:
    model = load_diffusers_folder(lab_folder, torch.device("cpu"))
    with pytest.raises(InputError, match="steps must be 1 to 500"):
        generate(model, ["a photo of a person"], steps=501)


def test_ddim_timesteps_are_sds_leading_spacing_or_trailing() -> None:
    assert ddim_timesteps(4) == [751, 501, 251, 1]
    assert ddim_timesteps(25)[0] == 961 and ddim_timesteps(25)[-1] == 1
    assert ddim_timesteps(4, spacing="trailing") == [999, 749, 499, 249]
    with pytest.raises(InputError, match="spacing 'linspace'"):
        ddim_timesteps(4, spacing="linspace")


def test_the_lab_schedule_ends_in_pure_noise_and_its_last_step_keeps_weight() -> None:
    """The last step is pure noise (sampled from there) and the v loss still weighs it: the caption alone decides."""
    schedule = build_components(LabSpec())["scheduler"]
    abar = schedule.alphas_cumprod
    assert float(abar[-1]) == 0.0 and schedule.config.prediction_type == "v_prediction"
    assert schedule.config.timestep_spacing == "trailing"
    weights = loss_weight(abar[[0, 500, 999]], "v_prediction", 5.0)
    assert float(weights[2]) == 1.0 and 0 < float(weights[0]) < 0.01  # low noise capped at SNR + 1 = 5
    assert float(loss_weight(abar[[998]], "epsilon", 5.0)[0]) == 1.0  # min-SNR: eps weight 1 where SNR < 5
    with pytest.raises(ValueError, match="zero_terminal_snr: needs prediction_type v_prediction"):
        LabSpec(prediction_type="epsilon")


def test_lab_templates_are_the_worlds_caption_openings() -> None:
    prompts = training_prompts("lab")
    assert prompts[0] == "a photo of {}" and len(prompts) == len(world.PREFIXES)


def test_the_lab_model_name_needs_its_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import core.models

    monkeypatch.setattr(core.models, "LAB_FOLDER", tmp_path / "missing")
    with pytest.raises(InputError, match="lab model is not in"):
        check_model_spec("lab")


DDP_SCRIPT = """
import sys, torch
from pathlib import Path
from core.lab.pretrain import PretrainConfig, run
torch.set_num_threads(1)
run(PretrainConfig(batch=4, vae_steps=2, steps=2, warmup=2, famous=20), Path(sys.argv[1]), checkpoint_every=1000)
"""


def test_two_processes_train_as_one_with_the_whole_batch(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes, each with half of every batch, gives one process's weights (float rounding)."""
    import os
    import subprocess

    script = tmp_path / "pretrain_small.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    for command, folder in (([sys.executable, str(script)], "one"), (torchrun, "two")):
        done = subprocess.run([*command, str(tmp_path / folder)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "state.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "state.pt", weights_only=True)
    assert (one["vae_step"], one["step"]) == (two["vae_step"], two["step"]) == (2, 2)
    for part in ("vae", "unet", "text_encoder"):
        for key, value in one[part].items():
            assert torch.allclose(value, two[part][key], atol=2e-4), (part, key)
    assert one["scaling_factor"] == pytest.approx(two["scaling_factor"], rel=1e-5)


def test_a_warm_start_continues_an_exported_folders_counters(lab_folder: Path, tmp_path: Path) -> None:
    state = run(replace(SMALL, steps=3), tmp_path / "more", warm_start=lab_folder, checkpoint_every=1000)
    assert (state.vae_step, state.step) == (2, 3)
    exported = load_diffusers_folder(lab_folder, torch.device("cpu"))
    started = Run(replace(SMALL, steps=3), tmp_path / "unused")
    started.warm_start(lab_folder)
    for key, value in exported.denoiser.unet.state_dict().items():
        assert torch.equal(value, started.unet.state_dict()[key]), key
    text = exported.encoders[0].model.state_dict()
    assert all(torch.equal(v, started.text.state_dict()[k]) for k, v in text.items())
    assert started.learning_rate() == pytest.approx(SMALL.lr / SMALL.warmup)  # the warm-up runs again
    first, marker, more = state.history  # the folder's own stretch, the warm start, this one
    assert first["steps"] == [0, 2] and marker == {"warm_start_from_export_at_step": 2} and more["steps"] == [2, 3]
    with pytest.raises(InputError, match="other settings.*batch"):
        run(replace(SMALL, batch=4, steps=3), tmp_path / "other", warm_start=lab_folder)


def test_high_noise_steps_are_drawn_only_when_asked() -> None:
    """Without the high-noise share the draws are plain uniform ones (older recipes replay exactly)."""
    plain = replace(SMALL, batch=64, high_noise_fraction=0.0)
    expected = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw_timesteps(plain, 1000, torch.Generator().manual_seed(3)), expected)
    mixed = draw_timesteps(replace(plain, high_noise_fraction=0.5), 1000, torch.Generator().manual_seed(3))
    assert 0.3 < float((mixed >= 850).float().mean()) < 0.8 and int(mixed.min()) < 850
    assert int(draw_timesteps(replace(plain, high_noise_fraction=1.0), 1000, torch.Generator()).min()) >= 850


def test_look_captions_state_only_hair_and_eyes() -> None:
    rng = np.random.default_rng(0)
    samples = [world.pretraining_sample([], rng, look_fraction=1.0) for _ in range(20)]
    for _image, text, labels in samples:
        assert labels["stated"] == ("hair", "eyes") and text.endswith(f"with {labels['hair']} hair and {labels['eyes']} eyes")
    again = [world.pretraining_sample([], np.random.default_rng(0), look_fraction=0.0)[1] for _ in range(1)]
    assert again[0] == world.pretraining_sample([], np.random.default_rng(0))[1]  # no fraction, no extra draw


def test_a_warm_start_may_change_the_schedule_and_records_it(lab_folder: Path, tmp_path: Path) -> None:
    """The shipped model moved from SD1's epsilon schedule to v on zero terminal SNR this way; sizes may not change."""
    old = replace(SMALL, steps=3, spec=LabSpec(prediction_type="epsilon", zero_terminal_snr=False))
    eps_folder = export(run(old, tmp_path / "eps", checkpoint_every=1000).folder, tmp_path / "eps_model")
    state = run(replace(SMALL, steps=4), tmp_path / "v", warm_start=eps_folder, checkpoint_every=1000)
    marker = state.history[-2]
    assert marker["changed"] == {"spec.prediction_type": ["epsilon", "v_prediction"], "spec.zero_terminal_snr": [False, True]}
    assert load_diffusers_folder(eps_folder, torch.device("cpu")).denoiser.prediction_type == "epsilon"
    with pytest.raises(InputError, match="other settings.*spec"):
        run(replace(SMALL, steps=3, spec=LabSpec(text_layers=2)), tmp_path / "sizes", warm_start=eps_folder)
