"""The SeFi-IDE-style nodes called in-process on CI's ComfyUI, under torch.inference_mode() as the executor runs them.

Face Attention Loss checks its setting and hands it to Train Identity Token, which refuses a missing, empty or
mis-sized face mask and bad stage counts before training, and with per_stage on returns a per-stage identity, a loss
curve and an attention heatmap. Save Identity writes such an identity as NAME.sefi.safetensors, Load Identity reads it
back, Apply Identity needs the MODEL for it (and patches a clone), Export Plain Identity makes a lossy plain one.
All on the tiny ComfyUI SD1 model of tests/comfy_tiny.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.comfy_tiny import TinyComfy, comfy_ready
from tests.conftest_comfy_tiny import TinyFactory

comfy_ready()  # 'identity_tokens', 'comfy' and 'folder_paths' importable from here on
import comfy.model_patcher  # noqa: E402
from identity_tokens.core.errors import InputError  # noqa: E402
from identity_tokens.core.identity import Identity  # noqa: E402
from identity_tokens.core.sefi import FaceLoss  # noqa: E402
from identity_tokens.core.stages import StageSchedule  # noqa: E402
from identity_tokens.core.trainer import Trainer, TrainResult  # noqa: E402
from identity_tokens.nodes import identity_nodes  # noqa: E402
from identity_tokens.nodes.face_nodes import FaceAttentionLoss, FaceLossInput  # noqa: E402
from identity_tokens.nodes.identity_nodes import (  # noqa: E402
    ApplyIdentity,
    ExportPlainIdentity,
    LoadIdentity,
    SaveIdentity,
    TrainIdentityToken,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}
NAME = "tt-sefi-alice"
STAGES = 2
MIDDLE = STAGES // 2


# --- helpers: the nodes as the executor calls them --------------------------------------------------------------


def _face_loss(mode: str = "mask", weight: float = 1.0, layers: str = "default", word: str = "person",
               mask: list[torch.Tensor] | None = None) -> FaceLossInput:
    """Face Attention Loss (INPUT_IS_LIST: every input a list) in inference mode."""
    with torch.inference_mode():
        (out,) = FaceAttentionLoss().make([mode], [weight], [layers], [word], mask)
    return out


def _photos(count: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE batch (N, H, W, 3) in [0, 1] with some structure."""
    gen = torch.Generator().manual_seed(seed)
    across, down = torch.linspace(0, 1, size).view(1, -1), torch.linspace(0, 1, size).view(-1, 1)
    base = torch.stack([across.expand(size, size), down.expand(size, size), 1 - across.expand(size, size)], -1)
    return (base.unsqueeze(0) * 0.7 + 0.3 * torch.rand(count, size, size, 3, generator=gen)).clamp(0, 1)


