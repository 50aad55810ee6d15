"""The pack's node classes called in-process on CI's ComfyUI, under torch.inference_mode() as the executor runs them.

Apply Identity must give exactly what stock CLIPTextEncode gives for `embedding:NAME` of the saved file; user mistakes
are InputErrors naming the input; Cancel raises ComfyUI's interrupt; training leaves the MODEL's values unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.comfy_tiny import TinyComfy, comfy_ready, unet_output
from tests.conftest_comfy_tiny import TinyFactory

comfy_ready()  # 'identity_tokens', 'comfy' and 'folder_paths' importable from here on
import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.utils  # noqa: E402
from identity_tokens.core.errors import InputError  # noqa: E402
from identity_tokens.core.identity import Identity  # noqa: E402
from identity_tokens.core.trainer import Trainer, TrainResult, preset_config  # noqa: E402
from identity_tokens.nodes import identity_nodes  # noqa: E402
from identity_tokens.nodes.comfy_backend import clip_encoders  # noqa: E402
from identity_tokens.nodes.conditioning import NAME_PREFIX  # noqa: E402
from identity_tokens.nodes.identity_nodes import (  # noqa: E402
    ApplyIdentity,
    CollectPhotos,
    CrossInitEmbed,
    LoadIdentity,
    SaveIdentity,
    TrainIdentityToken,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _identity(tiny: TinyComfy, n: int = 2, seed: int = 0, token: str = "<identity>") -> Identity:
    """An identity with random rows for every encoder of the tiny model, at CLIP token-embedding scale."""
    gen = torch.Generator().manual_seed(seed)
    rows = {enc.key: torch.randn(n, enc.width, generator=gen) * 0.5 for enc in tiny.model.encoders}
    return Identity(rows, {"token": token, "base_family": tiny.family})


def _stock(clip: object, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What stock CLIPTextEncode computes for text (embedding:NAME read from the embeddings folders)."""
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


def _apply(clip: object, text: str, identity: Identity, trigger: str = "", **more: object) -> tuple[torch.Tensor, ...]:
    """Run the Apply Identity node as the executor would; return (cond, pooled) of its single CONDITIONING entry."""
    with torch.inference_mode():
        conditioning, _ = ApplyIdentity().apply(clip, text, identity, trigger, **more)
    assert isinstance(conditioning, list) and len(conditioning) == 1
    cond, extra = conditioning[0]
    return cond, extra["pooled_output"]


def _save_and_load(identity: Identity, name: str) -> Identity:
    """Save Identity then Load Identity, as a user would between two workflows."""
    with torch.inference_mode():
        result = SaveIdentity().save(identity, name, False)
        assert Path(result["ui"]["text"][0]).name == f"{name}.safetensors"
        assert f"{name}.safetensors" in LoadIdentity.INPUT_TYPES()["required"]["name"][0]
        (loaded,) = LoadIdentity().load(f"{name}.safetensors")
    return loaded


def _stock_found_embedding(clip: object, text: str) -> bool:
    """Whether ComfyUI's tokenizer put embedding vectors (tensors) into the tokens of text."""
    tokens = clip.tokenize(text)
    return all(any(isinstance(tok, torch.Tensor) for chunk in chunks for tok, _ in chunk) for chunks in tokens.values())


# --- Apply Identity equals stock embedding:NAME ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_apply_identity_equals_stock_embedding(comfy_tiny: TinyFactory, embeddings: Path, family: str) -> None:
    tiny = comfy_tiny(family)
    name = f"tt-alice-{family}"
    loaded = _save_and_load(_identity(tiny, n=2, seed=1), name)
    assert loaded.metadata["token"] == name
    assert _stock_found_embedding(tiny.clip, f"a photo of embedding:{name} smiling")
    cases = [
        (f"a photo of {name} smiling", f"a photo of embedding:{name} smiling"),
        (f"a photo of ({name}:1.2) smiling", f"a photo of (embedding:{name}:1.2) smiling"),
    ]
    results = []
    for ours, stock in cases:
        cond, pooled = _apply(tiny.clip, ours, loaded)
        expected, expected_pooled = _stock(tiny.clip, stock)
        torch.testing.assert_close(cond, expected, **TOL)
        torch.testing.assert_close(pooled, expected_pooled, **TOL)
        results.append(cond)
    plain, _ = _stock(tiny.clip, "a photo of person smiling")
    assert float((results[0] - plain).abs().max()) > 1e-2  # the identity really is in the conditioning
    assert float((results[1] - results[0]).abs().max()) > 1e-3  # and the weight really is applied
    # An explicit trigger word works the same as the file name.
    cond, _ = _apply(tiny.clip, "a photo of <alice> smiling", loaded, "<alice>")
    torch.testing.assert_close(cond, results[0], **TOL)


