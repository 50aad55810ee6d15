"""Model loading: built-in tiny names and local diffusers folders, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import InputError
from core.models import default_resolution, load_model
from core.protocols import SLOT, condition
from core.tiny import tiny_components


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_folder_matches_components(tmp_path: Path, family: str) -> None:
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
    assert default_resolution(reference) == 64 and default_resolution(loaded) in (512, 1024)


def test_unknown_model_spec(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a built-in name"):
        load_model("no-such-model", torch.device("cpu"))
    with pytest.raises(InputError, match="model_index.json"):
        load_model(str(tmp_path), torch.device("cpu"))
