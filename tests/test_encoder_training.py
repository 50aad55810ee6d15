"""The identity encoder's training (core.encoders.train), its command lines, and train-many, on tiny random models.

Two processes under torchrun (gloo) must give the parameters of one process with the same global batch; a run
stopped and resumed must end where an unbroken run ends; every refusal comes before any work and names the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.cli import main
from core.encoders.data import FolderData, LabData
from core.encoders.files import EncoderFileError, check_text_widths, load_encoder, read_encoder_file
from core.encoders.mapper import encode_identity
from core.encoders.train import EncoderRun, EncoderTrainConfig, train_encoder
from core.encoders.vision import load_transformers_tower
from core.errors import InputError
from core.formats import load_identity
from core.lab.vision import VisionTowerSpec, build_tower, save_tower
from core.models import load_model
from core.templates import training_prompts

ROOT = Path(__file__).resolve().parents[1]
TINY_TOWER = VisionTowerSpec(image_size=32, patch_size=8, hidden_size=32, layers=3, heads=2, projection=32)
SMALL = {"batch": 4, "hidden": 32, "resolution": 64, "warmup": 2}


@pytest.fixture(scope="module")
def tower_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPVisionModel folder."""
    folder = tmp_path_factory.mktemp("tower")
    save_tower(build_tower(TINY_TOWER, seed=3), folder, {"test": True}, overwrite=True)
    return folder