def test_apply_identity_with_two_identities(comfy_tiny: TinyFactory, embeddings: Path) -> None:
    tiny = comfy_tiny("sd1")
    bob = _save_and_load(_identity(tiny, n=1, seed=2), "tt-bob")
    carol = _save_and_load(_identity(tiny, n=3, seed=3), "tt-carol")
    cond, pooled = _apply(tiny.clip, "tt-bob and tt-carol at the beach", bob, "", identity_2=carol, trigger_2="")
    expected, expected_pooled = _stock(tiny.clip, "embedding:tt-bob and embedding:tt-carol at the beach")
    torch.testing.assert_close(cond, expected, **TOL)
    torch.testing.assert_close(pooled, expected_pooled, **TOL)
    swapped, _ = _apply(tiny.clip, "tt-carol and tt-bob at the beach", bob, "", identity_2=carol, trigger_2="")
    assert float((swapped - cond).abs().max()) > 1e-2


# --- user mistakes are InputErrors that name the input ---------------------------------------------------------


def _train(tiny: TinyComfy, images: list[torch.Tensor], **overrides: object) -> tuple:
    """Call Train Identity Token as the executor does (INPUT_IS_LIST: every input a list) in inference mode."""
    values: dict[str, object] = {
        "model": tiny.patcher, "clip": tiny.clip, "vae": tiny.vae, "preset": "Cross-Init fast", "steps": 2,
        "learning_rate": 0.0, "batch_size": 1, "reg_weight": -1.0, "seed": 0, "resolution": 64,
    }
    values.update(overrides)
    lists = {key: value if isinstance(value, list) else [value] for key, value in values.items()}
    with torch.inference_mode():
        output = TrainIdentityToken().train(images=images, **lists)
    _train_output.clear()
    _train_output.update(output)
    identity, curve, _attention = output["result"]
    return identity, curve


_train_output: dict = {}  # the last _train call's whole output (ui and result)


def _photos(count: int = 2, size: int = 64, seed: int = 0, width: int | None = None) -> torch.Tensor:
    """A ComfyUI IMAGE batch (N, H, W, 3) in [0, 1] with some structure; size is the height (and width unless given)."""
    height, width = size, width or size
    gen = torch.Generator().manual_seed(seed)
    across, down = torch.linspace(0, 1, width).view(1, -1), torch.linspace(0, 1, height).view(-1, 1)
    base = torch.stack([across.expand(height, width), down.expand(height, width), 1 - across.expand(height, width)], -1)
    return (base.unsqueeze(0) * 0.7 + 0.3 * torch.rand(count, height, width, 3, generator=gen)).clamp(0, 1)


