"""The command line's face-aware parts: --face-loss, --stages and --face-crop for `train`, and the `export` command."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError
from .faces import crop_faces
from .sefi import DEFAULT_REFERENCE_WORD, DEFAULT_WEIGHT, FACE_LOSS_MODES, FaceLoss
from .stages import DEFAULT_STAGES

FACE_CROP_SIZE = 1024  # crops are made at this size (or --resolution), then resized to the training resolution
FLAGS = {"face loss weight": "--face-loss-weight", "face loss layers": "--face-loss-layers",
         "reference word": "--reference-word", "face loss": "--face-loss"}  # core's input names -> the flags


def add_face_arguments(p: argparse.ArgumentParser) -> None:
    """--face-loss, --face-loss-weight, --face-loss-layers, --reference-word, --stages and --face-crop."""
    p.add_argument(
        "--face-loss", choices=FACE_LOSS_MODES,
        help="SeFi-IDE-style face-wise attention loss: mask (attention inside the face mask; needs --face-crop) or "
        f"reference (attention like the class word's, --reference-word, default '{DEFAULT_REFERENCE_WORD}')",
    )
    p.add_argument("--face-loss-weight", type=float, default=DEFAULT_WEIGHT, help=f"its weight (default {DEFAULT_WEIGHT})")
    p.add_argument("--face-loss-layers", choices=("default", "all"), default="default",
                   help="cross-attention layers it uses: default (a quarter of the latent size) or all")
    p.add_argument("--reference-word", default=DEFAULT_REFERENCE_WORD, help="one-token class word of the reference mode")
    p.add_argument(
        "--stages", type=int, nargs="?", const=DEFAULT_STAGES, default=None,
        help=f"per-stage key/value tokens over the timesteps (alone: {DEFAULT_STAGES}, SeFi-IDE's); the file then "
        "needs Apply Identity's MODEL in ComfyUI, and `export` makes a plain (lossy) copy for other tools",
    )
    p.add_argument("--face-crop", action="store_true",
                   help="crop each photo to its largest face (OpenCV, offline) and use soft face masks")


def face_loss_setting(args: argparse.Namespace) -> FaceLoss | None:
    """The face loss the flags ask for (checked), or None."""
    if args.face_loss is None:
        return None
    setting = FaceLoss(args.face_loss, args.face_loss_weight, args.face_loss_layers, args.reference_word.strip())
    try:
        return setting.check()
    except InputError as error:
        name, _, rest = str(error).partition(":")
        raise InputError(f"{FLAGS.get(name, name)}:{rest}") from None


def check_face_arguments(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, refused before the model loads."""
    face_loss_setting(args)
    if args.face_loss == "mask" and not args.face_crop:
        raise InputError(
            "--face-loss mask: it needs a face mask per photo; add --face-crop (the photos are cropped to their faces "
            "and soft masks made), or use --face-loss reference, which needs no mask"
        )
    if args.stages is not None and args.stages < 1:
        raise InputError(f"--stages: got {args.stages}; use 1 or more ({DEFAULT_STAGES} is SeFi-IDE's), or leave it out")
    if args.stages is not None and args.steps is not None and args.stages > args.steps:
        raise InputError(f"--stages: {args.stages} stages but only {args.steps} --steps; use at most {args.steps} stages")
    if args.stages is not None and args.legacy_pt:
        raise InputError("--legacy-pt: a per-stage identity has no A1111 layout; drop --legacy-pt, or --stages")


def crop_pictures(pictures: list[Image.Image], names: list[str], size: int) -> tuple[list[Image.Image], torch.Tensor]:
    """Face crops of the photos (size x size) and their soft masks (N, 1, size, size); no face is an error."""
    crops = crop_faces([np.asarray(p, dtype=np.float32) / 255.0 for p in pictures], size=size, names=names)
    images = [Image.fromarray((np.clip(c.image, 0, 1) * 255).round().astype(np.uint8)) for c in crops]
    masks = torch.stack([torch.from_numpy(np.ascontiguousarray(c.mask, dtype=np.float32)) for c in crops]).unsqueeze(1)
    return images, masks


def masks_at(masks: torch.Tensor | None, resolution: int) -> torch.Tensor | None:
    """Square face masks resized to the training resolution."""
    if masks is None:
        return None
    return F.interpolate(masks, size=(resolution, resolution), mode="area")


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Arguments of `export`."""
    p = sub.add_parser(
        "export", help="write a plain (lossy) embedding from a per-stage identity",
        description=(
            "Write a plain one-vector-per-token embedding (loads in stock ComfyUI, A1111 and diffusers) from a "
            "per-stage (SeFi-IDE-style) identity. It is lossy: only the middle stage's value token is kept, so there "
            "is no key/value split and no stages."
        ),
    )
    p.add_argument("file", type=Path, help="a per-stage identity .safetensors")
    p.add_argument("--out", required=True, type=Path, help="the plain file to write, e.g. out/alice-plain.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")


def run_export(args: argparse.Namespace) -> int:
    """Write the lossy plain export of a per-stage identity file."""
    from .files import check_output_path
    from .formats import load_identity, save_identity
    from .identity import plain_export

    if args.out.suffix != ".safetensors":
        raise InputError(f"--out: '{args.out}' must end in .safetensors")
    check_output_path(args.out, args.overwrite)
    identity = load_identity(args.file)
    plain = plain_export(identity)
    written = save_identity(plain, args.out, token=args.out.stem, overwrite=args.overwrite)
    print(f"wrote {written} (lossy: the middle stage's value token only)")
    print(f"use it in ComfyUI as 'embedding:{written.stem}' after copying it into models/embeddings")
    return 0
