"""Tests for core.checkpoint: family detection, shipped configs, and offline single-file loads of tiny checkpoints."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import reads it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from core.checkpoint import (  # noqa: E402
    CONFIG_ROOT,
    detect_family,
    load_single_file,
    normalize_keys,
    prediction_type_for,
    read_state_dict,
    shipped_config_dir,
)
from core.errors import InputError  # noqa: E402
from core.protocols import Model, condition  # noqa: E402
from core.tiny import model_from_components, tiny_model  # noqa: E402
from tests.tiny_checkpoint import components_to_ldm, write_component_configs, write_tiny_checkpoint  # noqa: E402

CPU = torch.device("cpu")
TOL = 1e-5
ENCODER_KEYS = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}
# Public parameter counts of the real models: (UNet, VAE, text encoder(s)).
REAL_PARAMS = {
    "sd1": (859_520_964, 83_653_863, [123_060_480]),
    "sd2": (865_910_724, 83_653_863, [340_387_840]),
    "sd2_v": (865_910_724, 83_653_863, [340_387_840]),
    "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
}
VAE_KEYS = {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
            "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}
REAL_LIKE = {
    "sd1": {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        **VAE_KEYS,
    },
    "sd2": {
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.weight": (1024, 4096),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        **VAE_KEYS,
    },
    "sdxl": {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        **VAE_KEYS,
    },
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection or resolve a host fails the test."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict]]:
    """Per family: the tiny single-file checkpoint, a config folder of the tiny components, and the components."""
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    files = {}
    for family in ("sd1", "sd2", "sdxl"):
        path = root / f"tiny-{family}.safetensors"
        parts = write_tiny_checkpoint(path, family)
        files[family] = (path, write_component_configs(parts, root / f"config-{family}"), parts)
    return files


def _assert_same_outputs(loaded: Model, reference: Model) -> None:
    """Text encodings (with spliced rows), UNet predictions and VAE latents agree within TOL."""
    gen = torch.Generator().manual_seed(1)
    rows = {enc.key: torch.randn(2, enc.width, generator=gen) for enc in reference.encoders}
    prompts = ["a photo of {} at the beach", "a painting"]
    ref_cond = condition(reference, prompts, rows)
    got_cond = condition(loaded, prompts, rows)
    torch.testing.assert_close(got_cond.context, ref_cond.context, atol=TOL, rtol=0)
    if ref_cond.pooled is not None:
        torch.testing.assert_close(got_cond.pooled, ref_cond.pooled, atol=TOL, rtol=0)
    noisy = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        got = loaded.denoiser.predict(noisy, timesteps, ref_cond)
        ref = reference.denoiser.predict(noisy, timesteps, ref_cond)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    pixels = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    for got_t, ref_t in zip(loaded.denoiser.encode_pixels(pixels), reference.denoiser.encode_pixels(pixels)):
        torch.testing.assert_close(got_t, ref_t, atol=TOL, rtol=0)


def test_tiny_sd1_single_file_equals_tiny_model(tiny_files: dict, no_network: None) -> None:
    """The tiny SD1 checkpoint loads to a model whose outputs equal tiny_model('sd1') (same seed, same weights)."""
    path, config_dir, _ = tiny_files["sd1"]
    loaded = load_single_file(path, CPU, torch.float32, config_dir=config_dir)
    assert loaded.family == "sd1" and loaded.name == "tiny-sd1"
    assert [enc.key for enc in loaded.encoders] == ["clip_l"]
    assert loaded.denoiser.prediction_type == "epsilon"
    for module in (loaded.denoiser.unet, loaded.denoiser.vae, loaded.encoders[0].model):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    _assert_same_outputs(loaded, tiny_model("sd1"))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_tiny_sd2_and_sdxl_single_files_equal_their_components(tiny_files: dict, no_network: None, family: str) -> None:
    """SD2 (OpenCLIP layout) and SDXL (two encoders, text_time embedding) load to the same outputs too."""
    path, config_dir, parts = tiny_files[family]
    loaded = load_single_file(path, CPU, torch.float32, config_dir=config_dir)
    assert loaded.family == family
    assert [enc.key for enc in loaded.encoders] == ENCODER_KEYS[family]
    assert loaded.denoiser.prediction_type == parts["scheduler"].config.prediction_type
    _assert_same_outputs(loaded, model_from_components(family, parts))


def test_dtype_applies_to_every_module(tiny_files: dict, no_network: None) -> None:
    """UNet, VAE and text encoders compute in the requested dtype (the identity rows stay float32 in the trainer)."""
    path, config_dir, _ = tiny_files["sd1"]
    loaded = load_single_file(path, CPU, torch.bfloat16, config_dir=config_dir)
    assert next(loaded.denoiser.unet.parameters()).dtype == torch.bfloat16
    assert next(loaded.denoiser.vae.parameters()).dtype == torch.bfloat16
    assert loaded.encoders[0].token_table().dtype == torch.bfloat16


def test_weights_only_ckpt_loads(tiny_files: dict, tmp_path: Path, no_network: None) -> None:
    """A plain-tensor .ckpt (state dict under 'state_dict', plus a step count) loads like the safetensors file."""
    _, config_dir, parts = tiny_files["sd1"]
    path = tmp_path / "tiny-sd1.ckpt"
    torch.save({"state_dict": components_to_ldm("sd1", parts), "global_step": 5}, path)
    loaded = load_single_file(path, CPU, torch.float32, prediction_type="v_prediction", config_dir=config_dir)
    assert loaded.family == "sd1" and loaded.denoiser.prediction_type == "v_prediction"
    torch.testing.assert_close(loaded.encoders[0].token_table(), parts["text_encoder"].get_input_embeddings().weight)


RAN: list[str] = []


def _record(text: str) -> None:
    """Stands in for code a hostile pickle would run."""
    RAN.append(text)


class Payload:
    """An object whose pickle calls _record when unpickled with the full unpickler."""

    def __reduce__(self) -> tuple:
        return (_record, ("ran",))


def test_pickle_with_foreign_global_is_refused(tmp_path: Path) -> None:
    """A .ckpt whose pickle names a non-allowlisted global is refused without running it."""
    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(InputError, match=r"hostile\.ckpt: refused.*safetensors"):
        load_single_file(path, CPU, torch.float32)
    assert RAN == []


def test_unknown_layout_is_refused(tmp_path: Path) -> None:
    """A safetensors file of another layout names the file and what is supported."""
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(4), "img_in.weight": torch.ones(2, 2)}, str(path))
    with pytest.raises(InputError, match=r"flux\.safetensors: unknown key layout.*'double_blocks.0'.*SD1\.x, SD2\.x and SDXL"):
        load_single_file(path, CPU, torch.float32)


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    """Missing files, damaged safetensors and unknown suffixes give InputErrors naming the file."""
    with pytest.raises(InputError, match="no such file"):
        read_state_dict(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match=r"broken\.safetensors: not a readable"):
        read_state_dict(broken)
    other = tmp_path / "model.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(InputError, match=r"'\.gguf' files are not read"):
        read_state_dict(other)


def test_missing_weights_are_reported(tiny_files: dict, tmp_path: Path) -> None:
    """A checkpoint lacking some UNet tensors is refused instead of leaving meta weights behind."""
    _, config_dir, parts = tiny_files["sd1"]
    state = components_to_ldm("sd1", parts)
    del state["model.diffusion_model.out.2.weight"]
    path = tmp_path / "incomplete.safetensors"
    save_file(state, str(path))
    with pytest.raises(InputError, match=r"incomplete\.safetensors: some unet weights are missing"):
        load_single_file(path, CPU, torch.float32, config_dir=config_dir)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_detect_family_on_real_layouts(family: str) -> None:
    """Key/shape maps typical of real SD1.5, SD2.1 and SDXL base checkpoints are told apart."""
    shapes = REAL_LIKE[family]
    assert detect_family(shapes.keys(), shapes) == family


def test_detect_family_refusals() -> None:
    """Refiner, UNet-only, VAE-less, inpainting and mixed-width files are refused with reasons."""
    sd1 = REAL_LIKE["sd1"]
    refiner = {"conditioner.embedders.0.model.text_projection": (1280, 1280), **VAE_KEYS,
               "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3)}
    unet_only = {k: v for k, v in sd1.items() if k.startswith("model.")}
    no_vae = {k: v for k, v in sd1.items() if not k.startswith("first_stage_model.")}
    inpaint = {**sd1, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    mixed = {**sd1, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    cases = [(refiner, "SDXL refiner"), (unet_only, "no text encoder"), (no_vae, "has no VAE"),
             (inpaint, "9 input channels"), (mixed, "768-wide context but the UNet takes 1024")]
    for shapes, message in cases:
        with pytest.raises(InputError, match=message):
            detect_family(shapes.keys(), shapes, "x.safetensors")


def test_old_sd1_clip_keys_are_normalized() -> None:
    """SD1 files written with old transformers (no 'text_model.') get the current names."""
    state = {"cond_stage_model.transformer.embeddings.token_embedding.weight": torch.zeros(1),
             "cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(1),
             "model.diffusion_model.out.2.bias": torch.zeros(1)}
    assert sorted(normalize_keys(state)) == [
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.bias",
        "model.diffusion_model.out.2.bias",
    ]


def test_prediction_type_choice() -> None:
    """Explicit choice wins; ComfyUI's v_pred marker means v; a '768'/vpred name only when the weights cannot tell."""
    keys = dict.fromkeys(REAL_LIKE["sd2"], torch.zeros(1))
    assert prediction_type_for("sd2", keys, "v2-1_512-ema-pruned")[0] is None
    assert prediction_type_for("sd2", keys, "v2-1_768-ema-pruned")[0] == "v_prediction"
    assert prediction_type_for("sd2", keys, "v2-1_768-ema-pruned", "epsilon")[0] == "epsilon"
    assert prediction_type_for("sd1", keys, "model-768")[0] is None
    assert prediction_type_for("sdxl", {**keys, "v_pred": torch.zeros(0)}, "noob")[0] == "v_prediction"
    with pytest.raises(InputError, match="prediction_type: 'v'"):
        prediction_type_for("sd1", keys, "x", "v")
    assert shipped_config_dir("sd2", "v_prediction").name == "sd2_v"
    assert shipped_config_dir("sd2", None).name == "sd2"
    assert shipped_config_dir("sdxl", "v_prediction").name == "sdxl"