@pytest.fixture()
def trainer_spy(monkeypatch: pytest.MonkeyPatch) -> list[Trainer]:
    """Every Trainer the training node makes, kept with its TrainResult (spy.result) for checks on losses and rows."""
    made: list[Trainer] = []

    class Spy(Trainer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.masks = kwargs.get("masks")
            self.pixels = args[1]
            made.append(self)

        def run(self, *args: object, **kwargs: object) -> TrainResult:
            self.result = super().run(*args, **kwargs)
            return self.result

    monkeypatch.setattr(identity_nodes, "Trainer", Spy)
    return made


def test_train_refuses_unsupported_model(comfy_tiny: TinyFactory, embeddings: Path) -> None:
    tiny = comfy_tiny("sd1")
    video = comfy.model_base.SVD_img2vid.__new__(comfy.model_base.SVD_img2vid)  # a MODEL of another family
    torch.nn.Module.__init__(video)
    video.diffusion_model = torch.nn.Linear(2, 2)  # just enough for ComfyUI to load it
    video.diffusion_model.dtype = torch.float32
    video.model_type = comfy.model_base.ModelType.V_PREDICTION_EDM
    device = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(video, load_device=device, offload_device=device)
    clip_params = list(tiny.clip.cond_stage_model.parameters())
    with pytest.raises(InputError, match=r"^model: "):
        _train(tiny, [_photos()], model=patcher)
    # Refused before any work: the CLIP's weights were not swapped for training copies.
    assert all(a is b for a, b in zip(clip_params, tiny.clip.cond_stage_model.parameters()))


def test_train_refuses_mask_of_another_size(comfy_tiny: TinyFactory, embeddings: Path) -> None:
    with pytest.raises(InputError, match=r"^mask: mask 1 is 32x32 but photo 1 is 64x64; "):
        _train(comfy_tiny("sd1"), [_photos(2, 64)], mask=[torch.ones(2, 32, 32)])
    with pytest.raises(InputError, match=r"^mask: got 2 masks for 3 photos; "):
        _train(comfy_tiny("sd1"), [_photos(1, 64), _photos(2, 40, width=72)], mask=[torch.ones(2, 64, 64)])
    with pytest.raises(InputError, match=r"^mask: the one mask is 64x64 but photo 2 is 72x40; "):
        _train(comfy_tiny("sd1"), [_photos(1, 64), _photos(1, 40, width=72)], mask=[torch.ones(1, 64, 64)])


def test_apply_refuses_prompt_without_trigger(comfy_tiny: TinyFactory) -> None:
    tiny = comfy_tiny("sd1")
    with pytest.raises(InputError, match=r"^text: .*<alice>"):
        _apply(tiny.clip, "a photo of a man", _identity(tiny), "<alice>")


def test_apply_refuses_sd1_identity_on_sdxl_clip(comfy_tiny: TinyFactory) -> None:
    sd1_identity = _identity(comfy_tiny("sd1"))
    with pytest.raises(InputError, match=r"^identity: "):
        _apply(comfy_tiny("sdxl").clip, "a photo of <identity>", sd1_identity)


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", "x/../../y"])
def test_save_refuses_bad_names(comfy_tiny: TinyFactory, embeddings: Path, name: str) -> None:
    with torch.inference_mode(), pytest.raises(InputError, match=r"^name: "):
        SaveIdentity().save(_identity(comfy_tiny("sd1")), name, False)
    assert list(embeddings.parent.rglob("x.safetensors")) == []
    assert list(embeddings.iterdir()) == []


def test_save_keeps_an_existing_file_unless_overwrite(comfy_tiny: TinyFactory, embeddings: Path) -> None:
    tiny = comfy_tiny("sd1")
    _save_and_load(_identity(tiny, seed=1), "tt-existing")
    path = embeddings / "tt-existing.safetensors"
    before = path.read_bytes()
    with torch.inference_mode(), pytest.raises(InputError, match=r"^name: .*overwrite"):
        SaveIdentity().save(_identity(tiny, seed=2), "tt-existing", False)
    assert path.read_bytes() == before
    with torch.inference_mode():
        SaveIdentity().save(_identity(tiny, seed=2), "tt-existing", True)
    assert path.read_bytes() != before


# --- training ---------------------------------------------------------------------------------------------------


@pytest.fixture()
def progress_hook() -> Iterator[Callable[[Callable[[int, int], None]], None]]:
    """install(fn): route ComfyUI's progress-bar updates to fn(value, total); restores the hook and the interrupt flag."""
    saved = comfy.utils.PROGRESS_BAR_HOOK

    def install(fn: Callable[[int, int], None]) -> None:
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None: fn(value, total))

    try:
        yield install
    finally:
        comfy.utils.set_progress_bar_global_hook(saved)
        comfy.model_management.interrupt_current_processing(False)


def test_cancel_interrupts_training(comfy_tiny: TinyFactory, embeddings: Path, progress_hook: Callable) -> None:
    seen: list[tuple[int, int]] = []

    def cancel_after_first_step(value: int, total: int) -> None:
        seen.append((value, total))
        if value >= 1:
            comfy.model_management.interrupt_current_processing(True)  # what POST /interrupt does

    progress_hook(cancel_after_first_step)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _train(comfy_tiny("sd1"), [_photos()], steps=6)
    assert seen == [(1, 6)]  # it stopped before a second step
    assert list(embeddings.iterdir()) == []


