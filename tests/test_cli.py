"""`python -m core train` and `inspect`: outputs, refusals, and partial saves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from core.cli import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_STOPPED, main
from core.formats import load_identity
from core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _train(photo_dir: Path, out: Path, *extra: str) -> int:
    """Run `train` in-process on the tiny model for 3 steps."""
    return main(["train", "--model", "tiny", "--images", str(photo_dir), "--out", str(out), "--steps", "3",
                 "--batch-size", "2", *extra])


def test_train_writes_identity_curve_and_pt(photo_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "alice.safetensors"
    assert _train(photo_dir, out, "--legacy-pt") == 0
    identity = load_identity(out)
    assert identity.n_tokens == 2 and identity.metadata["token"] == "<alice>"
    assert identity.metadata["steps"] == "3" and identity.metadata["partial"] == "false"
    assert Image.open(out.with_suffix(".loss.png")).size == (640, 360)
    assert load_identity(out.with_suffix(".pt")).rows["clip_l"].shape == (2, 32)
    assert "embedding:alice" in capsys.readouterr().out


def test_existing_output_refused_unless_overwrite(photo_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bob.safetensors"
    out.write_bytes(b"precious")
    assert _train(photo_dir, out) == EXIT_INPUT
    assert out.read_bytes() == b"precious"
    assert "--overwrite" in capsys.readouterr().err
    assert _train(photo_dir, out, "--overwrite") == 0
    assert load_identity(out).n_tokens == 2


def test_unwritable_output_path(photo_dir: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _train(photo_dir, blocker / "c.safetensors") == EXIT_INPUT
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "person"], "already a word"),
        (["--tokens", "80"], "do not fit"),
        (["--resolution", "60"], "resolution"),
    ],
)
def test_bad_options_exit_2(photo_dir: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert _train(photo_dir, tmp_path / "d.safetensors", *args) == EXIT_INPUT
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("d.*"))


def test_no_images_and_broken_images(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(empty, tmp_path / "e.safetensors") == EXIT_INPUT
    assert "found no images" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (128, 128), "red").save(broken / "x.png")
    (broken / "x.png").write_bytes((broken / "x.png").read_bytes()[:60])
    assert _train(broken, tmp_path / "e.safetensors") == EXIT_INPUT
    assert "x.png" in capsys.readouterr().err


def test_init_from_file_of_wrong_width(photo_dir: Path, tmp_path: Path, capsys) -> None:
    import torch
    from safetensors.torch import save_file

    wrong = tmp_path / "wide.safetensors"
    save_file({"<wide>": torch.randn(2, 768)}, str(wrong))
    assert _train(photo_dir, tmp_path / "f.safetensors", "--init-from", str(wrong)) == EXIT_INPUT
    assert "768 wide" in capsys.readouterr().err


def test_ctrl_c_saves_partial(photo_dir: Path, tmp_path: Path, monkeypatch) -> None:
    real_step = Trainer.step

    def step_then_interrupt(self, batch):
        if self.steps_done == 2:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", step_then_interrupt)
    out = tmp_path / "g.safetensors"
    assert _train(photo_dir, out) == EXIT_INTERRUPTED
    assert not out.exists()
    partial = load_identity(tmp_path / "g.partial.safetensors")
    assert partial.metadata["partial"] == "true" and partial.metadata["steps"] == "2"


def test_nan_loss_saves_last_good_rows(photo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    real_step = Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda self, b: float("nan") if self.steps_done == 1 else real_step(self, b))
    assert _train(photo_dir, tmp_path / "h.safetensors") == EXIT_STOPPED
    assert "lower --lr" in capsys.readouterr().err
    assert load_identity(tmp_path / "h.partial.safetensors").metadata["steps"] == "1"


def test_inspect_prints_layout(photo_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "i.safetensors"
    assert _train(photo_dir, out) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_tokens"] == 2 and info["encoders"] == ["clip_l"] and len(info["row_norms"]["clip_l"]) == 2


def test_module_entry_point_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "core", "inspect", str(tmp_path / "missing.safetensors")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_INPUT and "missing.safetensors" in done.stderr