def _square_masks(count: int = 2, size: int = 64) -> torch.Tensor:
    """A ComfyUI MASK batch (N, H, W): a 'face' square in the upper middle of each photo."""
    masks = torch.zeros(count, size, size)
    masks[:, size // 8 : size // 8 + size // 2, size // 4 : size // 4 + size // 2] = 1.0
    return masks


def _train(tiny: TinyComfy, images: list[torch.Tensor], **overrides: object) -> tuple:
    """Train Identity Token (INPUT_IS_LIST: every input a list) in inference mode; its three outputs."""
    values: dict[str, object] = {
        "model": tiny.patcher, "clip": tiny.clip, "vae": tiny.vae, "preset": "Cross-Init fast", "steps": 2,
        "learning_rate": 0.0, "batch_size": 1, "reg_weight": -1.0, "seed": 0, "resolution": 64,
    }
    values.update(overrides)
    lists = {key: value if isinstance(value, list) else [value] for key, value in values.items()}
    with torch.inference_mode():
        return TrainIdentityToken().train(images=images, **lists)["result"]


def _apply(clip: object, text: str, identity: Identity, **more: object) -> tuple[torch.Tensor, object]:
    """Apply Identity in inference mode: (the cond tensor of its single CONDITIONING entry, its MODEL output)."""
    with torch.inference_mode():
        conditioning, model = ApplyIdentity().apply(clip, text, identity, "", **more)
    assert isinstance(conditioning, list) and len(conditioning) == 1
    return conditioning[0][0], model


def _attn2_patches(patcher: object) -> list:
    """The attn2_patch list a MODEL carries (empty when it has none)."""
    return list(patcher.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", []))


def _is_picture(image: torch.Tensor, min_side: int) -> None:
    """A ComfyUI IMAGE batch of one drawn picture: (1, H, W, 3) floats in [0, 1], both sides over min_side."""
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3, tuple(image.shape)
    assert image.dtype == torch.float32
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert image.shape[1] > min_side and image.shape[2] > min_side, tuple(image.shape)
    assert float(image.std()) > 0.01  # drawn, not blank


class _Stop(Exception):
    """Raised by a stand-in trainer once it has seen what the node gives it."""


@pytest.fixture()
def made(monkeypatch: pytest.MonkeyPatch) -> list[Trainer]:
    """Every Trainer the training node manages to construct."""
    trainers: list[Trainer] = []

    class Spy(Trainer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(identity_nodes, "Trainer", Spy)
    return trainers


@pytest.fixture()
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the node encoded its photos through the VAE (the first costly step of training)."""
    calls: list[int] = []
    original = identity_nodes.encode_training_latents

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(identity_nodes, "encode_training_latents", counting)
    return calls


@pytest.fixture(scope="module")
def staged_run(comfy_tiny: TinyFactory) -> dict[str, object]:
    """One short per-stage run with a mask-mode face loss through the node: its outputs and the trainer it used."""
    tiny = comfy_tiny("sd1")
    trainers: list[Trainer] = []

    class Spy(Trainer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.face_masks_given = kwargs.get("face_masks")
            trainers.append(self)

        def run(self, *args: object, **kwargs: object) -> TrainResult:
            self.result = super().run(*args, **kwargs)
            return self.result

    face = _face_loss("mask", weight=1.0, mask=[_square_masks(2)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(identity_nodes, "Trainer", Spy)
        identity, curve, attention = _train(tiny, [_photos(2)], face_loss=[face], per_stage=[True], stages=[STAGES],
                                            steps=3, batch_size=2, learning_rate=0.05)
    (trainer,) = trainers
    return {"tiny": tiny, "identity": identity, "curve": curve, "attention": attention, "trainer": trainer}


# --- Face Attention Loss --------------------------------------------------------------------------------------


def test_face_attention_loss_hands_on_its_setting_and_masks() -> None:
    masks = _square_masks(2)
    out = _face_loss("reference", weight=0.25, layers="all", word="  man ", mask=[masks])
    assert isinstance(out, FaceLossInput)
    assert out.setting == FaceLoss("reference", weight=0.25, layers="all", reference_word="man")
    assert len(out.masks) == 1 and out.masks[0] is masks
    assert _face_loss().masks == ()  # no mask connected


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"weight": -1.0}, r"^weight: got -1\.0; use a number of 0 or more"),
        ({"weight": math.nan}, r"^weight: got nan; use a number of 0 or more"),
        ({"mode": "masks"}, r"^mode: unknown mode 'masks'; choose mask or reference"),
        ({"mode": "reference", "word": ""}, r"^reference_word: got ''; give one class word"),
        ({"mode": "reference", "word": "   "}, r"^reference_word: got ''; give one class word"),
        ({"layers": "some"}, r"^layers: unknown 'some'"),
    ],
)
def test_face_attention_loss_refuses_bad_settings_naming_the_input(inputs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        _face_loss(**inputs)


# --- Train Identity Token refuses what the face loss and the stages cannot use, before training ------------------


def test_a_face_mask_of_another_size_is_refused(comfy_tiny: TinyFactory, made: list, encoded: list) -> None:
    face = _face_loss("mask", mask=[torch.ones(2, 32, 32)])
    with pytest.raises(InputError, match=r"^face_loss: Face Attention Loss's mask: mask 1 is 32x32 but photo 1 is 64x64; "):
        _train(comfy_tiny("sd1"), [_photos(2, 64)], face_loss=[face])
    assert made == [] and encoded == []


def test_an_all_zero_face_mask_is_refused(comfy_tiny: TinyFactory, made: list, encoded: list) -> None:
    masks = _square_masks(2)
    masks[1] = 0.0
    with pytest.raises(InputError, match=r"^face_loss: Face Attention Loss's mask 2 is empty \(all zero\), so it shows no face"):
        _train(comfy_tiny("sd1"), [_photos(2)], face_loss=[_face_loss("mask", mask=[masks])])
    # Train Identity Token's own mask serves the face loss when Face Attention Loss has none: refused the same way.
    with pytest.raises(InputError, match=r"^mask: .*empty \(all zero\)"):
        _train(comfy_tiny("sd1"), [_photos(2)], face_loss=[_face_loss("mask")], mask=[masks])
    assert made == [] and encoded == []


def test_mask_mode_without_any_mask_is_refused_before_training(comfy_tiny: TinyFactory, made: list,
                                                               encoded: list) -> None:
    with pytest.raises(InputError, match=r"^mask: the face loss's mask mode needs a face mask per photo; .*reference"):
        _train(comfy_tiny("sd1"), [_photos(2)], face_loss=[_face_loss("mask")])
    assert made == [] and encoded == []  # neither the trainer nor even the VAE encode ran


def test_the_face_loss_gets_its_own_mask_or_train_identity_tokens(comfy_tiny: TinyFactory,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_trainer(model: object, images: torch.Tensor, config: object, **kwargs: object) -> None:
        seen.update(config=config, masks=kwargs.get("masks"), face_masks=kwargs.get("face_masks"))
        raise _Stop

    monkeypatch.setattr(identity_nodes, "Trainer", fake_trainer)
    tiny = comfy_tiny("sd1")
    face_mask, train_mask = _square_masks(2), torch.ones(1, 64, 64)
    train_mask[:, 40:] = 0.0
    with pytest.raises(_Stop):
        _train(tiny, [_photos(2)], face_loss=[_face_loss("mask", weight=0.5, mask=[face_mask])], mask=[train_mask])
    assert seen["config"].face_loss == FaceLoss("mask", weight=0.5)
    torch.testing.assert_close(seen["face_masks"][:, 0], face_mask)
    torch.testing.assert_close(seen["masks"][:, 0], train_mask.expand(2, -1, -1))
    with pytest.raises(_Stop):  # without a mask of its own, the face loss uses Train Identity Token's
        _train(tiny, [_photos(2)], face_loss=[_face_loss("mask")], mask=[train_mask])
    torch.testing.assert_close(seen["face_masks"][:, 0], train_mask.expand(2, -1, -1))
    with pytest.raises(_Stop):  # per_stage off: no stages, whatever the stages widget says
        _train(tiny, [_photos(2)], per_stage=[False], stages=[0])
    assert seen["config"].stages is None and seen["config"].face_loss is None and seen["face_masks"] is None


@pytest.mark.parametrize(
    ("stages", "steps", "message"),
    [(0, 2, r"^stages: got 0; use 1 or more stages"), (3, 2, r"^stages: 3 stages but only 2 steps")],
)
def test_bad_stage_counts_are_refused(comfy_tiny: TinyFactory, made: list, stages: int, steps: int,
                                      message: str) -> None:
    with pytest.raises(InputError, match=message):
        _train(comfy_tiny("sd1"), [_photos(2)], per_stage=[True], stages=[stages], steps=steps)
    assert made == []


# --- a short per-stage run with a mask-mode face loss ---------------------------------------------------------


def test_per_stage_run_gives_a_per_stage_identity_a_curve_and_a_heatmap(staged_run: dict) -> None:
    identity, trainer = staged_run["identity"], staged_run["trainer"]
    assert isinstance(identity, Identity) and identity.is_staged
    assert identity.schedule == StageSchedule.uniform(STAGES) and identity.metadata["num_stages"] == str(STAGES)
    stages = identity.stages["clip_l"]
    assert set(identity.stages) == {"clip_l"} and tuple(stages.shape) == (2, STAGES, 2, 32)
    assert torch.isfinite(stages).all()
    assert torch.equal(identity.rows["clip_l"], stages[1, MIDDLE])  # a plain prompt carries the middle values
    assert identity.metadata["face_loss"] == "mask" and identity.metadata["steps"] == "3"
    # Training moved the rows, and the keys and values apart (the per-stage start has keys = values).
    start = trainer.init_rows["clip_l"].cpu()
    assert float((stages - start).abs().max()) > 1e-3
    assert not torch.allclose(stages[0], stages[1])
    # The face loss got Face Attention Loss's masks, and the heatmap reports the share inside them.
    torch.testing.assert_close(trainer.face_masks_given[:, 0], _square_masks(2))
    maps = trainer.result.attention
    assert maps is not None and maps.inside_start is not None and maps.inside_end is not None
    assert len(trainer.result.losses) == 3 and all(math.isfinite(v) for v in trainer.result.losses)
    _is_picture(staged_run["curve"], 16)
    _is_picture(staged_run["attention"], 64)  # a grid of the 64 px photos with their maps: larger than a photo


# --- Save / Load / Apply / Export of a per-stage identity -----------------------------------------------------


def test_save_writes_a_sefi_file_that_load_reads_back(staged_run: dict, embeddings: Path) -> None:
    identity = staged_run["identity"]
    with torch.inference_mode():
        result = SaveIdentity().save(identity, NAME, False)
    path = embeddings / f"{NAME}.sefi.safetensors"
    (text,) = result["ui"]["text"]
    assert text.startswith(f"{path} (per-stage: use it through Load Identity and Apply Identity's MODEL"), text
    assert path.is_file() and not (embeddings / f"{NAME}.safetensors").exists()
    assert sorted(p.name for p in embeddings.iterdir()) == [path.name]
    with torch.inference_mode(), pytest.raises(InputError, match=r"^name: .*already exists"):
        SaveIdentity().save(identity, f"{NAME}.sefi", False)  # NAME.sefi names the same file
    assert f"{NAME}.sefi.safetensors" in LoadIdentity.INPUT_TYPES()["required"]["name"][0]
    with torch.inference_mode():
        (loaded,) = LoadIdentity().load(f"{NAME}.sefi.safetensors")
    assert loaded.is_staged and loaded.metadata["token"] == NAME  # the trigger word has no ".sefi"
    assert loaded.schedule == identity.schedule
    for key, stages in identity.stages.items():
        torch.testing.assert_close(loaded.stages[key], stages, rtol=0, atol=0)
        torch.testing.assert_close(loaded.rows[key], identity.rows[key], rtol=0, atol=0)


def _loaded(staged_run: dict, embeddings: Path) -> Identity:
    """The run's identity through Save Identity and Load Identity, named NAME."""
    with torch.inference_mode():
        SaveIdentity().save(staged_run["identity"], NAME, False)
        (loaded,) = LoadIdentity().load(f"{NAME}.sefi.safetensors")
    return loaded


def test_apply_needs_the_model_for_a_per_stage_identity(staged_run: dict, embeddings: Path) -> None:
    tiny, loaded = staged_run["tiny"], _loaded(staged_run, embeddings)
    with pytest.raises(InputError, match=r"^identity: it is a per-stage identity.*connect your MODEL to Apply "
                                         r"Identity's model input"):
        _apply(tiny.clip, f"a photo of {NAME}", loaded)


def test_apply_with_the_model_patches_a_clone(staged_run: dict, embeddings: Path) -> None:
    tiny, loaded = staged_run["tiny"], _loaded(staged_run, embeddings)
    before = _attn2_patches(tiny.patcher)
    text = f"a photo of {NAME} smiling"
    cond, model = _apply(tiny.clip, text, loaded, model=tiny.patcher)
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and model is not tiny.patcher
    assert model.model is tiny.patcher.model  # a clone shares the weights
    patches = _attn2_patches(model)
    assert len(patches) == len(before) + 1 and patches[:-1] == before
    assert _attn2_patches(tiny.patcher) == before  # the connected MODEL is left as it was
    # The CONDITIONING is the prompt with the middle stage's value rows, as a plain identity of them gives it.
    stages = loaded.stages

    def plain(kind: int, stage: int) -> torch.Tensor:
        rows = {key: value[kind, stage].clone() for key, value in stages.items()}
        return _apply(tiny.clip, text, Identity(rows, {"token": NAME}))[0]

    torch.testing.assert_close(cond, plain(1, MIDDLE), **TOL)
    assert float((plain(0, MIDDLE) - cond).abs().max()) > 1e-4  # not the middle stage's keys
    assert float((plain(1, 0) - cond).abs().max()) > 1e-4  # not another stage's values


def test_apply_with_a_plain_identity_passes_the_model_through(staged_run: dict) -> None:
    tiny = staged_run["tiny"]
    before = _attn2_patches(tiny.patcher)
    gen = torch.Generator().manual_seed(3)
    plain = Identity({"clip_l": torch.randn(2, 32, generator=gen) * 0.5}, {"token": "<bob>"})
    cond, model = _apply(tiny.clip, "a photo of <bob>", plain, model=tiny.patcher)
    assert model is tiny.patcher and _attn2_patches(model) == before
    alone, no_model = _apply(tiny.clip, "a photo of <bob>", plain)
    assert no_model is None
    torch.testing.assert_close(alone, cond, rtol=0, atol=0)


def test_export_plain_identity_keeps_the_middle_values_and_says_lossy(staged_run: dict, embeddings: Path) -> None:
    identity = staged_run["identity"]
    with torch.inference_mode():
        (plain,) = ExportPlainIdentity().export(identity)
    assert isinstance(plain, Identity) and not plain.is_staged and plain.stages is None
    assert plain.metadata["lossy"] == "true"
    assert not {"stage_bounds", "num_stages", "stage_rule"} & set(plain.metadata)
    for key, stages in identity.stages.items():
        torch.testing.assert_close(plain.rows[key], stages[1, MIDDLE], rtol=0, atol=0)
    with torch.inference_mode():  # a plain identity is saved as a stock embedding:NAME file
        SaveIdentity().save(plain, NAME, False)
    assert sorted(p.name for p in embeddings.iterdir()) == [f"{NAME}.safetensors"]
    with torch.inference_mode(), pytest.raises(InputError, match=r"^plain export: the identity is already plain"):
        ExportPlainIdentity().export(plain)
