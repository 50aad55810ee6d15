"""The encoder nodes called in-process on CI's ComfyUI, under torch.inference_mode() as the executor runs them.

The CLIP_VISION adapter reads the same hidden states as transformers' CLIPVisionModel with the same weights; Encoder
Customize gives exactly core's encode_identity; its identity goes through Apply Identity, Save Identity and Train
Identity Token's init; towers, CLIPs and files that do not fit are InputErrors naming the input.
The towers are ComfyUI's own ClipVisionModel, built from a tiny JSON config with the lab tower's (random) weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.comfy_tiny import comfy_ready
from tests.conftest_comfy_tiny import TinyFactory
from tests.test_comfy_nodes import _apply, _photos, _save_and_load, _stock, _train

comfy_ready()  # 'identity_tokens', 'comfy' and 'folder_paths' importable from here on
import comfy.clip_vision  # noqa: E402
import folder_paths  # noqa: E402
import identity_tokens.nodes as pack_nodes  # noqa: E402
from identity_tokens.core.encoders.files import save_encoder  # noqa: E402
from identity_tokens.core.encoders.mapper import EncoderSpec, IdentityEncoder, encode_identity  # noqa: E402
from identity_tokens.core.encoders.vision import TransformersTower, VisionSpec, preprocess  # noqa: E402
from identity_tokens.core.errors import InputError  # noqa: E402
from identity_tokens.core.identity import Identity  # noqa: E402
from identity_tokens.core.lab import vision as lab  # noqa: E402
from identity_tokens.nodes import encoder_nodes, identity_nodes  # noqa: E402
from identity_tokens.nodes.comfy_backend import clip_widths  # noqa: E402
from identity_tokens.nodes.comfy_vision import ComfyVisionTower  # noqa: E402
from identity_tokens.nodes.encoder_nodes import EncoderCustomize, EncoderLoader  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
WIDTH, LAYERS = 64, 4  # the lab tower's sizes: 32 px, patch 4


def _vision_model(width: int = WIDTH, seed: int = 0) -> tuple[object, torch.nn.Module]:
    """(ComfyUI ClipVisionModel built from a tiny JSON config, transformers CLIPVisionModelWithProjection) holding
    the same values: random lab-tower weights loaded into ComfyUI's model (fp16 where ComfyUI keeps fp16 on the CPU),
    then ComfyUI's values copied back into transformers' model in float32."""
    from transformers import CLIPVisionModelWithProjection

    model = lab.build_tower(lab.VisionTowerSpec(hidden_size=width, projection=width), seed)
    config = model.config
    values = {
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "image_size": config.image_size, "patch_size": config.patch_size, "projection_dim": config.projection_dim,
        "hidden_act": config.hidden_act, "num_channels": 3, "model_type": "clip_vision_model", "layer_norm_eps": 1e-5,
    }  # fmt: skip
    path = Path(folder_paths.get_temp_directory()) / f"tiny_clip_vision_{width}_{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    with torch.inference_mode():  # as Load CLIP Vision runs in the executor
        clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
        missing, unexpected = clip_vision.load_sd(model.state_dict())
    assert not missing and not [k for k in unexpected if not k.endswith("position_ids")], (missing, unexpected)
    reference = CLIPVisionModelWithProjection(config).eval()
    reference.load_state_dict({k: v.float() for k, v in clip_vision.model.state_dict().items()}, strict=False)
    return clip_vision, reference


@pytest.fixture(scope="module")
def towers() -> tuple[object, TransformersTower]:
    """The module's ComfyUI tower and the transformers tower with its values."""
    clip_vision, reference = _vision_model()
    return clip_vision, TransformersTower(reference.vision_model, "reference")


def _encoder(vision: VisionSpec, widths: dict[str, int], family: str = "sd1", seed: int = 0) -> IdentityEncoder:
    """An encoder with random base rows and random (not zero) heads, so its rows depend on the photos."""
    gen = torch.Generator().manual_seed(seed)
    spec = EncoderSpec(vision=vision, widths=widths, family=family, n_tokens=2, hidden=32)
    encoder = IdentityEncoder(spec, {k: torch.randn(2, w, generator=gen) * 0.3 for k, w in widths.items()})
    with torch.no_grad():
        for head in encoder.heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.05)
    return encoder.eval()


