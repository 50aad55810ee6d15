"""The likeness lab's table: every method on held-out subjects of the lab world, scored by the lab's evaluator.

    python -m benchmarks.likeness --subjects 8 --workers 2 --out benchmarks/results/likeness

For each held-out subject (never seen in pretraining) and training seed, each method trains on the subject's 4
reference pictures with its preset (templates: the world's caption openings), then generates 8 prompts (2 plain,
6 edits) with 2 sampling seeds (DDIM 25 steps, guidance 4). Writes OUT.json (every row, the settings, the machine)
and OUT.md (the table: mean and standard deviation over subjects x seeds, training seconds) and OUT.png (the first
subject: references, then each method's pictures). Subjects are spread over --workers processes of one thread each.

Each finished subject is kept in OUT.parts/ (its rows and pictures, with the settings); a run that stops (a long
"TI 5000" run takes hours) starts again where it stopped when given the same settings, and the parts are removed once
the table is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # one-thread workers side by side: no spinning OpenMP threads

DEFAULT_METHODS = (
    "class word", "TI 320", "Cross-Init 320", "Cross-Init fast 25", "Encoder (one pass)", "Encoder + fast 25",
)


def _subject_rows(job: tuple[int, list[str], list[int], str]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Every method on one subject (in a worker process): score rows and the pictures of training seed 0."""
    index, method_names, seeds, model_spec = job
    import torch

    torch.set_num_threads(1)
    from core.lab import world
    from core.lab.evaluation import (
        METHODS,
        reference_face_masks,
        reference_pictures,
        score_identity,
        train_identity,
    )
    from core.lab.evaluator import load_evaluator
    from core.models import load_model

    model = load_model(model_spec, torch.device("cpu"))
    evaluator = load_evaluator()
    subject = world.held_out_subjects(index + 1)[index]
    references = reference_pictures(subject, seed=index)
    faces = reference_face_masks(subject, seed=index)
    rows, pictures = [], {"references": np.stack(references)}
    for name in method_names:
        for seed in seeds if METHODS[name].preset else seeds[:1]:  # one pass and the class word draw nothing at random
            identity, seconds = train_identity(model, references, METHODS[name], seed=seed, face_masks=faces)
            scores, images = score_identity(model, evaluator, identity, subject)
            rows.append({"method": name, "subject": index, "seed": seed, "train_seconds": round(seconds, 2),
                         **asdict(scores)})
            if seed == seeds[0]:
                pictures[name] = images
            print(f"subject {index} {name} seed {seed}: likeness {scores.likeness:.3f} "
                  f"editability {scores.editability:.3f} ({seconds:.0f} s)", flush=True)
    return rows, pictures


def table(rows: list[dict], method_names: list[str]) -> str:
    """The markdown table: per method, mean +- std over subjects x seeds."""
    from core.lab.evaluation import summarise

    lines = [
        "| method | likeness (all pictures) | likeness (plain prompts) | editability | train s | n |",
        "|---|---|---|---|---|---|",
    ]
    for name in method_names:
        chosen = [r for r in rows if r["method"] == name]
        cells = []
        for key in ("likeness", "likeness_plain", "editability"):
            mean, std, count = summarise(chosen, key)
            cells.append(f"{mean:.3f} ± {std:.3f}")
        seconds = summarise(chosen, "train_seconds")[0]
        lines.append(f"| {name} | {' | '.join(cells)} | {seconds:.1f} | {count} |")
    return "\n".join(lines)


