"""What a new user runs into on the command line: checks before the model loads, one-line errors, nothing lost."""

from __future__ import annotations

import errno
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import core.formats
import core.models
from core.cli import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_STOPPED, main
from core.formats import load_identity
from core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to load a model: the check under test must come first."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before the input check")

    monkeypatch.setattr(core.models, "load_model", refuse)


def _train(photo_dir: Path, out: Path, *extra: str) -> int:
    """`train` on the tiny model for 3 steps of batch 2."""
    args = ["train", "--model", "tiny", "--images", str(photo_dir), "--out", str(out), "--steps", "3"]
    return main([*args, "--batch-size", "2", *extra])


def _one_error_line(err: str) -> str:
    """The single 'error: ...' line of a refused run (no traceback)."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ checks before the model loads


@pytest.mark.parametrize(
    ("extra", "out_name", "flag"),
    [
        ([], "my id.safetensors", "--out"),
        (["--token", "my id"], "ok.safetensors", "--token"),
        (["--token", "<>"], "ok.safetensors", "--token"),
        (["--token", "person"], "ok.safetensors", "--token"),
        (["--device", "tpu"], "ok.safetensors", "device"),
        (["--device", "CPU"], "ok.safetensors", "did you mean 'cpu'"),
        (["--device", ""], "ok.safetensors", "device"),
        (["--device", "cuda:7"], "ok.safetensors", "device"),
        (["--seed", str(2**64)], "ok.safetensors", "--seed"),
        (["--seed", "-1"], "ok.safetensors", "--seed"),
        (["--steps", "0"], "ok.safetensors", "--steps"),
        (["--resolution", "100"], "ok.safetensors", "resolution"),
    ],
)
def test_bad_input_is_refused_before_the_model_loads(
    photo_dir: Path, tmp_path: Path, capsys, no_model_load: None, extra: list[str], out_name: str, flag: str
) -> None:
    assert _train(photo_dir, tmp_path / out_name, *extra) == EXIT_INPUT
    assert flag in _one_error_line(capsys.readouterr().err)
    assert not [p for p in tmp_path.iterdir() if p.name != "photos"]


@pytest.mark.skipif(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                    reason="this machine has an Apple GPU, so mps is a valid device here")
def test_mps_without_apple_gpu_is_one_line(photo_dir: Path, tmp_path: Path, capsys, no_model_load: None) -> None:
    assert _train(photo_dir, tmp_path / "m.safetensors", "--device", "mps") == EXIT_INPUT
    assert "mps" in _one_error_line(capsys.readouterr().err)


def test_folder_with_only_model_index_names_what_is_missing(photo_dir: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "half-model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    code = main(["train", "--model", str(folder), "--images", str(photo_dir), "--out", str(tmp_path / "x.safetensors")])
    assert code == EXIT_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert "unet/config.json" in line and "text_encoder/config.json" in line and "scheduler" in line


def test_model_is_required(photo_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["train", "--images", str(photo_dir), "--out", str(tmp_path / "x.safetensors")])
    assert stop.value.code == 2 and "--model" in capsys.readouterr().err


def test_ctrl_c_while_the_model_loads(photo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(core.models, "load_model", interrupted)
    assert _train(photo_dir, tmp_path / "k.safetensors") == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "nothing was written" in err and "Traceback" not in err
    assert not list(tmp_path.glob("k*"))


# ------------------------------------------------------------------ nothing lost after training


def test_failed_write_after_training_keeps_the_rows(photo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    real_save = core.formats.save_file
    calls = []

    def disk_full_once(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        calls.append(filename)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(core.formats, "save_file", disk_full_once)
    out = tmp_path / "full.safetensors"
    assert _train(photo_dir, out) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "No space left" in err and not out.exists()
    kept = Path(err.split("safe in ", 1)[1].split(";", 1)[0])
    assert kept.is_file() and load_identity(kept).metadata["steps"] == "3"
    kept.unlink()


def test_out_of_memory_keeps_the_rows_and_names_the_setting(photo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    real_step = Trainer.step

    def step_until_memory_runs_out(self: Trainer, batch: object) -> float:
        if self.steps_done == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", step_until_memory_runs_out)
    out = tmp_path / "oom.safetensors"
    assert _train(photo_dir, out) == EXIT_STOPPED
    err = capsys.readouterr().err
    assert "out of memory" in err and "--batch-size (now 2)" in err and "Traceback" not in err
    partial = load_identity(tmp_path / "oom.partial.safetensors")
    assert partial.metadata["steps"] == "2" and partial.metadata["partial"] == "true"


def test_cpu_allocation_failure_counts_as_out_of_memory(photo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def no_memory(self: Trainer, batch: object) -> float:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(Trainer, "step", no_memory)
    assert _train(photo_dir, tmp_path / "cpu.safetensors") == EXIT_STOPPED
    assert "--batch-size" in capsys.readouterr().err
    assert (tmp_path / "cpu.partial.safetensors").is_file()


def test_interrupted_overwrite_run_keeps_its_chart_with_its_partial_file(
    photo_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "x.safetensors"
    assert _train(photo_dir, out) == 0
    finished_chart = out.with_suffix(".loss.png").read_bytes()
    real_step = Trainer.step

    def interrupt_at_two(self: Trainer, batch: object) -> float:
        if self.steps_done == 2:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", interrupt_at_two)
    assert _train(photo_dir, out, "--overwrite") == EXIT_INTERRUPTED
    assert out.with_suffix(".loss.png").read_bytes() == finished_chart  # the finished run's pair is untouched
    assert (tmp_path / "x.partial.loss.png").is_file() and (tmp_path / "x.partial.safetensors").is_file()


# ------------------------------------------------------------------ refusals worded for users


class _Hostile:
    """A pickle payload that would run a shell command if unpickled."""

    def __reduce__(self) -> tuple:
        return (os.system, ("touch /tmp/identity-tokens-pwned",))


@pytest.mark.parametrize("kind", ["zip", "plain"])
def test_refused_pickles_never_suggest_turning_the_safety_off(photo_dir: Path, tmp_path: Path, capsys, kind: str) -> None:
    for name in ("init.pt", "model.ckpt"):
        path = tmp_path / name
        payload = {"state_dict": {"w": _Hostile()}} if name.endswith(".ckpt") else {"<x>": _Hostile()}
        if kind == "zip":
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=4))
    for args in (["--init-from", str(tmp_path / "init.pt")], []):
        model = "tiny" if args else str(tmp_path / "model.ckpt")
        code = main(["train", "--model", model, "--images", str(photo_dir), "--out", str(tmp_path / "o.safetensors"),
                     "--steps", "1", *args])
        line = _one_error_line(capsys.readouterr().err)
        assert code == EXIT_INPUT and "refused" in line and "corrupt" not in line, line
        assert "weights_only" not in line and "trusted source" not in line, line
    assert not Path("/tmp/identity-tokens-pwned").exists()


def test_huge_photo_gives_a_note_not_a_raw_warning(photo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from core.images import load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 80 // 2 + 1)  # the photo is between 1x and 2x the limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_image(photo_dir / "a.png")
        main(["inspect", str(tmp_path / "missing.safetensors")])  # installs the CLI's note printer
        load_image(photo_dir / "a.png")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "note: images:" in capsys.readouterr().err


def test_gifs_in_a_folder_are_named_as_skipped(photo_dir: Path, tmp_path: Path, capsys) -> None:
    Image.new("RGB", (90, 90), "blue").save(photo_dir / "wave.gif")
    assert _train(photo_dir, tmp_path / "g.safetensors") == 0
    err = capsys.readouterr().err
    assert "skipped wave.gif" in err and "PNG or JPEG" in err


def test_fully_transparent_photo_is_refused(photo_dir: Path, tmp_path: Path, capsys, no_model_load: None) -> None:
    Image.new("RGBA", (90, 90), (255, 0, 0, 0)).save(photo_dir / "cutout.png")
    assert _train(photo_dir, tmp_path / "t.safetensors") == EXIT_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert "cutout.png" in line and "fully transparent" in line


# ------------------------------------------------------------------ results users can share


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_follow_the_umask(photo_dir: Path, tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        out = tmp_path / "shared.safetensors"
        assert _train(photo_dir, out, "--legacy-pt") == 0
    finally:
        os.umask(old)
    for path in (out, out.with_suffix(".loss.png"), out.with_suffix(".pt")):
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~mask), path


def test_prediction_type_can_be_chosen_and_is_printed(photo_dir: Path, tmp_path: Path, capsys) -> None:
    assert _train(photo_dir, tmp_path / "v.safetensors", "--prediction-type", "v_prediction") == 0
    assert "(sd1, v_prediction)" in capsys.readouterr().err
    assert _train(photo_dir, tmp_path / "e.safetensors") == 0
    assert "(sd1, epsilon)" in capsys.readouterr().err


def test_native_resolution_per_family() -> None:
    from core.models import native_resolution

    assert native_resolution("sd1") == 512
    assert native_resolution("sd2", "epsilon") == 512
    assert native_resolution("sd2", "v_prediction") == 768
    assert native_resolution("sdxl") == 1024


@pytest.mark.parametrize("token", ["alice", "<alice>"])  # SaveIdentity passes the bare name, the CLI '<stem>'
def test_every_save_loads_in_diffusers_without_a_token_argument(tmp_path: Path, token: str) -> None:
    """One key rule for both paths: '<alice>', a word CLIP does not know, so load_textual_inversion needs no token."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from core.formats import save_identity
    from core.identity import Identity
    from core.tiny import tiny_components

    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    path = save_identity(Identity({"clip_l": rows}), tmp_path / "alice.safetensors", token=token)
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["<alice>"]  # A1111 and ComfyUI read the one key whatever its name
    parts = tiny_components("sd1")
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_textual_inversion(str(path))
    assert pipe.maybe_convert_prompt("a photo of <alice>", pipe.tokenizer) == "a photo of <alice> <alice>_1"
    ids = pipe.tokenizer.convert_tokens_to_ids(["<alice>", "<alice>_1"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), rows)


def test_legacy_pt_for_sdxl_is_refused_before_training(photo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("training started although the .pt could not be written afterwards")

    monkeypatch.setattr(Trainer, "run", never)
    code = main(["train", "--model", "tiny-sdxl", "--images", str(photo_dir), "--out", str(tmp_path / "x.safetensors"),
                 "--legacy-pt"])
    assert code == EXIT_INPUT and "--legacy-pt" in _one_error_line(capsys.readouterr().err)
