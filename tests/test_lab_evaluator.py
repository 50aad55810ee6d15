"""The likeness lab's evaluator: the committed weights read attributes and traits of fresh renders, likeness separates
subjects, editability counts realised attributes, and the weights file is safe, described and written atomically."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import InputError
from core.lab import evaluator as lab_evaluator
from core.lab.evaluator import (
    CLASS_HEADS,
    CONTINUOUS_TRAITS,
    DEFAULT_PATH,
    DISCRETE_TRAITS,
    Evaluator,
    editability,
    head_names,
    likeness,
    likeness_to_images,
    load_evaluator,
    parameter_count,
    read_images,
    recipe_path,
    sample_batch,
    soften,
    train_evaluator,
    trait_likeness,
)
from core.lab.world import (
    INTRINSIC_ATTRIBUTES,
    NAMED_ATTRIBUTES,
    TRAIT_NAMES,
    VARIABLE_ATTRIBUTES,
    held_out_subjects,
    level_value,
    random_variable,
    render,
)


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    """The committed evaluator."""
    return load_evaluator()


@pytest.fixture(scope="module")
def fresh() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """200 fresh jittered renders of random subjects, from a seed training never uses."""
    return sample_batch(np.random.default_rng(2024), 200)


def _traits(**values: float) -> np.ndarray:
    """A trait vector: 0.5 everywhere (a mark on the left cheek) except the given values."""
    traits = np.full(len(TRAIT_NAMES), 0.5)
    traits[TRAIT_NAMES.index("mark_place")] = level_value("mark_place", "left cheek")
    for name, value in values.items():
        traits[TRAIT_NAMES.index(name)] = value
    return traits


def test_named_attributes_and_discrete_traits_are_read(evaluator: Evaluator, fresh) -> None:
    images, labels = fresh
    readout = read_images(evaluator, images)
    assert len(readout) == 200 and readout.traits.shape == (200, len(TRAIT_NAMES))
    for name, levels in CLASS_HEADS.items():
        picks = readout.named[name] if name in NAMED_ATTRIBUTES else readout.levels[name]
        accuracy = np.mean(np.array([levels.index(p) for p in picks]) == labels[name])
        assert accuracy >= (0.9 if name in NAMED_ATTRIBUTES else 0.85), (name, accuracy)
    for name in CONTINUOUS_TRAITS:  # chance (always 0.5) is 0.25
        j = TRAIT_NAMES.index(name)
        rows = labels["mark_place"] != 0 if name == "mark_hue" else slice(None)
        error = np.abs(readout.traits[rows, j] - labels["traits"][rows, j]).mean()
        assert error < 0.15, (name, error)


def test_softened_renders_still_read(evaluator: Evaluator, fresh) -> None:
    images, labels = fresh  # generated pictures come out soft: training blurs half its renders
    readout = read_images(evaluator, np.rint(soften(images, 0.5)).astype(np.uint8))
    for name, levels in CLASS_HEADS.items():
        picks = readout.named[name] if name in NAMED_ATTRIBUTES else readout.levels[name]
        accuracy = np.mean(np.array([levels.index(p) for p in picks]) == labels[name])
        assert accuracy >= 0.9, (name, accuracy)  # without the blur augmentation glasses and smiles fall to ~0.55


def test_soften_blends_with_a_five_point_blur() -> None:
    image = np.zeros((32, 32, 3))
    image[10, 10] = 100.0
    assert np.array_equal(soften(image, 0.0), image)
    full, half = soften(image, 1.0), soften(image, 0.5)
    assert full[10, 10, 0] == pytest.approx(20) and full[9, 10, 0] == full[10, 11, 0] == pytest.approx(20)
    assert full[9, 9, 0] == 0 and full.sum() == pytest.approx(image.sum()) and half[10, 10, 0] == pytest.approx(60)
    assert np.allclose(soften(np.full((2, 32, 32, 3), 7.0), 1.0), 7.0)  # edges repeated: flat stays flat


def test_likeness_is_high_for_one_subject_and_low_across_subjects(evaluator: Evaluator) -> None:
    people = held_out_subjects(6)
    rng = np.random.default_rng(7)
    readouts = [read_images(evaluator, [render(p, random_variable(rng), rng) for _ in range(8)]) for p in people]
    same = np.mean([likeness(r, p).mean() for r, p in zip(readouts, people)])
    different = np.mean([likeness(r, q).mean() for i, r in enumerate(readouts) for j, q in enumerate(people) if i != j])
    assert same > 0.85 and different < 0.7 and same - different > 0.25, (same, different)  # trained: ~0.95 vs ~0.5
    halves = [(r.take(slice(0, 4)), r.take(slice(4, 8))) for r in readouts]
    same_images = np.mean([likeness_to_images(b, a).mean() for a, b in halves])
    different_images = np.mean(
        [likeness_to_images(halves[i][1], halves[j][0]).mean() for i in range(6) for j in range(6) if i != j]
    )
    assert same_images - different_images > 0.25, (same_images, different_images)


def test_likeness_counts_each_trait_as_documented() -> None:
    base = _traits()
    assert trait_likeness(base, base) == pytest.approx(1.0)
    # 10 traits counted (mark on both sides): a continuous trait 0.4 off costs 0.4 / 10
    assert trait_likeness(base, _traits(face_width=0.9)) == pytest.approx(1 - 0.04)
    # a discrete trait at another level costs a whole 1 / 10, however near its value
    assert trait_likeness(base, _traits(hair_style=level_value("hair_style", "long"))) == pytest.approx(0.9)
    # no mark on one side: mark_place mismatches and mark_hue is not counted (9 traits)
    no_mark = _traits(mark_place=level_value("mark_place", "none"), mark_hue=1.0)
    assert trait_likeness(base, no_mark) == pytest.approx(1 - 1 / 9)
    assert trait_likeness(no_mark, _traits(mark_place=0.1, mark_hue=0.0)) == pytest.approx(1.0)
    with pytest.raises(InputError):
        likeness(None, np.zeros(3))  # type: ignore[arg-type]


def test_editability_is_one_for_wanted_renders_and_low_for_others(evaluator: Evaluator) -> None:
    rng = np.random.default_rng(11)
    people = held_out_subjects(4)
    images, wanted, unwanted = [], [], []
    for i in range(40):
        person, variable = people[i % 4], random_variable(rng)
        images.append(render(person, variable, rng))
        stated = {**person.intrinsic(), **variable}
        wanted.append(stated)
        unwanted.append({a: next(v for v in NAMED_ATTRIBUTES[a] if v != stated[a]) for a in stated})
    readout = read_images(evaluator, np.stack(images))
    realised, missed = editability(readout, wanted), editability(readout, unwanted)
    assert realised.mean() >= 0.97 and missed.mean() <= 0.05, (realised.mean(), missed.mean())
    assert set(wanted[0]) == set(INTRINSIC_ATTRIBUTES + VARIABLE_ATTRIBUTES)
    one = editability(readout.take([0]), {"glasses": wanted[0]["glasses"], "scene": unwanted[0]["scene"]})
    assert one.tolist() == [0.5]
    assert np.isnan(editability(readout.take([0]), [{}])).all()
    with pytest.raises(InputError):
        editability(readout.take([0]), [{"hat": "with"}])
    with pytest.raises(InputError):
        editability(readout, [{}])  # one set for 40 images


def test_bad_images_are_refused(evaluator: Evaluator) -> None:
    with pytest.raises(InputError):
        read_images(evaluator, np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(InputError):
        read_images(evaluator, np.zeros((2, 64, 64, 3), np.uint8))


def test_weights_load_without_pickle_and_match_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model = load_evaluator()
    assert not model.training and next(model.parameters()).device.type == "cpu"
    recipe = json.loads(recipe_path(DEFAULT_PATH).read_text())
    assert recipe["file_bytes"] == DEFAULT_PATH.stat().st_size < 1_000_000
    assert recipe["parameters"] == parameter_count(model)
    assert recipe["heads"] == head_names() and set(head_names()) == set(CLASS_HEADS) | {"continuous"}
    assert set(DISCRETE_TRAITS) | set(CONTINUOUS_TRAITS) == set(TRAIT_NAMES)
    report = recipe["report"]
    assert set(report["accuracy"]) == set(CLASS_HEADS) and set(report["mae"]) == set(CONTINUOUS_TRAITS)


def test_not_an_evaluator_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(InputError, match="not found"):
        load_evaluator(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(InputError, match="not an evaluator"):
        load_evaluator(other)


def test_training_writes_atomically_and_is_seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ev.safetensors"
    recipe = train_evaluator(2, seed=3, out_path=out, batch=4)
    assert recipe["steps"] == 2 and recipe["seed"] == 3 and recipe["file_bytes"] == out.stat().st_size
    assert json.loads(recipe_path(out).read_text())["parameters"] == parameter_count(load_evaluator(out))
    again = tmp_path / "again.safetensors"
    train_evaluator(2, seed=3, out_path=again, batch=4)
    a, b = load_evaluator(out).state_dict(), load_evaluator(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="exists"):
        train_evaluator(1, seed=4, out_path=out, batch=4, overwrite=False)
    assert all(torch.equal(load_evaluator(out).state_dict()[k], a[k]) for k in a)  # untouched

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    broken = tmp_path / "broken.safetensors"
    with pytest.raises(InputError, match="disk full"):
        train_evaluator(1, seed=5, out_path=broken, batch=4)
    assert not broken.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in [out, again] + [recipe_path(out), recipe_path(again)]
    )  # no temp files left


def test_command_line_reports(capsys: pytest.CaptureFixture[str]) -> None:
    assert lab_evaluator.main(["--report", "--report-samples", "20"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in CLASS_HEADS) and "face_width" in printed
