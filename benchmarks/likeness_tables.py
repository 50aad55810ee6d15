"""The likeness lab's tables from one or more runs of benchmarks.likeness, joined by method, subject and seed:

    python -m benchmarks.likeness_tables benchmarks/results/likeness.json benchmarks/results/likeness_ti5000.json

Prints markdown: where each run came from; the methods' table; each method against the class word and against a
reference method (default Cross-Init 320), subject by subject (mean difference and on how many subjects it is
higher); likeness per subject; editability per edit prompt; for methods trained with several seeds, the spread
over subjects against the spread over training seeds. Rows are keyed by (method, subject, training seed): a later
file's row replaces an earlier one's with the same key, and other seeds add to it, so a run with `--seeds 1` joins
one with `--seeds 0`. A later run that covers fewer subjects replaces only those: the earlier run's other subjects
stay in the tables (the runs list names every file read). The methods' table averages every row (a subject with
more seeds weighs more); the paired and per-subject tables average each subject's seeds first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.likeness import table


def load_runs(paths: Sequence[Path]) -> tuple[list[dict], list[dict], list[str]]:
    """(the runs' headers, every row, the method names in first-seen order); a later file's row replaces an earlier
    one's with the same method, subject and training seed."""
    headers, rows_by_key = [], {}
    for path in paths:
        report = json.loads(path.read_text())
        headers.append({"file": str(path), **{k: v for k, v in report.items() if k != "rows"}})
        for row in report["rows"]:
            row = {"seed": 0, **row}  # runs before training seeds were recorded trained with seed 0
            rows_by_key[(row["method"], int(row["subject"]), int(row["seed"]))] = row
    names = list(dict.fromkeys(method for method, _, _ in rows_by_key))
    rows = sorted(rows_by_key.values(), key=lambda r: (names.index(r["method"]), int(r["subject"]), int(r["seed"])))
    return headers, rows, names


def _by_subject(rows: Sequence[dict], method: str, key: str) -> dict[int, float]:
    """Per subject, the mean of key over the method's rows (its training seeds)."""
    values: dict[int, list[float]] = {}
    for row in rows:
        if row["method"] == method:
            values.setdefault(int(row["subject"]), []).append(float(row[key]))
    return {subject: float(np.mean(v)) for subject, v in sorted(values.items())}


def paired_table(rows: Sequence[dict], names: Sequence[str], against: Sequence[str], key: str = "likeness") -> str:
    """Each method minus each of the `against` methods, over the subjects both have: mean difference, higher on k/n."""
    header = " | ".join(f"{key} − {other} (higher on)" for other in against)
    lines = [f"| method | {header} |", "|---|" + "---|" * len(against)]
    for name in names:
        mine = _by_subject(rows, name, key)
        cells = []
        for other in against:
            theirs = _by_subject(rows, other, key)
            shared = [s for s in mine if s in theirs]
            if name == other or not shared:
                cells.append("")
                continue
            difference = np.array([mine[s] - theirs[s] for s in shared])
            cells.append(f"{difference.mean():+.3f} ({int((difference > 0).sum())}/{len(shared)})")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def per_subject_table(rows: Sequence[dict], names: Sequence[str], key: str = "likeness") -> str:
    """key per method and subject (mean over training seeds)."""
    subjects = sorted({int(r["subject"]) for r in rows})
    lines = ["| subject | " + " | ".join(str(s) for s in subjects) + " |", "|---|" + "---|" * len(subjects)]
    for name in names:
        mine = _by_subject(rows, name, key)
        lines.append(f"| {name} | " + " | ".join(f"{mine[s]:.3f}" if s in mine else "" for s in subjects) + " |")
    return "\n".join(lines)


def per_prompt_table(rows: Sequence[dict], names: Sequence[str]) -> str:
    """Editability per edit prompt: per method, the mean over its rows."""
    prompts = list(next(r["per_prompt"] for r in rows if r.get("per_prompt")))
    short = [p.replace("a photo of {} ", "") for p in prompts]
    lines = ["| method | " + " | ".join(short) + " |", "|---|" + "---|" * len(prompts)]
    for name in names:
        chosen = [r["per_prompt"] for r in rows if r["method"] == name]
        lines.append(f"| {name} | " + " | ".join(f"{np.mean([c[p] for c in chosen]):.2f}" for p in prompts) + " |")
    return "\n".join(lines)


def seed_spread_table(rows: Sequence[dict], names: Sequence[str]) -> str:
    """For methods with several training seeds on a subject: the standard deviation over subjects (of each subject's
    seed mean; "—" for one subject) beside the one over training seeds (within a subject, root mean square over
    subjects); subjects with one seed are left out of both."""
    lines = ["| method | seeds | subjects | likeness: over subjects | likeness: over seeds | "
             "editability: over subjects | editability: over seeds |", "|---|---|---|---|---|---|---|"]
    for name in names:
        per_subject: dict[int, list[dict]] = {}
        for row in rows:
            if row["method"] == name:
                per_subject.setdefault(int(row["subject"]), []).append(row)
        repeated = {s: group for s, group in per_subject.items() if len(group) > 1}
        if not repeated:
            continue
        cells = []
        for key in ("likeness", "editability"):
            means = [np.mean([float(r[key]) for r in group]) for group in repeated.values()]
            within = [np.var([float(r[key]) for r in group], ddof=1) for group in repeated.values()]
            over_subjects = f"{float(np.std(means, ddof=1)):.3f}" if len(means) > 1 else "—"
            cells += [over_subjects, f"{float(np.sqrt(np.mean(within))):.3f}"]
        seeds = sorted({int(r["seed"]) for group in repeated.values() for r in group})
        lines.append(f"| {name} | {', '.join(map(str, seeds))} | {len(repeated)} | {' | '.join(cells)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def tables(paths: Sequence[Path], reference: str = "Cross-Init 320") -> str:
    """Every table, as markdown."""
    headers, rows, names = load_runs(paths)
    sources = [f"- `{h['file']}`: `{h['command']}`, {h['date']}, commit {h['commit']}, {h['machine']}, "
               f"{h['wall_seconds'] / 60:.1f} min" + (f" (subjects {h['kept_subjects']} from an earlier run)"
                                                      if h.get("kept_subjects") else "") for h in headers]
    against = [m for m in ("class word", reference) if m in names]
    spread = seed_spread_table(rows, names)
    return "\n\n".join([
        "Runs:\n\n" + "\n".join(sources),
        table(rows, names),
        "Subject by subject:\n\n" + paired_table(rows, names, against),
        "Likeness per subject (all pictures):\n\n" + per_subject_table(rows, names),
        "Editability per edit prompt (share of the prompt's attributes realised):\n\n" + per_prompt_table(rows, names),
        *(["Spread over subjects and over training seeds (standard deviations):\n\n" + spread] if spread else []),
    ])


def main(argv: list[str] | None = None) -> int:
    """Print the tables of the given runs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="OUT.json files of benchmarks.likeness")
    parser.add_argument("--reference", default="Cross-Init 320", help="the method each row is also compared with")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.is_file()]
    if missing:
        parser.error(f"runs: no such file {missing}; give OUT.json files that benchmarks.likeness wrote")
    print(tables(args.runs, args.reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