@pytest.fixture()
def sent_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """The websocket events the training node sends, through a stand-in for ComfyUI's PromptServer."""
    events: list[tuple[str, dict]] = []

    class Server:
        client_id = "test"

        def send_sync(self, event: str, data: dict, client: str | None) -> None:
            events.append((event, dict(data)))

    monkeypatch.setattr(identity_nodes, "_prompt_server", Server)
    return events


def test_the_live_view_hears_progress_and_how_the_run_ended(comfy_tiny: TinyFactory, embeddings: Path,
                                                             sent_events: list, progress_hook: Callable) -> None:
    _train(comfy_tiny("sd1"), [_photos()], steps=2, unique_id=["7"])
    names = [name for name, _ in sent_events]
    shown = _train_output["ui"]["images"]  # the attention heatmap, drawn on the node by the front-end
    assert len(shown) == 1 and shown[0]["type"] == "temp"
    import folder_paths

    with Image.open(Path(folder_paths.get_temp_directory()) / shown[0]["filename"]) as picture:
        assert picture.size[0] > 64
    assert names == ["identity_tokens.status"] + ["identity_tokens.progress"] * 2 + ["identity_tokens.status"]
    start, first, second, end = (data for _, data in sent_events)
    assert start == {"node": "7", "state": "running", "step": 0, "total": 2}
    assert (first["step"], second["step"], first["total"]) == (1, 2, 2) and math.isfinite(first["loss"])
    assert 0 <= first["elapsed"] <= second["elapsed"] <= end["elapsed"]
    assert (end["state"], end["reason"], end["step"]) == ("finished", "", 2)
    sent_events.clear()
    progress_hook(lambda value, total: comfy.model_management.interrupt_current_processing(True))
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _train(comfy_tiny("sd1"), [_photos()], steps=6, unique_id=["7"])
    assert sent_events[-1][1] | {"elapsed": 0} == {"node": "7", "state": "cancelled", "reason": "Cancel pressed",
                                                   "step": 1, "total": 6, "elapsed": 0}


def test_the_stopped_state_names_the_error(comfy_tiny: TinyFactory, embeddings: Path, sent_events: list,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object, **_kwargs: object) -> TrainResult:
        raise RuntimeError("the GPU fell over")

    monkeypatch.setattr(Trainer, "run", fail)
    with pytest.raises(RuntimeError, match="fell over"):
        _train(comfy_tiny("sd1"), [_photos()], steps=2, unique_id=["7"])
    assert sent_events[-1][1]["state"] == "stopped" and sent_events[-1][1]["reason"] == "RuntimeError: the GPU fell over"


def test_the_preset_input_lists_every_presets_widget_values() -> None:
    """What the front-end fills the widgets with is what the trainer would use for 0 / -1."""
    options = TrainIdentityToken.INPUT_TYPES()["required"]["preset"][1]
    assert set(options["presets"]) == set(options_names := TrainIdentityToken.INPUT_TYPES()["required"]["preset"][0])
    for label in options_names:
        config = preset_config(identity_nodes.PRESETS[label])
        assert options["presets"][label] == {"steps": config.steps, "learning_rate": config.learning_rate,
                                             "batch_size": config.batch_size, "reg_weight": config.reg_weight}
    assert options["presets"]["Textual Inversion"]["steps"] == 5000 and options["presets"]["Cross-Init"]["steps"] == 320