NORM_BIAS = "model.diffusion_model.output_blocks.{}.1.transformer_blocks.0.norm1.bias"


@pytest.mark.parametrize(("spread", "name", "expected"), [
    (0.2, "my-finetune", "v_prediction"),  # a v model whose name says nothing
    (0.01, "v2-1_768-ema-pruned", "epsilon"),  # the weights win over a misleading name
    (0.12, "sd21-512-base", "v_prediction"),
])
def test_sd2_prediction_type_is_read_from_the_weights(spread: float, name: str, expected: str) -> None:
    """ComfyUI's SD2 rule: std of the last output attention block's norm1 bias above 0.09 means v-prediction."""
    generator = torch.Generator().manual_seed(0)
    checkpoint = dict.fromkeys(REAL_LIKE["sd2"], torch.zeros(1))
    checkpoint[NORM_BIAS.format(5)] = torch.zeros(1024)  # an earlier block does not decide
    checkpoint[NORM_BIAS.format(11)] = torch.randn(1024, generator=generator) * spread
    kind, why = prediction_type_for("sd2", checkpoint, name)
    assert kind == expected and "weights" in why


def test_v_checkpoint_with_plain_name_loads_as_v(tiny_files: dict, tmp_path: Path, no_network: None) -> None:
    """A tiny SD2 v checkpoint renamed to say nothing still trains as v (detected from the weights, not the name)."""
    path, config_dir, _parts = tiny_files["sd2"]
    renamed = tmp_path / "portrait-model.safetensors"
    renamed.write_bytes(path.read_bytes())
    assert load_single_file(renamed, CPU, torch.float32, config_dir=config_dir).denoiser.prediction_type == "v_prediction"
    flat = read_state_dict(renamed)
    last = max((k for k in flat if k.endswith(".1.transformer_blocks.0.norm1.bias") and ".output_blocks." in k),
               key=lambda k: int(k.split(".output_blocks.")[1].split(".")[0]))
    flat[last] = torch.zeros_like(flat[last])
    eps_path = tmp_path / "v2-768-looks-v.safetensors"
    save_file(flat, str(eps_path))
    assert load_single_file(eps_path, CPU, torch.float32, config_dir=config_dir).denoiser.prediction_type == "epsilon"


