"""The command line's face-aware options: --face-loss, --stages, --face-crop, the heatmap PNG and `export`."""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage.data
from PIL import Image

import core.models
from core.cli import EXIT_INPUT, main
from core.formats import load_identity
from core.stages import StageSchedule


@pytest.fixture()
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model fail the test: a bad input must be refused before the model is read."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(core.models, "load_model", refuse)


def _train(out: Path, *extra: str, images: str = "sample") -> int:
    """train on the tiny model with the bundled astronaut photo (or other images) for a few steps."""
    return main(["train", "--model", "tiny", "--images", images, "--out", str(out), "--steps", "4", *extra])


def _error(err: str) -> str:
    """The one error line of a refused run."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--face-loss", "mask"], "--face-loss mask: it needs a face mask per photo; add --face-crop"),
        (["--face-loss", "reference", "--face-loss-weight", "-1"], "--face-loss-weight: got -1.0"),
        (["--face-loss", "reference", "--face-loss-weight", "nan"], "--face-loss-weight: got nan"),
        (["--face-loss", "reference", "--reference-word", "two words"], "--reference-word: got 'two words'"),
        (["--stages", "0"], "--stages: got 0"),
        (["--stages", "9"], "--stages: 9 stages but only 4 --steps"),
        (["--stages", "2", "--legacy-pt"], "--legacy-pt: a per-stage identity has no A1111 layout"),
        (["--stages"], "--stages: 5 stages but only 4 --steps"),  # alone it means SeFi-IDE's 5
    ],
)
def test_bad_face_options_are_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model_load: None, extra: list[str], message: str
) -> None:
    assert _train(tmp_path / "a.safetensors", *extra) == EXIT_INPUT
    assert message in _error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_face_crop_without_a_face_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model_load: None
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skimage.data.coffee()).save(photos / "coffee.png")
    out = tmp_path / "out" / "a.safetensors"
    assert _train(out, "--face-crop", images=str(photos)) == EXIT_INPUT
    assert "no face found in photo 1 (coffee.png)" in _error(capsys.readouterr().err)
    assert not out.exists()


def test_mask_loss_per_stage_run_writes_the_identity_its_charts_and_a_plain_export(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "astro.safetensors"
    assert _train(out, "--face-loss", "mask", "--face-crop", "--stages", "3") == 0
    printed = capsys.readouterr()
    assert "a per-stage identity" in printed.out and "export" in printed.out
    identity = load_identity(out)
    assert identity.is_staged and identity.schedule == StageSchedule.uniform(3)
    assert identity.metadata["face_loss"] == "mask" and identity.metadata["face_loss_weight"] == "0.003"
    with Image.open(out.with_suffix(".attention.png")) as heatmap:
        assert heatmap.width > 3 * 64  # photo, start and end columns
    assert out.with_suffix(".loss.png").is_file()

    assert main(["inspect", str(out)]) == 0
    assert "per-stage (SeFi-IDE-style), 3 stages, key/value tokens" in capsys.readouterr().out

    plain = tmp_path / "astro-plain.safetensors"
    assert main(["export", str(out), "--out", str(plain)]) == 0
    exported = load_identity(plain)
    assert not exported.is_staged and exported.metadata["lossy"] == "true"
    assert exported.rows["clip_l"].equal(identity.stages["clip_l"][1, 1])  # the middle stage's values
    assert main(["export", str(out), "--out", str(plain)]) == EXIT_INPUT  # no silent overwrite
    assert "exists; pass --overwrite" in _error(capsys.readouterr().err)
    assert main(["export", str(plain), "--out", str(tmp_path / "again.safetensors")]) == EXIT_INPUT
    assert "already plain" in _error(capsys.readouterr().err)


def test_reference_loss_run_records_its_setting(tmp_path: Path) -> None:
    out = tmp_path / "ref.safetensors"
    assert _train(out, "--face-loss", "reference", "--reference-word", "woman", "--face-loss-weight", "0.01") == 0
    identity = load_identity(out)
    assert not identity.is_staged
    meta = identity.metadata
    assert (meta["face_loss"], meta["face_loss_weight"], meta["face_loss_reference_word"]) == ("reference", "0.01", "woman")


def test_plain_runs_write_the_heatmap_too(tmp_path: Path) -> None:
    out = tmp_path / "plain.safetensors"
    assert _train(out) == 0
    assert out.with_suffix(".attention.png").is_file()
    assert "face_loss" not in load_identity(out).metadata
