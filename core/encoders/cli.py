"""Command line for the encoder: `train-encoder` trains one, `encode` turns photos into an identity file with one.

Both run under torchrun as well as alone: `torchrun --nproc_per_node N -m core train-encoder ...` splits every batch
over N processes (GPUs, or CPU processes with gloo); several machines add torchrun's --nnodes/--rdzv-* options.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import InputError
from ..templates import TEMPLATE_KINDS
from .data import EncoderData
from .vision import VisionSpec, VisionTower

LAB = "lab"


def encoder_path(value: str | Path) -> Path:
    """--encoder: 'lab' is the pack's encoder for the lab model, anything else a file."""
    from ..lab.vision import LAB_ENCODER

    return LAB_ENCODER if str(value) == LAB else Path(value)


def vision_tower(value: str | None, wanted: VisionSpec | None = None, device: torch.device | None = None) -> VisionTower:
    """--vision: 'lab' (the lab's tower), a local CLIPVisionModel folder, or None: the lab's when wanted names it."""
    from ..lab.vision import NAME as LAB_TOWER
    from ..lab.vision import load_tower
    from .vision import load_transformers_tower

    if value is None:
        if wanted is None or wanted.name != LAB_TOWER:
            where = "" if wanted is None else f" the encoder was trained with {wanted.describe()};"
            raise InputError(f"--vision:{where} give that CLIPVisionModel's local folder (config.json + weights)")
        value = LAB
    tower = load_tower() if value == LAB else load_transformers_tower(Path(value))
    if device is not None:
        tower.model.to(device)
    return tower


def training_data(value: str, resolution: int, templates: str, source_size: int | None = None) -> EncoderData:
    """--data: 'lab' (the lab world's people) or a folder of identity folders (photos kept at source_size)."""
    from ..templates import training_prompts
    from .data import FolderData, LabData

    if value == LAB:
        return LabData()
    return FolderData(Path(value), resolution, training_prompts(templates), source_size)