def test_train_identity_token_short_run(fresh_comfy_tiny: TinyFactory, embeddings: Path,
                                        progress_hook: Callable) -> None:
    tiny = fresh_comfy_tiny("sd1")
    seen: list[tuple[int, int]] = []
    progress_hook(lambda value, total: seen.append((value, total)))
    gen = torch.Generator().manual_seed(3)
    x_t, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    t = torch.tensor([500])
    before = unet_output(tiny, x_t, t, context)
    cond_before, _ = _stock(tiny.clip, "a photo of a person")
    with torch.inference_mode():
        (init,) = CrossInitEmbed().make(tiny.clip, "plain word", 2, "person")
    identity, curve = _train(tiny, [_photos(2, 80)], init=[init])  # 80 px photos resized to 64
    assert seen == [(1, 2), (2, 2)]
    assert isinstance(identity, Identity) and set(identity.rows) == {"clip_l"}
    assert tuple(identity.rows["clip_l"].shape) == (2, 32) and torch.isfinite(identity.rows["clip_l"]).all()
    assert not torch.equal(identity.rows["clip_l"], init.rows["clip_l"])  # the rows were trained
    assert identity.metadata["steps"] == "2" and identity.metadata["base_family"] == "sd1"
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.shape[1] > 16
    assert curve.dtype == torch.float32 and float(curve.min()) >= 0 and float(curve.max()) <= 1
    assert float(curve.std()) > 0.01  # a drawn chart, not a blank image
    # Training decloned the weights; later nodes (KSampler, CLIPTextEncode) must compute exactly what they did before.
    torch.testing.assert_close(unet_output(tiny, x_t, t, context), before, rtol=0, atol=0)
    torch.testing.assert_close(_stock(tiny.clip, "a photo of a person")[0], cond_before, rtol=0, atol=0)
    # The trained identity is usable downstream in the same graph.
    cond, _ = _apply(tiny.clip, "a photo of <identity>", identity)
    assert torch.isfinite(cond).all()


def test_train_identity_token_sdxl(fresh_comfy_tiny: TinyFactory, embeddings: Path, trainer_spy: list) -> None:
    tiny = fresh_comfy_tiny("sdxl")
    identity, curve = _train(tiny, [_photos(1, 64)], preset="Textual Inversion", learning_rate=0.01)
    assert {k: tuple(v.shape) for k, v in identity.rows.items()} == {"clip_l": (1, 32), "clip_g": (1, 64)}
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    (trainer,) = trainer_spy
    with torch.inference_mode():
        (word,) = CrossInitEmbed().make(tiny.clip, "plain word", 1, "person")  # the preset's start: 'person'
    for key, rows in identity.rows.items():  # both encoders' rows moved away from where training started
        start = trainer.init_rows[key].cpu()
        torch.testing.assert_close(start, word.rows[key], rtol=0, atol=1e-6)
        assert torch.isfinite(rows).all() and float((rows - start).abs().max()) > 1e-3, key
    losses = trainer.result.losses
    assert len(losses) == 2 and all(math.isfinite(value) and value > 0 for value in losses), losses


def _rows_moved(identity: Identity, start: Identity) -> bool:
    """Whether every encoder's rows were trained away from the start."""
    return all(float((identity.rows[k] - start.rows[k]).abs().max()) > 1e-4 for k in start.rows)


def test_collect_photos_keeps_sizes_and_order() -> None:
    small, wide, pair = _photos(1, 64), _photos(1, 40, width=72), _photos(2, 80, seed=1)
    with torch.inference_mode():
        (photos,) = CollectPhotos().collect(photo_1=[small], photo_3=[pair], photo_2=[wide])
    assert CollectPhotos.OUTPUT_IS_LIST == (True,) and CollectPhotos.INPUT_IS_LIST
    assert [p is q for p, q in zip(photos, [small, wide, pair])] == [True] * 3 and len(photos) == 3
    spec = CollectPhotos.INPUT_TYPES()
    assert list(spec["required"]) == ["photo_1"] and list(spec["optional"]) == [f"photo_{n}" for n in range(2, 6)]
    assert all(options["tooltip"] for _, options in [*spec["required"].values(), *spec["optional"].values()])
    with torch.inference_mode():  # chained: a Collect Photos list arrives in one slot of another
        (more,) = CollectPhotos().collect(photo_1=photos, photo_5=[small])
    assert len(more) == 4 and more[-1] is small


def test_train_on_photos_of_different_sizes(comfy_tiny: TinyFactory, embeddings: Path, trainer_spy: list) -> None:
    tiny = comfy_tiny("sd1")
    with torch.inference_mode():
        (init,) = CrossInitEmbed().make(tiny.clip, "plain word", 2, "person")
        (photos,) = CollectPhotos().collect(photo_1=[_photos(1, 64)], photo_2=[_photos(1, 40, width=60, seed=1)],
                                            photo_3=[_photos(1, 90, width=60, seed=2)])
    identity, _ = _train(tiny, photos, init=[init], batch_size=2)
    assert _rows_moved(identity, init) and torch.isfinite(identity.rows["clip_l"]).all()
    assert identity.metadata["resolution"] == "64"
    (trainer,) = trainer_spy
    assert tuple(trainer.pixels.shape) == (3, 3, 64, 64) and trainer.masks is None
    assert all(math.isfinite(value) for value in trainer.result.losses)