@pytest.fixture(scope="module")
def tiny():  # noqa: ANN201
    return load_model("tiny", torch.device("cpu"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three identity folders of two or three random photos each (one with a caption and a mask)."""
    root = tmp_path_factory.mktemp("identities")
    rng = np.random.default_rng(0)
    for i, count in enumerate((2, 3, 2)):
        folder = root / f"person{i}"
        folder.mkdir()
        for j in range(count):
            size = (80 + 8 * j, 72)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"p{j}.png")
    (root / "person1" / "p0.txt").write_text("a photo of {} in a red hat")
    mask = np.zeros((80, 72), np.uint8)
    mask[20:60, 20:50] = 255
    Image.fromarray(mask).save(root / "person1" / "p0.mask.png")
    return root


def _run(tiny, tower_folder: Path, data_root: Path, tmp_path: Path, **config: object) -> EncoderRun:  # noqa: ANN001
    tower = load_transformers_tower(tower_folder)
    data = FolderData(data_root, 64, training_prompts("face"))
    return EncoderRun(tiny, tower, data, EncoderTrainConfig(**{**SMALL, **config}), tmp_path / "run")


def test_an_untrained_encoder_gives_the_cross_init_start(tiny, tower_folder, data_root, tmp_path) -> None:  # noqa: ANN001
    from core.cross_init import initial_rows

    run = _run(tiny, tower_folder, data_root, tmp_path)
    pictures = torch.rand(2, 3, 40, 48)
    identity = encode_identity(run.encoder, run.tower, pictures, "<x>")
    start = initial_rows(tiny, "celebrity", 2)
    for key, rows in start.items():
        torch.testing.assert_close(identity.rows[key], rows.float())
    assert identity.metadata["method"] == "encoder"


def test_training_moves_the_encoder_and_every_term_counts(tiny, tower_folder, data_root, tmp_path) -> None:  # noqa: ANN001
    run = _run(tiny, tower_folder, data_root, tmp_path, identity_max_timestep=1000)
    terms = run.losses(0)
    assert set(terms) == {"diffusion", "offset_l1", "identity"}
    assert all(torch.isfinite(v) for v in terms.values())
    before = {k: v.clone() for k, v in run.encoder.state_dict().items()}
    run.train_step()
    run.train_step()
    moved = [k for k, v in run.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("heads.") for k in moved) and any(k.startswith("levels.") for k in moved)
    assert not any(k.startswith("base_") for k in moved)  # the base rows are the fixed start
    # The identity term reaches the mapper: with it alone, the head gets a gradient.
    run.encoder.zero_grad()
    run.losses(1)["identity"].backward()
    grads = [p.grad for p in run.encoder.heads.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_masked_loss_counts_only_inside_the_mask(tiny, tower_folder, data_root, tmp_path) -> None:  # noqa: ANN001
    run = _run(tiny, tower_folder, data_root, tmp_path)
    from core.encoders.data import Sample

    target = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[:32] = 1
    samples = [Sample(target, target, "{}", mask), Sample(target, target, "{}", None)]
    weights = run._latent_masks(samples, torch.Size((8, 8)))
    assert weights.shape == (2, 1, 8, 8)
    assert weights[0, 0, :4].min() == 1 and weights[0, 0, 4:].max() == 0
    assert weights[1].min() == 1  # a target without a mask counts everywhere
    assert run._latent_masks(samples[1:], torch.Size((8, 8))) is None


def test_a_resumed_run_ends_where_an_unbroken_run_ends(tiny, tower_folder, data_root, tmp_path) -> None:  # noqa: ANN001
    tower = load_transformers_tower(tower_folder)
    data = FolderData(data_root, 64, training_prompts("face"))
    config = EncoderTrainConfig(**SMALL, steps=4)
    straight = train_encoder(tiny, tower, data, config, tmp_path / "a.safetensors", checkpoint_every=2)
    half = train_encoder(tiny, tower, data, EncoderTrainConfig(**SMALL, steps=2), tmp_path / "b.safetensors")
    assert half.step == 2
    resumed = train_encoder(tiny, tower, data, config, tmp_path / "b2.safetensors", folder=tmp_path / "b.run",
                            resume=True)
    assert resumed.step == 4 and [h["steps"] for h in resumed.history] == [[0, 2], [2, 4]]
    for key, value in straight.encoder.state_dict().items():
        assert torch.equal(value, resumed.encoder.state_dict()[key]), key
    # the optimiser state matters: a fresh AdamW on the step-2 weights lands elsewhere
    fresh = EncoderRun(tiny, tower, data, config, tmp_path / "c.run")
    fresh.encoder.load_state_dict(half.encoder.state_dict())
    fresh.step = 2
    fresh.train_step()
    fresh.train_step()
    assert not torch.equal(fresh.encoder.heads["clip_l"].weight, straight.encoder.heads["clip_l"].weight)
    saved = read_encoder_file(tmp_path / "a.safetensors")
    assert saved[2]["steps_done"] == 4 and saved[2]["config"]["batch"] == 4


def test_resume_refuses_another_recipe_and_a_run_without_resume(tiny, tower_folder, data_root, tmp_path) -> None:  # noqa: ANN001
    tower = load_transformers_tower(tower_folder)
    data = FolderData(data_root, 64, training_prompts("face"))
    out = tmp_path / "e.safetensors"
    train_encoder(tiny, tower, data, EncoderTrainConfig(**SMALL, steps=1), out)
    with pytest.raises(InputError, match="--resume"):
        train_encoder(tiny, tower, data, EncoderTrainConfig(**{**SMALL, "batch": 2}, steps=2), out, resume=True)
    with pytest.raises(InputError, match="add --resume"):
        train_encoder(tiny, tower, data, EncoderTrainConfig(**SMALL, steps=2), out)
    other = FolderData(data_root, 64, training_prompts("object"))
    other.description = "another folder"
    with pytest.raises(InputError, match="the same --data"):
        train_encoder(tiny, tower, other, EncoderTrainConfig(**SMALL, steps=2), out, resume=True)
    with pytest.raises(InputError, match="no .* to continue"):
        train_encoder(tiny, tower, data, EncoderTrainConfig(**SMALL, steps=2), tmp_path / "f.safetensors", resume=True)


def _torchrun(processes: int, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "core", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_train_the_same_encoder_as_one(tower_folder, data_root, tmp_path) -> None:  # noqa: ANN001
    common = ["train-encoder", "--model", "tiny", "--data", str(data_root), "--vision", str(tower_folder),
              "--steps", "3", "--batch", "4", "--hidden", "32", "--device", "cpu", "--warmup", "1"]
    one = _torchrun(1, *common, "--out", str(tmp_path / "one.safetensors"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, *common, "--out", str(tmp_path / "two.safetensors"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        # atol: a tenth of one step's AdamW move (lr 3e-4); rounding can flip the sign of a near-zero gradient
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=3e-5)
        moved += key.startswith("heads.") and a[key].abs().sum() > 0
    assert moved  # the heads left zero: three steps were taken
    history = read_encoder_file(tmp_path / "two.safetensors")[2]["history"]
    assert history[-1]["processes"] == 2
    # Each step's loss terms and gradient norm (before clipping) agree too: summing the processes' gradients, not
    # averaging them, matters here even where AdamW and clipping would hide a constant factor in the weights.
    logs = [[json.loads(line) for line in (tmp_path / f"{n}.run" / "log.jsonl").read_text().splitlines()]
            for n in ("one", "two")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [3]
    for key in ("diffusion", "offset_l1", "identity", "grad_norm"):
        assert logs[0][-1][key] == pytest.approx(logs[1][-1][key], rel=1e-3, abs=1e-6), key


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tower_folder, data_root, tmp_path) -> None:  # noqa: ANN001
    result = _torchrun(2, "train-encoder", "--model", "tiny", "--data", str(data_root), "--vision", str(tower_folder),
                       "--steps", "1", "--batch", "3", "--device", "cpu", "--out", str(tmp_path / "x.safetensors"))
    assert result.returncode != 0
    assert "batch: 3 does not split over 2 processes" in result.stderr


def test_the_command_line_trains_then_encodes_then_starts_training_from_the_encoder(
    tower_folder, data_root, tmp_path, capsys  # noqa: ANN001
) -> None:
    encoder_file = tmp_path / "enc.safetensors"
    assert main(["train-encoder", "--model", "tiny", "--data", str(data_root), "--vision", str(tower_folder),
                 "--steps", "2", "--batch", "2", "--hidden", "32", "--out", str(encoder_file), "--device", "cpu"]) == 0
    assert (tmp_path / "enc.run" / "state.pt").is_file() and (tmp_path / "enc.run" / "log.jsonl").is_file()
    photos = data_root / "person0"
    assert main(["encode", "--encoder", str(encoder_file), "--images", str(photos), "--vision", str(tower_folder),
                 "--out", str(tmp_path / "new" / "alice.safetensors")]) == 0  # the folder is made, as train makes it
    identity = load_identity(tmp_path / "new" / "alice.safetensors")
    assert identity.metadata["method"] == "encoder" and identity.n_tokens == 2
    # encode == the core call on the same photos
    encoder, tower = load_encoder(encoder_file), load_transformers_tower(tower_folder)
    from core.encoders.data import to_unit
    from core.encoders.vision import square

    pictures = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(photos.iterdir())]
    batch = torch.cat([square(to_unit([p]), tower.spec.image_size) for p in pictures])
    direct = encode_identity(encoder, tower, batch, "<alice>")
    torch.testing.assert_close(identity.rows["clip_l"], direct.rows["clip_l"])
    # train --init-encoder starts from those rows: zero learning rate keeps them
    out = tmp_path / "bob.safetensors"
    assert main(["train", "--model", "tiny", "--images", str(photos), "--init-encoder", str(encoder_file),
                 "--vision", str(tower_folder), "--steps", "1", "--batch-size", "1", "--reg-weight", "0",
                 "--lr", "1e-30", "--out", str(out), "--device", "cpu", "--no-samples"]) == 0
    torch.testing.assert_close(load_identity(out).rows["clip_l"], identity.rows["clip_l"], rtol=1e-5, atol=1e-6)


def test_encoder_refusals_name_the_input_and_the_fix(tower_folder, data_root, tmp_path, capsys) -> None:  # noqa: ANN001
    assert main(["train-encoder", "--model", "tiny", "--data", str(tmp_path / "none"), "--vision", str(tower_folder),
                 "--out", str(tmp_path / "x.safetensors"), "--device", "cpu"]) == 2
    assert "--data:" in capsys.readouterr().err
    assert main(["train-encoder", "--model", "tiny", "--data", str(data_root), "--out", str(tmp_path / "v.safetensors")]) == 2
    assert "--vision: give that CLIPVisionModel's local folder" in capsys.readouterr().err
    assert main(["train-encoder", "--model", "tiny", "--out", str(tmp_path / "x.pt")]) == 2
    assert "saved as .safetensors" in capsys.readouterr().err
    assert main(["train-encoder", "--model", "tiny", "--steps", "0", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "--steps: got 0" in capsys.readouterr().err
    thin = tmp_path / "thin" / "solo"
    thin.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(thin / "a.png")
    with pytest.raises(InputError, match="fewer than 2 photos"):
        FolderData(thin.parent, 64, training_prompts("face"))
    assert main(["encode", "--encoder", str(tmp_path / "missing.safetensors"), "--images", str(data_root / "person0"),
                 "--out", str(tmp_path / "z.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_encoder_files_refuse_corrupt_pickled_and_mismatched(tiny, tower_folder, data_root, tmp_path) -> None:  # noqa: ANN001
    from core.encoders.files import save_encoder
    from core.encoders.mapper import check_tower

    run = _run(tiny, tower_folder, data_root, tmp_path)
    good = save_encoder(run.encoder, tmp_path / "good.safetensors")
    assert load_encoder(good).spec == run.encoder.spec
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(EncoderFileError, match="corrupt or truncated"):
        load_encoder(corrupt)

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    pickled = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, pickled)
    with pytest.raises(EncoderFileError, match="refused"):
        load_encoder(pickled)
    assert not (tmp_path / "pwned").exists()
    other = tmp_path / "identity.safetensors"
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(2, 32)}, str(other), metadata={"format": "pt"})
    with pytest.raises(EncoderFileError, match="not an identity encoder"):
        load_encoder(other)
    with pytest.raises(EncoderFileError, match="clip"):
        check_text_widths(run.encoder.spec, {"clip_l": 768})
    tensors, metadata = load_file(good), None
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
    tensors["heads.clip_l.weight"] = torch.zeros(3, 3)
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=metadata)
    with pytest.raises(EncoderFileError, match="do not fit its spec"):
        load_encoder(damaged)
    wider = load_transformers_tower(tower_folder)
    from dataclasses import replace

    wider.spec = replace(wider.spec, hidden_size=64)
    with pytest.raises(InputError, match="clip_vision: the encoder was trained for the vision tower"):
        check_tower(run.encoder.spec, wider)


def test_lab_data_pairs_two_pictures_of_one_person_deterministically() -> None:
    data = LabData()
    a, b = data.sample(0, 5, 2), data.sample(0, 5, 2)
    assert np.array_equal(a.source, b.source) and np.array_equal(a.target, b.target) and a.caption == b.caption
    assert not np.array_equal(a.source, a.target)  # another render, not the same picture
    assert "{}" in a.caption
    assert not np.array_equal(data.sample(0, 5, 3).source, a.source)


def _manifest(tmp_path: Path, data_root: Path) -> Path:
    lines = [
        {"images": str(data_root / "person0"), "out": "ids/a.safetensors", "steps": 2},
        {"images": [str(p) for p in sorted((data_root / "person1").glob("p*.png"))], "out": "ids/b.safetensors",
         "steps": 2, "seed": 5},
        {"images": str(data_root / "person2"), "out": "ids/c.safetensors", "steps": 2, "preset": "cross_init_fast"},
    ]
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_train_many_spreads_a_manifest_over_processes(data_root, tmp_path) -> None:  # noqa: ANN001
    one = tmp_path / "one"
    one.mkdir()
    manifest = _manifest(one, data_root)
    assert main(["train-many", "--manifest", str(manifest), "--model", "tiny", "--device", "cpu"]) == 0
    two = tmp_path / "two"
    two.mkdir()
    result = _torchrun(2, "train-many", "--manifest", str(_manifest(two, data_root)), "--model", "tiny",
                       "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[0] line 1" in result.stdout and "[1] line 2" in result.stdout and "[0] line 3" in result.stdout
    for name in ("a", "b", "c"):
        a, b = load_identity(one / "ids" / f"{name}.safetensors"), load_identity(two / "ids" / f"{name}.safetensors")
        torch.testing.assert_close(a.rows["clip_l"], b.rows["clip_l"])
    # run again: everything exists, nothing is trained or overwritten
    before = (one / "ids" / "a.safetensors").stat().st_mtime_ns
    assert main(["train-many", "--manifest", str(manifest), "--model", "tiny", "--device", "cpu"]) == 0
    assert (one / "ids" / "a.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"images": "x"}', 'needs "images" and "out"'),
        ('{"images": "x", "out": "a.png"}', "must end in .safetensors"),
        ('{"images": "x", "out": "a.safetensors", "preset": "nope"}', "unknown preset 'nope'"),
        ('{"images": "x", "out": "a.safetensors", "colour": 1}', "unknown keys"),
        ("not json", "not JSON"),
        ('{"images": "x", "out": "a.safetensors", "token": "my id"}', "cannot be a trigger word"),
    ],
)
def test_train_many_refuses_a_bad_manifest_line_before_training(tmp_path, capsys, line, message) -> None:  # noqa: ANN001
    path = tmp_path / "m.jsonl"
    path.write_text('{"images": "y", "out": "ok.safetensors"}\n' + line + "\n")
    assert main(["train-many", "--manifest", str(path), "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and message in err