def add_encoder_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `train-encoder` and `encode` to a `python -m core` parser's subcommands."""
    from .train import EncoderTrainConfig

    defaults = EncoderTrainConfig()
    p = sub.add_parser(
        "train-encoder",
        help="train an identity encoder (photo -> identity in one forward pass) for a model",
        description=(
            "Train the mapper of an identity encoder on identity folders (DATA/<identity>/<two or more photos>, "
            "optional photo.txt captions and photo.mask.png loss masks) or the lab world, with the model and the "
            "vision tower frozen. Checkpoints go to OUT's .run folder (--resume continues exactly); the encoder file "
            "is written when the steps are done. Under torchrun every batch is split over the processes."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="the encoder file, e.g. encoders/mine.safetensors")
    p.add_argument("--model", default=LAB, help="the model it encodes for: a checkpoint, a diffusers folder, or lab")
    p.add_argument("--data", default=LAB, help="a folder of identity folders, or lab (the lab world's people)")
    p.add_argument("--vision", help="the vision tower: a local CLIPVisionModel folder, or lab (default with --model lab)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch, help="global batch, split over the processes")
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--tokens", type=int, dest="n_tokens", default=defaults.n_tokens, help="rows per identity")
    p.add_argument("--hidden", type=int, default=defaults.hidden, help="the mapper's width per tower layer")
    p.add_argument("--identity-weight", type=float, default=defaults.identity_weight,
                   help="weight of the identity-preservation term (0: off, no VAE decode)")  # fmt: skip
    p.add_argument("--offset-l1", type=float, default=defaults.offset_l1, help="weight of the L1 penalty on the rows' offset")
    p.add_argument("--resolution", type=int, help="diffusion target size (default: the model's native size)")
    p.add_argument("--templates", choices=TEMPLATE_KINDS,
                   help="captions for photos without a .txt (default: the model's: lab on the lab model, else face)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="linear learning-rate warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun each process takes LOCAL_RANK)")
    p.add_argument("--run-dir", type=Path, help="checkpoint folder (default: OUT with .run instead of .safetensors)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder (--steps may grow)")
    p.add_argument("--minutes", type=float, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an existing encoder file at the end")

    p = sub.add_parser(
        "encode",
        help="turn photos of one subject into an identity file with an encoder (one forward pass, no training)",
        description="Encode photos with an identity encoder into an identity .safetensors (the mean over the photos).",
    )
    p.add_argument("--encoder", required=True, help="an encoder file, or lab (the pack's encoder for the lab model)")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders; lab-sample on the lab model")
    p.add_argument("--out", type=Path, required=True, help="the identity file, e.g. out/alice.safetensors")
    p.add_argument("--vision", help="the vision tower the encoder names: a CLIPVisionModel folder (lab's is found)")
    p.add_argument("--token", help="placeholder name stored in the file (default: <file stem>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run_train_encoder(args: argparse.Namespace) -> int:
    """Check, load, train with progress lines on stderr, write the encoder."""
    from ..distributed import local_device
    from ..files import check_output_path, make_parent
    from ..models import check_model_spec, default_resolution, default_templates, load_model, resolve_device
    from .train import EncoderTrainConfig, run_folder, train_encoder

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise InputError(f"--out: an encoder is saved as .safetensors, got '{out.name}'")
    check_output_path(make_parent(out), args.overwrite)
    check_model_spec(args.model)
    config = EncoderTrainConfig(
        steps=args.steps, batch=args.batch, learning_rate=args.learning_rate, n_tokens=args.n_tokens,
        hidden=args.hidden, identity_weight=args.identity_weight, offset_l1=args.offset_l1, seed=args.seed,
        resolution=args.resolution or 1, warmup=args.warmup,
    )
    config.check()
    if args.checkpoint_every < 1:
        raise InputError(f"--checkpoint-every: got {args.checkpoint_every}; it must be at least 1")
    if args.data != LAB and not Path(args.data).is_dir():
        raise InputError(f"--data: {args.data} is not a folder; give a folder of identity folders, or lab")
    device = local_device(resolve_device(args.device))
    tower = vision_tower(args.vision if args.vision or args.model != LAB else LAB, device=device)
    model = load_model(args.model, device)
    config = replace(config, resolution=args.resolution or default_resolution(model))
    data = training_data(args.data, config.resolution, args.templates or default_templates(model) or "face",
                         tower.spec.image_size)
    folder = args.run_dir or run_folder(out)
    print(f"training an encoder for {model.name} ({model.family}) on {data.description}, tower "
          f"{tower.spec.describe()}, {config.steps} steps of {config.batch}, run folder {folder}", file=sys.stderr)

    def on_step(step: int, total: int, values: dict[str, float]) -> None:
        if step % 10 == 0 or step == total:
            terms = " ".join(f"{k} {v:.4f}" for k, v in values.items())
            print(f"step {step}/{total} {terms}", file=sys.stderr, flush=True)

    run = train_encoder(model, tower, data, config, out, folder, resume=args.resume, overwrite=args.overwrite,
                        minutes=args.minutes, checkpoint_every=args.checkpoint_every, on_step=on_step)
    if run.rank != 0:
        return 0
    if run.step < config.steps:
        print(f"stopped at step {run.step}/{config.steps}; checkpoint in {folder}, continue with --resume",
              file=sys.stderr)
        return 3
    print(f"wrote {out}")
    return 0


def load_encoder_and_tower(encoder_file: str | Path, vision: str | None):  # noqa: ANN201
    """(IdentityEncoder, VisionTower) for --encoder and --vision, on the CPU; load once, encode many."""
    from .files import load_encoder

    encoder = load_encoder(encoder_path(encoder_file))
    return encoder, vision_tower(vision, encoder.spec.vision)


def encode_pictures(encoder, tower: VisionTower, pictures: list, token: str):  # noqa: ANN001, ANN201
    """The Identity of PIL pictures of one subject (any sizes)."""
    import numpy as np

    from .data import to_unit
    from .mapper import encode_photos

    return encode_photos(encoder, tower, [to_unit([np.asarray(p.convert("RGB"))]) for p in pictures], token)


def run_encode(args: argparse.Namespace) -> int:
    """Encode the photos, write the identity."""
    from ..cli import _image_sources, _token
    from ..files import check_output_path, make_parent
    from ..formats import save_identity
    from ..images import list_image_paths, load_image

    check_output_path(make_parent(Path(args.out)), args.overwrite)
    token = _token(args)
    pictures = [load_image(p) for p in list_image_paths(_image_sources(args.images))]
    encoder, tower = load_encoder_and_tower(args.encoder, args.vision)
    identity = encode_pictures(encoder, tower, pictures, token)
    path = save_identity(identity, Path(args.out), token=token, overwrite=args.overwrite)
    print(f"wrote {path} ({len(pictures)} photo(s) through {encoder_path(args.encoder).name}, "
          f"{encoder.spec.n_tokens} token(s) for {encoder.spec.family})")
    return 0