@pytest.mark.parametrize("folder", ["sd1", "sd2", "sd2_v", "sdxl"])
def test_shipped_configs_build_the_real_architectures(folder: str) -> None:
    """Each shipped config folder parses and builds (on the meta device) models of the real parameter counts."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = CONFIG_ROOT / folder
    for path in root.rglob("*.json"):
        json.loads(path.read_text())
    index = json.loads((root / "model_index.json").read_text())
    encoders = [name for name in ("text_encoder", "text_encoder_2") if name in index]
    unet_config = UNet2DConditionModel.load_config(str(root), subfolder="unet", local_files_only=True)
    text_configs = [CLIPTextConfig.from_pretrained(str(root), subfolder=n, local_files_only=True) for n in encoders]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(root), subfolder="vae", local_files_only=True))
        texts = [(CLIPTextModelWithProjection if n == "text_encoder_2" else CLIPTextModel)(c)
                 for n, c in zip(encoders, text_configs)]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (count(unet), count(vae), [count(t) for t in texts]) == REAL_PARAMS[folder]
    assert unet_config["cross_attention_dim"] == sum(c.hidden_size for c in text_configs)
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(str(root), subfolder="scheduler"))
    assert scheduler.config.prediction_type == ("v_prediction" if folder == "sd2_v" else "epsilon")
    assert sum(p.stat().st_size for p in root.rglob("*.json")) < 8_000


def test_shipped_config_is_used_without_config_dir(tiny_files: dict, no_network: None) -> None:
    """Without config_dir the shipped real-size SD1 config is used, offline; tiny weights do not fit it."""
    path, _, _ = tiny_files["sd1"]
    with pytest.raises(InputError, match=r"tiny-sd1\.safetensors: its unet weights do not fit the sd1 architecture"):
        load_single_file(path, CPU, torch.float32)


def test_missing_accelerate_is_a_clear_error(tiny_files: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without accelerate, diffusers would leave missing weights random; the loader says what to install instead."""
    import importlib.util

    path, config_dir, _ = tiny_files["sd1"]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    with pytest.raises(InputError, match="pip install accelerate"):
        load_single_file(path, CPU, torch.float32, config_dir=config_dir)