@pytest.fixture()
def encoder_folder(tmp_path: Path) -> Iterator[Path]:
    """folder_paths' identity_encoders folder pointed at a new folder (the pack's registration restored after)."""
    folder = tmp_path / "identity_encoders"
    folder.mkdir()
    saved = folder_paths.folder_names_and_paths.get(encoder_nodes.FOLDER)
    folder_paths.folder_names_and_paths[encoder_nodes.FOLDER] = ([str(folder)], set(encoder_nodes.SUFFIXES))
    folder_paths.filename_list_cache.pop(encoder_nodes.FOLDER, None)
    try:
        yield folder
    finally:
        folder_paths.folder_names_and_paths[encoder_nodes.FOLDER] = saved
        folder_paths.filename_list_cache.pop(encoder_nodes.FOLDER, None)


def _load(name: str) -> IdentityEncoder:
    """Load Identity Encoder as the executor runs it."""
    with torch.inference_mode():
        (encoder,) = EncoderLoader().load(name)
    return encoder


def _saved_encoder(folder: Path, vision: VisionSpec, widths: dict[str, int], name: str = "tiny.safetensors",
                   family: str = "sd1") -> IdentityEncoder:
    """An encoder saved into the encoders folder, then loaded back through Load Identity Encoder."""
    save_encoder(_encoder(vision, widths, family), folder / name)
    return _load(name)


def _customize(images: list[torch.Tensor], encoder: IdentityEncoder, token: str = "<identity>",
               clip_vision: object | None = None, clip: object | None = None) -> Identity:
    """Encoder Customize as the executor runs it (INPUT_IS_LIST: every input a list)."""
    more = {"clip_vision": [clip_vision]} if clip_vision is not None else {}
    if clip is not None:
        more["clip"] = [clip]
    with torch.inference_mode():
        (identity,) = EncoderCustomize().customize(images, [encoder], [token], **more)
    return identity


