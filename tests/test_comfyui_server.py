"""Integration: the pack inside a real ComfyUI server (CI's March-2024 core) with a tiny random SD1.5 checkpoint."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from core.formats import load_identity, save_identity
from core.identity import Identity
from tests.comfy_server import ComfyServer, RunResult
from tests.tiny_sd15 import CLIP, UNET, VAE, is_norm, write_tiny_sd15

WORKFLOWS = Path(__file__).parent / "workflows"
NODE_IDS = {
    "IdentityTokens_CollectPhotos",
    "IdentityTokens_CrossInitEmbed",
    "IdentityTokens_TrainIdentityToken",
    "IdentityTokens_ApplyIdentity",
    "IdentityTokens_SaveIdentity",
    "IdentityTokens_LoadIdentity",
    "IdentityTokens_FaceCrop",
    "IdentityTokens_FaceAttentionLoss",
    "IdentityTokens_FaceSimilarity",
    "IdentityTokens_ExportPlainIdentity",
    "IdentityTokens_EncoderLoader",
    "IdentityTokens_EncoderCustomize",
}
TRAIN, SAVE, LOSS_PREVIEW, SAVE_IMAGE = "3", "4", "5", "11"  # node ids in train_save_sample.api.json
PHOTO_LOADERS, COLLECT = ("2", "13", "14"), "15"  # its three Load Image nodes and their Collect Photos
PHOTO_SIZES = {"astronaut.png": (512, 512), "coffee.png": (600, 400), "chelsea.png": (451, 300)}  # width, height
SAVE_NAME = "astronaut-ci"


def workflow(name: str) -> dict[str, Any]:
    """A fresh copy of an API-format workflow from tests/workflows."""
    return json.loads((WORKFLOWS / f"{name}.api.json").read_text())


def image_files(result: RunResult) -> list[Path]:
    """The output images the history lists, each checked to exist."""
    files = result.files("output")
    missing = [p for p in files if not p.is_file()]
    assert not missing, f"history lists images that are not on disk: {missing}"
    return files


def pixels(path: Path) -> np.ndarray:
    """An image file's RGB pixels as floats."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def assert_real_image(path: Path, size: int = 64) -> None:
    """A size x size RGB PNG whose pixels are not all the same (the tiny model's decoder is not flat)."""
    with Image.open(path) as image:
        assert image.size == (size, size), f"{path.name} is {image.size}"
    values = pixels(path)
    assert values.std() > 1.0, f"{path.name} is a flat image (std {values.std():.3f})"


def write_identity(folder: Path, name: str, seed: int) -> Identity:
    """Save a random 2-token SD1 identity (rows of width 768) as folder/name.safetensors."""
    generator = torch.Generator().manual_seed(seed)
    identity = Identity({"clip_l": torch.randn(2, 768, generator=generator) * 0.3}, {"method": "test"})
    save_identity(identity, folder / f"{name}.safetensors", token=name, overwrite=True)
    return identity


@pytest.fixture(scope="module")
def trained(comfy_server: ComfyServer) -> RunResult:
    """Workflow (a): train 3 steps, save as astronaut-ci, preview the loss curve, sample with the identity."""
    target = comfy_server.embeddings_dir / f"{SAVE_NAME}.safetensors"
    assert not target.exists(), "a fresh server must start with an empty embeddings folder"
    return comfy_server.run(workflow("train_save_sample"))


@pytest.fixture(scope="module")
def two_identity_files(comfy_server: ComfyServer) -> dict[str, Identity]:
    """alice and bob written into the server's embeddings folder with the pack's own file writer."""
    return {name: write_identity(comfy_server.embeddings_dir, name, seed) for seed, name in enumerate(("alice", "bob"))}


def test_tiny_checkpoint_layout() -> None:
    """The tiny checkpoint has SD1.5's detection keys and widths, a full CLIP-L, and every normalisation weight at 1."""
    path = write_tiny_sd15()
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
        norms = [key for key in keys if key.endswith(".weight") and is_norm(key)]
        assert len(norms) > 40
        for key in norms:
            assert bool((handle.get_tensor(key) == 1).all()), f"{key} is not all ones"
    assert shapes[f"{UNET}input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert shapes[f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert len(shapes[f"{UNET}input_blocks.1.1.proj_in.weight"]) == 4  # conv proj_in: SD1, not SD2
    assert f"{UNET}label_emb.0.0.weight" not in keys and f"{UNET}input_blocks.2.0.op.weight" not in keys
    clip = sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(CLIP) and "position_ids" not in key)
    assert clip == 123_060_480, clip  # CLIP ViT-L/14's text transformer
    assert f"{VAE}taesd_decoder.1.weight" in keys and f"{VAE}taesd_encoder.0.weight" in keys
    for key in (f"{UNET}input_blocks.1.0.in_layers.0.weight", f"{UNET}output_blocks.0.0.out_layers.0.weight",
                f"{UNET}out.0.weight", f"{UNET}middle_block.1.norm.weight", f"{CLIP}final_layer_norm.weight"):  # fmt: skip
        assert key in norms, key


