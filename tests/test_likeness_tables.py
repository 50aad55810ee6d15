"""The likeness tables join runs by method and compare methods subject by subject."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.likeness_tables import main, tables

PROMPTS = ("a photo of {} wearing glasses", "a photo of {} smiling")


def _row(method: str, subject: int, likeness: float, seed: int = 0) -> dict:
    per_prompt = {PROMPTS[0]: 1.0, PROMPTS[1]: 0.5 if method == "B" else 1.0}
    return {"method": method, "subject": subject, "seed": seed, "train_seconds": 2.0, "likeness": likeness,
            "likeness_plain": likeness, "editability": 0.75, "per_prompt": per_prompt}


def _run(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps({"command": "python -m benchmarks.likeness", "date": "d", "commit": "c",
                                "machine": "m", "wall_seconds": 60.0, "rows": rows}))
    return path


def test_runs_join_by_method_subject_and_seed_and_compare_subject_by_subject(tmp_path: Path) -> None:
    first = _run(tmp_path / "a.json", [_row("class word", s, 0.5) for s in range(3)]
                 + [_row("B", s, 0.9) for s in range(3)])
    # The later run replaces B and adds Cross-Init 320 on subjects 0-1 with two training seeds.
    second = _run(tmp_path / "b.json", [_row("B", s, 0.6 if s else 0.4) for s in range(3)]
                  + [_row("Cross-Init 320", s, v, seed) for s in range(2) for seed, v in ((0, 0.5), (1, 0.7))])
    text = tables([first, second])
    assert "| B | +0.033 (2/3) | -0.100 (0/2) |" in text  # (-0.1 + 0.1 + 0.1) / 3; (-0.2 + 0) / 2
    assert "| Cross-Init 320 | +0.100 (2/2) |  |" in text
    assert "| B | 0.400 | 0.600 | 0.600 |" in text and "| Cross-Init 320 | 0.600 | 0.600 |  |" in text
    assert "| B | 1.00 | 0.50 |" in text and "| class word | 1.00 | 1.00 |" in text
    assert "0.9" not in text.split("Subject by subject")[1]  # the first run's B rows are gone
    assert text.count("`python -m benchmarks.likeness`") == 2


def test_a_missing_run_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing.json")])
    assert "nothing.json" in capsys.readouterr().err


def test_another_seed_joins_and_its_spread_is_reported(tmp_path: Path) -> None:
    seed0 = _run(tmp_path / "s0.json", [_row("class word", s, 0.5) for s in range(2)]
                 + [_row("B", s, 0.6 + 0.2 * s) for s in range(2)])
    old = json.loads(seed0.read_text())
    for row in old["rows"]:
        del row["seed"]  # a run from before training seeds were recorded: seed 0
    seed0.write_text(json.dumps(old))
    # Seed 1 differs from seed 0 by 0.1 on subject 0 and by 0.3 on subject 1.
    seed1 = _run(tmp_path / "s1.json", [_row("B", 0, 0.7, seed=1), _row("B", 1, 1.1, seed=1)])
    text = tables([seed0, seed1])
    assert "| B | 0.650 | 0.950 |" in text  # each subject's mean over seeds 0 and 1
    assert "| B | +0.300 (2/2) |" in text
    # Subject means 0.65 and 0.95: std over subjects 0.212; within a subject the seeds' stds are 0.071 and 0.212,
    # root mean square 0.158 (their plain mean would be 0.141).
    assert "| B | 0, 1 | 2 | 0.212 | 0.158 | 0.000 | 0.000 |" in text
    assert "| class word | 0" not in text.split("Spread over subjects")[1]  # one seed: no spread row


def test_one_subject_has_no_spread_over_subjects(tmp_path: Path) -> None:
    run = _run(tmp_path / "a.json", [_row("B", 0, 0.6 + 0.1 * seed, seed) for seed in (0, 1)])
    assert "| B | 0, 1 | 1 | — | 0.071 | — | 0.000 |" in tables([run])


def test_a_later_run_with_fewer_subjects_replaces_only_those(tmp_path: Path) -> None:
    first = _run(tmp_path / "a.json", [_row("B", s, 0.5) for s in range(2)])
    second = _run(tmp_path / "b.json", [_row("B", 1, 0.9)])
    assert "| B | 0.500 | 0.900 |" in tables([first, second])
