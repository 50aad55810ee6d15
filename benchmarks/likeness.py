"""The likeness lab's table: every method on held-out subjects of the lab world, scored by the lab's evaluator.

    python -m benchmarks.likeness --subjects 8 --workers 2 --out benchmarks/results/likeness

For each held-out subject (never seen in pretraining) and training seed, each method trains on the subject's 4
reference pictures with its preset (templates: the world's caption openings), then generates 8 prompts (2 plain,
6 edits) with 2 sampling seeds (DDIM 25 steps, guidance 4). Writes OUT.json (every row, the settings, the machine)
and OUT.md (the table: mean and standard deviation over subjects x seeds, training seconds) and OUT.png (the first
subject: references, then each method's pictures). Subjects are spread over --workers processes of one thread each.

Each finished subject is kept in OUT.parts/ (its rows and pictures, with the settings and commit); a run that stops
(a long "TI 5000" run takes hours) starts again where it stopped when given the same settings (methods and their
recipes, seeds, model, prompts), and the parts are removed once the table is written.
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
        face_mask_batch,
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
    faces = face_mask_batch(subject, seed=index)
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


PART_GLOB = "subject-*.npz"


def _part_path(out: Path, index: int) -> Path:
    """Where subject index's finished rows and pictures are kept (one npz) until the table is written."""
    return out.with_name(out.name + ".parts") / f"subject-{index}.npz"


def part_settings(method_names: list[str], seeds: list[int], model: str) -> dict:
    """What a kept subject must have been made with to be reused: each method's recipe (its preset's values too),
    the seeds, the model, and the references, resolution, templates and prompts; as JSON gives it back."""
    from core.lab import evaluation
    from core.trainer import PRESETS

    methods = {n: {**asdict(evaluation.METHODS[n]), "preset_values": PRESETS.get(evaluation.METHODS[n].preset or "")}
               for n in method_names}
    settings = {
        "methods": methods, "seeds": seeds, "model": model, "references": evaluation.REFERENCES,
        "resolution": evaluation.RESOLUTION, "templates": evaluation.TEMPLATES,
        "prompts": [evaluation.PLAIN_PROMPTS, evaluation.EDIT_PROMPTS],
    }
    return json.loads(json.dumps(settings))


def _save_part(out: Path, index: int, settings: dict, result: tuple[list[dict], dict[str, np.ndarray]]) -> None:
    """Keep one finished subject: its rows, settings and commit, and its pictures, in one file written atomically."""
    from core.files import atomic_write

    rows, pictures = result
    path = _part_path(out, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(pictures)
    part = json.dumps({"settings": settings, "commit": _commit(), "pictures": names, "rows": rows})

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(handle, part=np.array(part), **{f"picture_{k}": pictures[n] for k, n in enumerate(names)})

    atomic_write(path, write, overwrite=True)


def _load_part(out: Path, index: int, settings: dict) -> tuple[list[dict], dict[str, np.ndarray], str] | None:
    """A subject kept by an earlier run with the same settings, as (rows, pictures, its commit), or None."""
    path = _part_path(out, index)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as arrays:
        part = json.loads(str(arrays["part"]))
        if part["settings"] != settings:
            return None
        pictures = {name: arrays[f"picture_{k}"] for k, name in enumerate(part["pictures"])}
    return part["rows"], pictures, part["commit"]


def run_subjects(
    out: Path, subjects: int, method_names: list[str], seeds: list[int], model: str, workers: int
) -> tuple[list[tuple[list[dict], dict[str, np.ndarray]]], list[int]]:
    """Every subject's rows and pictures (kept parts of an earlier run with these settings, the rest computed, each
    kept as it finishes) and the kept subjects. A failed subject stops the queued ones; those running still finish
    and are kept, then the first error is raised."""
    settings = part_settings(method_names, seeds, model)
    results = {}
    for index in range(subjects):
        if (part := _load_part(out, index, settings)) is not None:
            results[index] = part[:2]
            print(f"subject {index}: kept from an earlier run (commit {part[2]})", flush=True)
    missing = [i for i in range(subjects) if i not in results]
    error: BaseException | None = None
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_subject_rows, (i, method_names, seeds, model)): i for i in missing}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            if future.exception() is not None:
                error = error or future.exception()
                for other in futures:
                    other.cancel()
                continue
            results[futures[future]] = future.result()
            _save_part(out, futures[future], settings, results[futures[future]])
    if error is not None:
        raise error
    return [results[i] for i in range(subjects)], sorted(set(range(subjects)) - set(missing))


def remove_parts(out: Path) -> None:
    """Remove the kept subjects (and temp files a stopped write left) once the table is written."""
    folder = _part_path(out, 0).parent
    if not folder.is_dir():
        return
    for path in [*folder.glob(PART_GLOB), *folder.glob(".subject-*.npz.*.tmp")]:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


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
             f"{report['wall_seconds'] / 60:.1f} min this run" + \
             (f" (subjects {kept} kept from an earlier run)" if kept else "") + "\n\n"
    args.out.with_suffix(".md").write_text(header + text + "\n")
    picture(results[0][1], args.methods, args.out.with_suffix(".png"))
    remove_parts(args.out)
    print(header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