def _nchw(batch: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE batch (N, H, W, 3) as core's (N, 3, H, W)."""
    return batch.movedim(-1, 1)


# --- the CLIP_VISION adapter ---------------------------------------------------------------------------------------


def test_adapter_reads_the_hidden_states_of_transformers(towers: tuple) -> None:
    clip_vision, reference = towers
    tower = ComfyVisionTower(clip_vision)
    assert tower.spec.mismatch(reference.spec) is None and tower.spec.layers == LAYERS
    assert (tower.spec.hidden_size, tower.spec.image_size, tower.spec.patch_size) == (WIDTH, 32, 4)
    assert tower.spec.mean == reference.spec.mean and tower.spec.std == reference.spec.std
    pixels = preprocess(_nchw(_photos(2, 48, width=40)), tower.spec)
    with torch.inference_mode():
        ours = tower.hidden_states(pixels, [4, 1, 2, 3, 4])
    theirs = reference.hidden_states(pixels, [4, 1, 2, 3, 4])
    for layer, got, expected in zip([4, 1, 2, 3, 4], ours, theirs):
        assert got.dtype == torch.float32 and tuple(got.shape) == (2, 1 + 8 * 8, WIDTH), layer
        torch.testing.assert_close(got, expected, **TOL)
    assert float((ours[0] - ours[3]).abs().max()) > 1e-2  # layer 4 is not layer 3: each hook caught its own layer
    assert float((ours[1] - ours[2]).abs().max()) > 1e-2
    assert not any(layer._forward_hooks for layer in tower.layers)  # the hooks are gone after the call


def test_adapter_refuses_vision_models_without_a_class_token(towers: tuple) -> None:
    clip_vision, _ = towers
    embeddings = clip_vision.model.vision_model.embeddings
    saved = embeddings.class_embedding
    embeddings.class_embedding = None  # as today's ComfyUI builds SigLIP
    try:
        with pytest.raises(InputError, match=r"^clip_vision: .*no class token"):
            ComfyVisionTower(clip_vision)
    finally:
        embeddings.class_embedding = saved

    class Dino:  # today's ComfyUI's DINOv2 has no vision_model.encoder.layers
        model, patcher = torch.nn.Linear(2, 2), None

    with pytest.raises(InputError, match=r"^clip_vision: a Linear is not a CLIP vision transformer"):
        ComfyVisionTower(Dino())


# --- Encoder Customize ---------------------------------------------------------------------------------------------


def test_encoder_customize_equals_core_encode_identity(towers: tuple, encoder_folder: Path,
                                                       comfy_tiny: TinyFactory) -> None:
    clip_vision, reference = towers
    tiny = comfy_tiny("sd1")
    encoder = _saved_encoder(encoder_folder, ComfyVisionTower(clip_vision).spec, clip_widths(tiny.clip))
    photos = _photos(3, 48, width=40, seed=1)
    identity = _customize([photos], encoder, "<ann>", clip_vision, tiny.clip)
    expected = encode_identity(encoder, reference, _nchw(photos), "<ann>")  # the standalone path, transformers' tower
    assert set(identity.rows) == {"clip_l"} and tuple(identity.rows["clip_l"].shape) == (2, 32)
    torch.testing.assert_close(identity.rows["clip_l"], expected.rows["clip_l"], **TOL)
    assert identity.metadata["token"] == "<ann>" and identity.metadata["method"] == "encoder"
    assert identity.metadata["images"] == "3" and identity.metadata["base_family"] == "sd1"
    other = _customize([_photos(1, 40, seed=7)], encoder, "<ann>", clip_vision)
    assert float((other.rows["clip_l"] - identity.rows["clip_l"]).abs().max()) > 1e-3  # the rows follow the photos
    # Collect Photos' list of photos of different sizes: one identity, the mean over every photo.
    first, second = _photos(1, 40, width=56, seed=2), _photos(1, 64, width=36, seed=3)
    together = _customize([first, second], encoder, "<ann>", clip_vision)
    apart = [encode_identity(encoder, reference, _nchw(photo)).rows["clip_l"] for photo in (first, second)]
    torch.testing.assert_close(together.rows["clip_l"], (apart[0] + apart[1]) / 2, **TOL)
    assert together.metadata["images"] == "2"


def test_lab_encoder_reads_the_shipped_lab_tower(tmp_path: Path, encoder_folder: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder = lab.save_tower(lab.build_tower(seed=3), tmp_path / "vision_tower", {"test": True})
    shipped = lab.load_tower(folder)
    assert shipped.spec.name == lab.NAME
    encoder = _saved_encoder(encoder_folder, shipped.spec, {"clip_l": 32})
    photos = _photos(2, 40, seed=4)
    monkeypatch.setattr(lab, "FOLDER", folder)
    identity = _customize([photos], encoder)  # no CLIP_VISION connected
    torch.testing.assert_close(identity.rows["clip_l"], encode_identity(encoder, shipped, _nchw(photos)).rows["clip_l"],
                               rtol=0, atol=0)
    monkeypatch.setattr(lab, "FOLDER", tmp_path / "not_installed")
    with pytest.raises(InputError, match=r"^clip_vision: .*lab vision tower 'lab-vit'.*missing"):
        _customize([photos], encoder)


def test_encoder_identity_applies_saves_and_starts_training(towers: tuple, encoder_folder: Path, embeddings: Path,
                                                            comfy_tiny: TinyFactory,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    clip_vision, _ = towers
    tiny = comfy_tiny("sd1")
    encoder = _saved_encoder(encoder_folder, ComfyVisionTower(clip_vision).spec, clip_widths(tiny.clip))
    identity = _customize([_photos(2, 48, seed=5)], encoder, "<bea>", clip_vision, tiny.clip)
    # Apply Identity uses the encoder's token as the trigger and gives what stock embedding:NAME gives for the file.
    cond, _ = _apply(tiny.clip, "a photo of <bea> smiling", identity)
    loaded = _save_and_load(identity, "tt-encoded")
    expected, _ = _stock(tiny.clip, "a photo of embedding:tt-encoded smiling")
    torch.testing.assert_close(cond, expected, **TOL)
    plain, _ = _stock(tiny.clip, "a photo of person smiling")
    assert float((cond - plain).abs().max()) > 1e-2
    torch.testing.assert_close(loaded.rows["clip_l"], identity.rows["clip_l"], rtol=0, atol=0)
    # Train Identity Token starts from the encoder's rows and moves them.
    made, trainer_class = [], identity_nodes.Trainer
    monkeypatch.setattr(identity_nodes, "Trainer", lambda *a, **k: made.append(trainer_class(*a, **k)) or made[-1])
    trained, _ = _train(tiny, [_photos(1, 64)], init=[identity])
    (trainer,) = made
    torch.testing.assert_close(trainer.init_rows["clip_l"].cpu(), identity.rows["clip_l"], rtol=0, atol=0)
    assert float((trained.rows["clip_l"] - identity.rows["clip_l"]).abs().max()) > 1e-4
    assert torch.isfinite(trained.rows["clip_l"]).all() and trained.metadata["steps"] == "2"


# --- what does not fit is refused, naming the input ----------------------------------------------------------------


def test_a_tower_of_other_sizes_is_refused(towers: tuple, encoder_folder: Path) -> None:
    clip_vision, _ = towers
    narrow, _ = _vision_model(width=48, seed=1)
    encoder = _saved_encoder(encoder_folder, ComfyVisionTower(clip_vision).spec, {"clip_l": 32})
    with pytest.raises(InputError, match=r"^clip_vision: the encoder was trained for .*width 64.*got .*width 48"):
        _customize([_photos(1, 40)], encoder, clip_vision=narrow)
    with pytest.raises(InputError, match=r"^clip_vision: the encoder reads the vision tower .*Load CLIP Vision"):
        _customize([_photos(1, 40)], encoder)  # not a lab encoder: a CLIP_VISION must be connected


def test_a_clip_of_another_family_is_refused(towers: tuple, encoder_folder: Path, comfy_tiny: TinyFactory) -> None:
    clip_vision, _ = towers
    encoder = _saved_encoder(encoder_folder, ComfyVisionTower(clip_vision).spec, clip_widths(comfy_tiny("sd1").clip))
    with pytest.raises(InputError, match=r"^clip: the encoder makes rows for text encoders \{'clip_l': 32\} \(sd1\)"):
        _customize([_photos(1, 40)], encoder, clip_vision=clip_vision, clip=comfy_tiny("sdxl").clip)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"token": "my subject"}, r"^token: 'my subject' cannot be a trigger word"),
    ({"images": []}, r"^images: got no photos"),
    ({"encoder": None}, r"^encoder: connect Load Identity Encoder"),
])  # fmt: skip
def test_other_inputs_are_checked(towers: tuple, encoder_folder: Path, kwargs: dict, message: str) -> None:
    clip_vision, _ = towers
    values = {"images": [_photos(1, 40)], "token": "<x>",
              "encoder": _saved_encoder(encoder_folder, ComfyVisionTower(clip_vision).spec, {"clip_l": 32})}
    values.update(kwargs)
    with pytest.raises(InputError, match=message):
        _customize(values["images"], values["encoder"], values["token"], clip_vision)


