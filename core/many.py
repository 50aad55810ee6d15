"""`train-many`: many identities from a manifest, spread over torchrun's processes (each trains every N-th entry).

The manifest is JSON Lines, one identity per line, paths relative to the manifest's folder:
    {"images": "photos/alice", "out": "ids/alice.safetensors"}
    {"images": ["a.png", "b.png"], "out": "ids/bob.safetensors", "preset": "cross_init_fast", "seed": 3}
Optional keys: preset, steps, seed, token (default <out stem>). Every entry is checked before any training; an entry
whose output exists is skipped (so a stopped job is simply run again) unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .prompts import check_trigger
from .trainer import PRESETS

KEYS = {"images", "out", "preset", "steps", "seed", "token"}


@dataclass(frozen=True)
class Entry:
    """One identity to train."""

    line: int
    images: tuple[Path, ...]
    out: Path
    preset: str
    steps: int | None
    seed: int
    token: str


def read_manifest(path: Path, default_preset: str) -> list[Entry]:
    """Every entry of a JSON Lines manifest, checked; errors name the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--manifest: {path} not found; give a JSON Lines file, one identity per line")
    entries, outs = [], {}
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        where = f"--manifest {path.name} line {number}"
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: not JSON ({error.msg}); write one {{...}} object per line") from None
        if not isinstance(values, dict) or "images" not in values or "out" not in values:
            raise InputError(f'{where}: needs "images" and "out", e.g. {{"images": "photos/alice", "out": "alice.safetensors"}}')
        unknown = sorted(set(values) - KEYS)
        if unknown:
            raise InputError(f"{where}: unknown keys {unknown}; use {sorted(KEYS)}")
        images = values["images"] if isinstance(values["images"], list) else [values["images"]]
        out = path.parent / str(values["out"])
        if out.suffix != ".safetensors":
            raise InputError(f"{where}: out '{values['out']}' must end in .safetensors")
        if out in outs:
            raise InputError(f"{where}: out '{values['out']}' is also line {outs[out]}'s; give each identity its own file")
        outs[out] = number
        preset = str(values.get("preset", default_preset))
        if preset not in PRESETS:
            raise InputError(f"{where}: unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
        steps = values.get("steps")
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise InputError(f"{where}: steps {steps!r} must be a whole number of at least 1")
        token = check_trigger(str(values.get("token", f"<{out.stem}>")), f"{where}: token")
        entries.append(Entry(number, tuple(path.parent / str(i) for i in images), out, preset, steps,
                             int(values.get("seed", 0)), token))
    if not entries:
        raise InputError(f"--manifest: {path} has no entries; write one JSON object per line")
    return entries


def add_many_parser(sub: argparse._SubParsersAction) -> None:
    """Add `train-many` to a `python -m core` parser's subcommands."""
    p = sub.add_parser(
        "train-many",
        help="train many identities from a manifest (under torchrun, spread over the processes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--manifest", type=Path, required=True, help="JSON Lines: one identity per line")
    p.add_argument("--model", required=True, help="a checkpoint, a diffusers folder, lab, or tiny")
    p.add_argument("--preset", default="cross_init", choices=sorted(PRESETS), help="for entries that name none")
    p.add_argument("--init-encoder", help="start each identity from an encoder (a file, or lab)")
    p.add_argument("--vision", help="with --init-encoder: the vision tower folder it names (the lab's is found)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun each process takes LOCAL_RANK)")
    p.add_argument("--overwrite", action="store_true", help="train entries whose output exists again")


def run_train_many(args: argparse.Namespace) -> int:
    """Check the whole manifest, then train this process's share of it."""
    from .distributed import local_device, process_group
    from .files import make_parent
    from .formats import save_identity
    from .images import list_image_paths, load_image
    from .models import check_model_spec, default_resolution, default_templates, load_model, resolve_device

    entries = read_manifest(args.manifest, args.preset)
    check_model_spec(args.model)
    photos = {}
    for entry in entries:
        try:
            photos[entry.line] = list_image_paths(list(entry.images))
        except InputError as error:
            raise InputError(f"--manifest line {entry.line}: {error}") from None
    device = local_device(resolve_device(args.device))
    rank, world = process_group(device)
    mine = [e for i, e in enumerate(entries) if i % world == rank]
    todo = [e for e in mine if args.overwrite or not e.out.exists()]
    for entry in mine:
        if entry not in todo:
            print(f"[{rank}] line {entry.line}: {entry.out} exists, skipped (--overwrite trains it again)", file=sys.stderr)
    if not todo:
        return 0
    model = load_model(args.model, device)
    from .encoders.cli import encode_pictures, load_encoder_and_tower
    from .images import images_to_tensor
    from .trainer import Trainer, preset_config

    encoding = None if args.init_encoder is None else load_encoder_and_tower(args.init_encoder, args.vision)
    resolution = default_resolution(model)
    for entry in todo:
        pictures = [load_image(p) for p in photos[entry.line]]
        start = None
        if args.init_encoder is not None:
            start = encode_pictures(*encoding, pictures, entry.token)
        config = preset_config(entry.preset, token=entry.token, steps=entry.steps, seed=entry.seed,
                               resolution=resolution, templates=default_templates(model), attention_maps=False)
        result = Trainer(model, images_to_tensor(pictures, resolution), config, init=start).run()
        if result.stopped:
            print(f"[{rank}] line {entry.line}: stopped ({result.stopped}); nothing written", file=sys.stderr)
            return 3
        make_parent(entry.out, f"--manifest line {entry.line}: out")
        save_identity(result.identity, entry.out, token=entry.token, overwrite=args.overwrite)
        print(f"[{rank}] line {entry.line}: wrote {entry.out} ({config.steps} steps, loss {result.losses[-1]:.4f})")
    return 0
