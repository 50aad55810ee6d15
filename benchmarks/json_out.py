"""Benchmark results written as JSON atomically, so a run killed mid-write leaves the previous complete file."""

from __future__ import annotations

import json
from pathlib import Path

from core.files import atomic_write


def write_json(path: str | Path, data: object) -> None:
    """Replace path with data as indented JSON (values JSON cannot hold are written as strings)."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8"), True)
