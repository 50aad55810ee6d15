"""Model loading: built-in tiny names and local diffusers folders, offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from core.errors import InputError
from core.models import default_resolution, load_model
from core.protocols import SLOT, Model, condition
from core.tiny import tiny_components

# The size each family was trained at, stated here and not computed with core.models: SD1.x 512, SD2.x 512 for the
# epsilon (base) models and 768 for the v-prediction ones, SDXL 1024.
TRAINED_AT = {("sd1", "epsilon"): 512, ("sd2", "epsilon"): 512, ("sd2", "v_prediction"): 768, ("sdxl", "epsilon"): 1024}


@dataclass
class _Denoiser:
    """Just the prediction type, which is all default_resolution may look at besides family and name."""

    prediction_type: str


@pytest.mark.parametrize(("family", "resolution"), [("sd1", 512), ("sdxl", 1024)])
def test_diffusers_folder_matches_components(tmp_path: Path, family: str, resolution: int) -> None:
    parts = tiny_components(family)
    for name, part in parts.items():
        if hasattr(part, "save_pretrained"):
            part.save_pretrained(tmp_path / name)
    index = {"_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"}
    index.update({name: ["diffusers", type(part).__name__] for name, part in parts.items()})
    (tmp_path / "model_index.json").write_text(__import__("json").dumps(index))
    loaded = load_model(str(tmp_path), torch.device("cpu"))
    reference = load_model(f"tiny-{family}", torch.device("cpu"))
    assert loaded.family == family and [e.key for e in loaded.encoders] == [e.key for e in reference.encoders]
    rows = {e.key: torch.randn(2, e.width) for e in reference.encoders}
    with torch.no_grad():
        ours, theirs = condition(loaded, [f"a photo of {SLOT}"], rows), condition(reference, [f"a photo of {SLOT}"], rows)
    torch.testing.assert_close(ours.context, theirs.context)
    assert default_resolution(reference) == 64 and default_resolution(loaded) == resolution


@pytest.mark.parametrize(("family", "prediction"), list(TRAINED_AT))
def test_default_resolution_per_family_and_prediction(family: str, prediction: str) -> None:
    """A non-tiny model trains at its family's size; SD2 v-prediction (768-v) at 768."""
    model = Model(family=family, encoders=[], denoiser=_Denoiser(prediction), name=f"local-{family}")
    assert default_resolution(model) == TRAINED_AT[(family, prediction)]
    assert default_resolution(Model(family=family, encoders=[], denoiser=_Denoiser(prediction), name="tiny-x")) == 64


def test_unknown_model_spec(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a built-in name"):
        load_model("no-such-model", torch.device("cpu"))
    with pytest.raises(InputError, match="model_index.json"):
        load_model(str(tmp_path), torch.device("cpu"))