def picture(pictures: dict[str, np.ndarray], method_names: list[str], path: Path) -> None:
    """One row per method (references first), each picture 3x."""
    from PIL import Image

    width = max(len(v) for v in pictures.values())
    blank = np.full((32, 32, 3), 255, np.uint8)
    lines = []
    for name in ["references", *method_names]:
        row = list(pictures[name][:width]) + [blank] * (width - len(pictures[name][:width]))
        lines.append(np.concatenate(row, axis=1))
    grid = np.concatenate(lines, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def _part_paths(out: Path, index: int) -> tuple[Path, Path]:
    """Where subject index's finished rows (JSON) and pictures (npz) are kept until the table is written."""
    folder = out.with_name(out.name + ".parts")
    return folder / f"subject-{index}.json", folder / f"subject-{index}.npz"


def _save_part(out: Path, index: int, settings: dict, result: tuple[list[dict], dict[str, np.ndarray]]) -> None:
    """Keep one finished subject (pictures first, so a JSON part always has its pictures)."""
    from core.files import atomic_write

    rows, pictures = result
    rows_path, pictures_path = _part_paths(out, index)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    names = list(pictures)

    def write_pictures(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(handle, *[pictures[n] for n in names])

    atomic_write(pictures_path, write_pictures, overwrite=True)
    text = json.dumps({"settings": settings, "pictures": names, "rows": rows}) + "\n"
    atomic_write(rows_path, lambda tmp: tmp.write_text(text), overwrite=True)


def _load_part(out: Path, index: int, settings: dict) -> tuple[list[dict], dict[str, np.ndarray]] | None:
    """A subject kept by an earlier run with the same settings, or None."""
    rows_path, pictures_path = _part_paths(out, index)
    if not rows_path.is_file() or not pictures_path.is_file():
        return None
    part = json.loads(rows_path.read_text())
    if part["settings"] != settings:
        return None
    with np.load(pictures_path, allow_pickle=False) as arrays:
        pictures = {name: arrays[f"arr_{i}"] for i, name in enumerate(part["pictures"])}
    return part["rows"], pictures


def run_subjects(
    out: Path, subjects: int, method_names: list[str], seeds: list[int], model: str, workers: int
) -> tuple[list[tuple[list[dict], dict[str, np.ndarray]]], list[int]]:
    """Every subject's rows and pictures: kept parts of an earlier run with these settings, the rest computed;
    and the kept subjects."""
    settings = {"methods": method_names, "seeds": seeds, "model": model}
    results = {i: part for i in range(subjects) if (part := _load_part(out, i, settings)) is not None}
    if results:
        print(f"kept from an earlier run: subjects {sorted(results)}", flush=True)
    missing = [i for i in range(subjects) if i not in results]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_subject_rows, (i, method_names, seeds, model)): i for i in missing}
        for future in as_completed(futures):
            index = futures[future]
            results[index] = future.result()
            _save_part(out, index, settings, results[index])
    return [results[i] for i in range(subjects)], sorted(set(range(subjects)) - set(missing))


def _commit() -> str:
    """The repository's commit and whether core/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "core"], capture_output=True, text=True).stdout.strip()
        return head + (" (uncommitted changes under core/)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="names in core.lab.evaluation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="lab")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/likeness"))
    args = parser.parse_args(argv)
    from core.lab.evaluation import METHODS

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results, kept = run_subjects(args.out, args.subjects, args.methods, args.seeds, args.model, args.workers)
    rows = [row for subject_rows, _ in results for row in subject_rows]
    import torch

    report = {
        "command": "python -m benchmarks.likeness " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{args.workers} worker processes x 1 thread",
        "wall_seconds": round(time.perf_counter() - started, 1),  # this run's; kept subjects ran before it
        "kept_subjects": kept,
        "rows": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(rows, args.methods)
    header = f"`{report['command']}` — {report['date']}, commit {report['commit']}, {report['machine']}, " \
             f"{report['wall_seconds'] / 60:.1f} min in all" + \
             (f" (subjects {kept} kept from an earlier run)" if kept else "") + "\n\n"
    args.out.with_suffix(".md").write_text(header + text + "\n")
    picture(results[0][1], args.methods, args.out.with_suffix(".png"))
    for index in range(args.subjects):
        for path in _part_paths(args.out, index):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _part_paths(args.out, 0)[0].parent.rmdir()
    print(header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