def _patch_mask(photo: torch.Tensor, top: int, left: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The photo with a bright square and the (1, H, W) mask of exactly that square."""
    bright = photo.clone() * 0.2
    bright[:, top : top + side, left : left + side] = 1.0
    mask = torch.zeros(photo.shape[:3])
    mask[:, top : top + side, left : left + side] = 1.0
    return bright, mask


def test_train_with_a_mask(comfy_tiny: TinyFactory, embeddings: Path, trainer_spy: list) -> None:
    tiny = comfy_tiny("sd1")
    with torch.inference_mode():
        (init,) = CrossInitEmbed().make(tiny.clip, "plain word", 2, "person")
    photos = [_photos(2, 64)]
    top_half = torch.zeros(1, 64, 64)
    top_half[:, :32] = 1.0
    plain, _ = _train(tiny, photos, init=[init], seed=5)
    masked, _ = _train(tiny, photos, init=[init], seed=5, mask=[top_half])
    everywhere, _ = _train(tiny, photos, init=[init], seed=5, mask=[torch.ones(1, 64, 64)])
    assert _rows_moved(masked, init) and _rows_moved(plain, init)
    assert float((masked.rows["clip_l"] - plain.rows["clip_l"]).abs().max()) > 1e-5  # the mask changed training
    torch.testing.assert_close(everywhere.rows["clip_l"], plain.rows["clip_l"], rtol=1e-4, atol=1e-5)
    assert tuple(trainer_spy[1].masks.shape) == (2, 1, 64, 64)  # one mask served both photos
    assert trainer_spy[1].result.losses != trainer_spy[0].result.losses


def test_train_with_a_mask_per_photo_of_different_sizes(comfy_tiny: TinyFactory, embeddings: Path,
                                                        trainer_spy: list) -> None:
    tiny = comfy_tiny("sd1")
    square, square_mask = _patch_mask(_photos(1, 64), 8, 8, 20)
    wide, wide_mask = _patch_mask(_photos(1, 48, width=96, seed=1), 14, 50, 20)  # inside the kept centre 48 columns
    with torch.inference_mode():
        (init,) = CrossInitEmbed().make(tiny.clip, "plain word", 2, "person")
    identity, _ = _train(tiny, [square, wide], init=[init], mask=[square_mask, wide_mask])
    assert _rows_moved(identity, init)
    (trainer,) = trainer_spy
    assert tuple(trainer.pixels.shape) == (2, 3, 64, 64) and tuple(trainer.masks.shape) == (2, 1, 64, 64)
    for pixels, mask in zip(trainer.pixels, trainer.masks):  # each mask still covers its photo's bright square
        inside, outside = mask[0] > 0.9, mask[0] < 0.1
        assert inside.sum() > 100 and outside.sum() > 100
        assert float(pixels[:, inside].min()) > 0.9 and float(pixels[:, outside].max()) < -0.3
    assert not torch.allclose(trainer.masks[0], trainer.masks[1])


class _Stop(Exception):
    """Raised by the fake trainer once it has seen what the node gives it."""


@pytest.mark.parametrize(("family", "native"), [("sd1", 512), ("sd2", 768), ("sdxl", 1024)])  # tiny sd2 is v-pred
def test_resolution_zero_is_the_models_native_size(comfy_tiny: TinyFactory, embeddings: Path,
                                                   monkeypatch: pytest.MonkeyPatch, family: str, native: int) -> None:
    seen: dict[str, object] = {}

    def fake_trainer(model: object, images: torch.Tensor, config: object, **kwargs: object) -> None:
        seen.update(shape=tuple(images.shape), resolution=config.resolution, masks=kwargs.get("masks"))
        raise _Stop

    spec = TrainIdentityToken.INPUT_TYPES()["required"]["resolution"][1]
    assert spec["default"] == 0 and "native" in spec["tooltip"]
    monkeypatch.setattr(identity_nodes, "Trainer", fake_trainer)
    tiny = comfy_tiny(family)
    with pytest.raises(_Stop):
        _train(tiny, [_photos(1, 40, width=60)], resolution=0, mask=[torch.ones(1, 40, 60)])
    assert seen["shape"] == (1, 3, native, native) and seen["resolution"] == native
    assert tuple(seen["masks"].shape) == (1, 1, native, native)
    with pytest.raises(_Stop):  # a saved workflow's 512 stays 512 on every family
        _train(tiny, [_photos(1, 40, width=60)], resolution=512)
    assert seen["shape"] == (1, 3, 512, 512) and seen["resolution"] == 512


# --- neighbours: other packs' tokenizer patches ------------------------------------------------------------------


def test_apply_identity_restores_another_packs_tokenizer_patch(comfy_tiny: TinyFactory, embeddings: Path) -> None:
    tiny = comfy_tiny("sdxl")
    _save_and_load(_identity(tiny, n=1, seed=4), "tt-neighbour")
    tokenizers = [tokenizer for _, tokenizer in clip_encoders(tiny.clip).values()]
    asked: list[str] = []
    patches = {}
    for tokenizer in tokenizers:
        def other_pack(name: str, _tokenizer: object = tokenizer) -> tuple:
            asked.append(name)
            return type(_tokenizer)._try_get_embedding(_tokenizer, name)

        tokenizer._try_get_embedding = patches[id(tokenizer)] = other_pack  # another pack's instance patch
    try:
        cond, _ = _apply(tiny.clip, "embedding:tt-neighbour next to <identity>", _identity(tiny, seed=5))
        for tokenizer in tokenizers:
            assert tokenizer.__dict__.get("_try_get_embedding") is patches[id(tokenizer)]
        assert asked and all(name.startswith("tt-neighbour") for name in asked), asked  # used for names not ours
        assert not any(name.startswith(NAME_PREFIX) for name in asked)
        assert torch.isfinite(cond).all()
    finally:
        for tokenizer in tokenizers:
            tokenizer.__dict__.pop("_try_get_embedding", None)


def test_apply_identity_leaves_no_tokenizer_patch(comfy_tiny: TinyFactory, embeddings: Path) -> None:
    tiny = comfy_tiny("sd1")
    tokenizers = [tokenizer for _, tokenizer in clip_encoders(tiny.clip).values()]
    before = [dict(vars(tokenizer)) for tokenizer in tokenizers]
    assert all("_try_get_embedding" not in state for state in before)
    _apply(tiny.clip, "a photo of <identity>", _identity(tiny))
    for tokenizer, state in zip(tokenizers, before):
        assert "_try_get_embedding" not in vars(tokenizer)
        assert vars(tokenizer).keys() == state.keys() and tokenizer.embedding_directory == state["embedding_directory"]


def test_train_out_of_memory_names_the_setting(comfy_tiny: TinyFactory, embeddings: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that runs out of memory ends in one error naming batch_size, not 'lower learning_rate'."""

    def no_memory(self: Trainer, batch: object) -> float:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(Trainer, "step", no_memory)
    with pytest.raises(InputError, match=r"^batch_size: training stopped, out of memory at step 1 .*lower batch_size"):
        _train(comfy_tiny("sd1"), [_photos()], steps=2, batch_size=2)


@pytest.mark.parametrize("memory", ["checkpointing", "low"])
def test_train_memory_modes_give_the_same_identity(fresh_comfy_tiny: TinyFactory, embeddings: Path,
                                                    trainer_spy: list[Trainer], memory: str) -> None:
    """Through the node, gradient checkpointing of ComfyUI's UNet (and micro-batch 1) trains to the default's rows."""
    tiny = fresh_comfy_tiny("sd1")
    layers = list(tiny.patcher.model.diffusion_model.modules())
    forwards = [layer.forward for layer in layers]
    (expected, _curve) = _train(tiny, [_photos(2)], batch_size=2, memory="default")
    (identity, _curve) = _train(tiny, [_photos(2)], batch_size=2, memory=memory)
    plan = trainer_spy[-1].memory_plan
    assert plan.checkpointing and plan.micro_batch == (1 if memory == "low" else 2)
    for key, rows in expected.rows.items():
        torch.testing.assert_close(identity.rows[key], rows, rtol=1e-4, atol=1e-5)
    assert [layer.forward for layer in layers] == forwards  # the MODEL is left as it was for later nodes
