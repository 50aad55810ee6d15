"""The likeness lab's tables from one or more runs of benchmarks.likeness, joined by method:

    python -m benchmarks.likeness_tables benchmarks/results/likeness.json benchmarks/results/likeness_ti5000.json

Prints markdown: where each run came from; the methods' table; each method against the class word and against a
reference method (default Cross-Init 320), subject by subject (mean difference and on how many subjects it is
higher); likeness per subject; editability per edit prompt. A method in two runs takes the later file's rows.
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
    """(the runs' headers, every row, the method names in first-seen order); a later file's method replaces an
    earlier one's."""
    headers, rows_by_method = [], {}
    for path in paths:
        report = json.loads(path.read_text())
        headers.append({"file": str(path), **{k: v for k, v in report.items() if k != "rows"}})
        fresh: dict[str, list[dict]] = {}
        for row in report["rows"]:
            fresh.setdefault(row["method"], []).append(row)
        rows_by_method.update(fresh)
    names = list(rows_by_method)
    return headers, [row for name in names for row in rows_by_method[name]], names


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


def tables(paths: Sequence[Path], reference: str = "Cross-Init 320") -> str:
    """Every table, as markdown."""
    headers, rows, names = load_runs(paths)
    sources = [f"- `{h['file']}`: `{h['command']}`, {h['date']}, commit {h['commit']}, {h['machine']}, "
               f"{h['wall_seconds'] / 60:.1f} min" + (f" (subjects {h['kept_subjects']} from an earlier run)"
                                                      if h.get("kept_subjects") else "") for h in headers]
    against = [m for m in ("class word", reference) if m in names]
    return "\n\n".join([
        "Runs:\n\n" + "\n".join(sources),
        table(rows, names),
        "Subject by subject:\n\n" + paired_table(rows, names, against),
        "Likeness per subject (all pictures):\n\n" + per_subject_table(rows, names),
        "Editability per edit prompt (share of the prompt's attributes realised):\n\n" + per_prompt_table(rows, names),
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