def test_nodes_registered_with_tooltips(comfy_server: ComfyServer) -> None:
    """Every node id is in /object_info, from the pack, in its category, with a tooltip on every input."""
    info = comfy_server.object_info()
    assert NODE_IDS <= set(info), f"missing nodes: {sorted(NODE_IDS - set(info))}"
    for node_id in sorted(NODE_IDS):
        node = info[node_id]
        assert node["category"] == "identity_tokens", node_id
        assert node.get("description"), f"{node_id} has no description"
        if "python_module" in node:  # newer cores say where a node came from; the March-2024 core does not
            assert node["python_module"] == "custom_nodes.identity_tokens", node["python_module"]
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert str(options.get("tooltip", "")).strip(), f"{node_id}.{input_name} has no tooltip"
    assert info["IdentityTokens_SaveIdentity"]["output_node"] is True
    assert info["IdentityTokens_TrainIdentityToken"]["output"] == ["IDENTITY", "IMAGE", "IMAGE"]
    assert info["IdentityTokens_ApplyIdentity"]["output"] == ["CONDITIONING", "MODEL"]
    assert info["IdentityTokens_TrainIdentityToken"]["input"]["required"]["resolution"][1]["default"] == 0
    collect = info["IdentityTokens_CollectPhotos"]
    assert collect["output"] == ["IMAGE"] and collect["output_is_list"] == [True], collect
    assert list(collect["input"]["required"]) == ["photo_1"] and len(collect["input"]["optional"]) == 4
    # The pack was imported as custom_nodes/identity_tokens: its web folder is served under that module name.
    assert "/extensions/identity_tokens/identity_tokens.js" in comfy_server.get_json("/extensions")
    log = comfy_server.log()
    assert "custom_nodes/identity_tokens" in log and "IMPORT FAILED" not in log


def test_train_save_and_sample(comfy_server: ComfyServer, trained: RunResult) -> None:
    """Workflow (a) trains on three photos of different sizes with progress, saves a loadable 2-token identity,
    previews the loss and writes an image."""
    assert trained.status == "success", trained.describe()
    prompt = workflow("train_save_sample")
    names = [prompt[node]["inputs"]["image"] for node in PHOTO_LOADERS]
    sizes = {}
    for name in names:
        with Image.open(comfy_server.input_dir / name) as photo:
            sizes[name] = photo.size
    assert sizes == PHOTO_SIZES, sizes  # three photos, three different sizes, all trained on together
    assert prompt[TRAIN]["inputs"]["images"] == [COLLECT, 0]
    assert {COLLECT, *PHOTO_LOADERS} <= set(trained.node_seconds()), trained.describe()
    images = image_files(trained)
    assert images == trained.files("output", SAVE_IMAGE), trained.history.get("outputs")
    assert [p.name.startswith("identity_tokens_ci") for p in images] == [True], images
    assert_real_image(images[0])
    loss_curve = trained.files("temp", LOSS_PREVIEW)
    assert len(loss_curve) == 1 and loss_curve[0].is_file(), trained.outputs(LOSS_PREVIEW)
    progress = trained.progress(TRAIN)
    assert progress and all(p["max"] == 3 for p in progress), progress
    assert [p["value"] for p in progress][-1] == 3, progress
    path = comfy_server.embeddings_dir / f"{SAVE_NAME}.safetensors"
    assert path.is_file(), sorted(p.name for p in comfy_server.embeddings_dir.iterdir())
    assert trained.outputs(SAVE).get("text") == [str(path)], trained.outputs(SAVE)
    identity = load_identity(path)
    assert identity.n_tokens == 2
    assert identity.metadata.get("steps") == "3", identity.metadata
    assert tuple(identity.rows) == ("clip_l",) and identity.rows["clip_l"].shape == (2, 768)
    assert torch.isfinite(identity.rows["clip_l"]).all()
    assert f"{SAVE_NAME}.safetensors" in comfy_server.object_info("IdentityTokens_LoadIdentity")[
        "IdentityTokens_LoadIdentity"]["input"]["required"]["name"][0]  # fmt: skip