class _Runs:
    """A pickled object that would call os.getcwd when unpickled without the weights-only safety net."""

    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


@pytest.mark.parametrize(("name", "write", "message"), [
    ("cut.safetensors", "truncated", r"corrupt or truncated"),
    ("runs.pt", "pickle", r"refused; it asks for .*getcwd.*nothing in it was run"),
    ("runs.safetensors", "pickle", r"refused; it asks for .*getcwd.*nothing in it was run"),  # a .pt renamed
    ("weights.safetensors", "tensors", r"not a \.safetensors encoder"),  # a harmless torch.save renamed
    ("identity.safetensors", "identity", r"not an identity encoder"),
])  # fmt: skip
def test_bad_encoder_files_are_refused(towers: tuple, encoder_folder: Path, tmp_path: Path, name: str, write: str,
                                       message: str) -> None:
    clip_vision, _ = towers
    path = encoder_folder / name
    if write == "truncated":
        save_encoder(_encoder(ComfyVisionTower(clip_vision).spec, {"clip_l": 32}), tmp_path / "whole.safetensors")
        path.write_bytes((tmp_path / "whole.safetensors").read_bytes()[:500])
    elif write == "pickle":
        torch.save({"weights": _Runs()}, path)
    elif write == "tensors":
        torch.save({"base_clip_l": torch.zeros(2, 32)}, path)
    else:
        from safetensors.torch import save_file

        save_file({"clip_l": torch.zeros(2, 32)}, str(path))
    assert (name in EncoderLoader.INPUT_TYPES()["required"]["encoder_name"][0]) == name.endswith(".safetensors")
    with pytest.raises(InputError, match=rf"^encoder_name: encoder file .*{name}: .*{message}"):
        _load(name)
    with pytest.raises(InputError, match=r"^encoder_name: 'gone.safetensors' is not in models/identity_encoders"):
        _load("gone.safetensors")