def test_existing_name_is_not_overwritten(comfy_server: ComfyServer, trained: RunResult) -> None:
    """Workflow (a) again (another seed, so it is not cached) fails at SaveIdentity and keeps the existing file."""
    assert trained.status == "success", trained.describe()
    path = comfy_server.embeddings_dir / f"{SAVE_NAME}.safetensors"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    prompt = workflow("train_save_sample")
    prompt[TRAIN]["inputs"]["seed"] = 1
    result = comfy_server.run(prompt)
    assert result.status == "error", result.describe()
    errors = result.of_type("execution_error")
    assert [e["node_type"] for e in errors] == ["IdentityTokens_SaveIdentity"], result.describe()
    message = errors[0]["exception_message"]
    assert SAVE_NAME in message and "overwrite" in message, message
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_two_identities_in_one_prompt(comfy_server: ComfyServer, two_identity_files: dict[str, Identity]) -> None:
    """Workflow (b) samples an image; swapping the triggers (same seed) changes it, so the rows reach the UNet."""
    result = comfy_server.run(workflow("two_identities"))
    assert result.status == "success", result.describe()
    images = image_files(result)
    assert len(images) == 1 and images[0].name.startswith("identity_tokens_two"), images
    assert_real_image(images[0])
    swapped = workflow("two_identities")
    swapped["4"]["inputs"].update(trigger="bob", trigger_2="alice")
    again = comfy_server.run(swapped)
    assert again.status == "success", again.describe()
    other = image_files(again)
    assert len(other) == 1 and other[0] != images[0], other
    difference = np.abs(pixels(other[0]) - pixels(images[0])).max()
    assert difference > 1.0, "swapping alice's and bob's rows left the image unchanged"


def test_missing_trigger_is_a_node_error(comfy_server: ComfyServer, two_identity_files: dict[str, Identity]) -> None:
    """A prompt without the trigger word fails in ApplyIdentity with a message that names the trigger."""
    prompt = workflow("two_identities")
    prompt["4"]["inputs"]["text"] = "alice on a beach"  # bob's trigger is gone
    result = comfy_server.run(prompt)
    assert result.status == "error", result.describe()
    errors = result.of_type("execution_error")
    assert [e["node_type"] for e in errors] == ["IdentityTokens_ApplyIdentity"], result.describe()
    assert "'bob'" in errors[0]["exception_message"], errors[0]["exception_message"]
    assert not result.files("output")


def test_cancel_stops_training_and_saves_nothing(comfy_server: ComfyServer) -> None:
    """Interrupt after the first training step: the prompt ends interrupted long before 2000 steps, no file is saved."""
    name = "cancelled-ci"
    prompt = workflow("train_save_sample")
    prompt[TRAIN]["inputs"].update(steps=2000, seed=7)
    prompt[SAVE]["inputs"]["name"] = name
    interrupted = threading.Event()

    def on_message(message: dict[str, Any]) -> None:
        """Post /interrupt at the training node's first progress message."""
        data = message.get("data", {})
        if message.get("type") == "progress" and data.get("node") == TRAIN and not interrupted.is_set():
            interrupted.set()
            comfy_server.interrupt()

    result = comfy_server.run(prompt, timeout=240, on_message=on_message)
    assert interrupted.is_set(), f"no progress message from the training node: {result.describe()}"
    assert result.status == "interrupted", result.describe()
    stops = result.of_type("execution_interrupted")
    assert [s["node_type"] for s in stops] == ["IdentityTokens_TrainIdentityToken"], stops
    assert max(p["value"] for p in result.progress(TRAIN)) < 50, "training went on after the interrupt"
    assert not (comfy_server.embeddings_dir / f"{name}.safetensors").exists()
    assert not result.files("output")


def test_invalid_widget_value_is_rejected_before_running(comfy_server: ComfyServer) -> None:
    """An unknown preset fails /prompt's validation (status 'invalid', a node error on the training node)."""
    prompt = workflow("train_save_sample")
    prompt[TRAIN]["inputs"]["preset"] = "No such preset"
    result = comfy_server.run(prompt)
    assert result.status == "invalid" and result.prompt_id is None, result.describe()
    assert TRAIN in result.node_errors, result.node_errors
    assert "preset" in result.error and "No such preset" in result.error, result.error