# --- Load Identity Encoder's folder --------------------------------------------------------------------------------


def test_loader_lists_the_encoders_folder(towers: tuple, encoder_folder: Path) -> None:
    clip_vision, _ = towers
    spec = ComfyVisionTower(clip_vision).spec
    saved = _encoder(spec, {"clip_l": 32})
    save_encoder(saved, encoder_folder / "b.safetensors")
    (encoder_folder / "people").mkdir()
    save_encoder(_encoder(spec, {"clip_l": 32}, seed=1), encoder_folder / "people" / "a.safetensors")
    (encoder_folder / "c.pt").write_bytes(b"not listed")
    (encoder_folder / "notes.txt").write_text("not listed")
    options = EncoderLoader.INPUT_TYPES()["required"]["encoder_name"]
    assert options[0] == ["b.safetensors", os.path.join("people", "a.safetensors")] and options[1]["tooltip"]
    loaded = _load("b.safetensors")
    assert isinstance(loaded, IdentityEncoder) and loaded.spec == saved.spec and not loaded.training
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    before = EncoderLoader.IS_CHANGED("b.safetensors")
    os.utime(encoder_folder / "b.safetensors", (before + 5, before + 5))
    assert EncoderLoader.IS_CHANGED("b.safetensors") == before + 5


def test_the_pack_registers_models_identity_encoders(monkeypatch: pytest.MonkeyPatch) -> None:
    registered = folder_paths.folder_names_and_paths[encoder_nodes.FOLDER]
    assert registered[0][0] == os.path.join(folder_paths.models_dir, "identity_encoders")
    assert registered[1] == {".safetensors"}
    # A folder a user's extra_model_paths.yaml added first (ComfyUI lists every file of such a folder) is kept.
    extra = os.path.join(folder_paths.models_dir, "elsewhere")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, encoder_nodes.FOLDER, ([extra], set()))
    encoder_nodes.register_folder()
    assert folder_paths.folder_names_and_paths[encoder_nodes.FOLDER] == (
        [registered[0][0], extra], {".safetensors"}
    )


def test_nodes_registered_with_tooltips() -> None:
    for node_id, cls in (("IdentityTokens_EncoderLoader", EncoderLoader),
                         ("IdentityTokens_EncoderCustomize", EncoderCustomize)):
        assert pack_nodes.NODE_CLASS_MAPPINGS[node_id] is cls and cls.CATEGORY == "identity_tokens"
        assert cls.DESCRIPTION and all(cls.OUTPUT_TOOLTIPS)
        inputs = cls.INPUT_TYPES()
        for spec in [*inputs["required"].values(), *inputs.get("optional", {}).values()]:
            assert spec[1]["tooltip"].strip()
    assert EncoderCustomize.INPUT_IS_LIST and EncoderCustomize.RETURN_TYPES == ("IDENTITY",)
    assert list(EncoderCustomize.INPUT_TYPES()["optional"]) == ["clip_vision", "clip"]
