"""Command line: `python -m core train` makes an identity file from photos; `python -m core inspect` describes one."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError
from .trainer import PRESETS, TrainResult

EXIT_INPUT, EXIT_STOPPED, EXIT_INTERRUPTED = 2, 3, 130


def _train_parser(sub: argparse._SubParsersAction) -> None:
    """Arguments of `train`."""
    p = sub.add_parser(
        "train",
        help="train an identity from photos",
        description=(
            "Train an identity (a few token vectors) from photos of one subject and write it as a .safetensors "
            "embedding that ComfyUI (embedding:NAME), A1111 and diffusers load. A loss-curve PNG is written beside it."
        ),
    )
    p.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="image files or folders of them; 'sample' uses the bundled public-domain astronaut photo",
    )
    p.add_argument("--out", required=True, type=Path, help="output file, e.g. out/alice.safetensors")
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (random weights, learns nothing pictorial), "
        "tiny-sd2, tiny-sdxl, a diffusers folder, or a .safetensors checkpoint",
    )
    p.add_argument("--preset", default="cross_init", choices=sorted(PRESETS), help="method and its reference defaults")
    p.add_argument("--token", help="placeholder name stored in the file (default: <file stem>)")
    p.add_argument("--steps", type=int, help="optimisation steps (preset default)")
    p.add_argument("--batch-size", type=int, help="images per step (preset default)")
    p.add_argument("--lr", type=float, dest="learning_rate", help="learning rate (preset default)")
    p.add_argument("--scale-lr", action="store_true", default=None, help="multiply the learning rate by the batch size")
    p.add_argument("--tokens", type=int, dest="n_tokens", help="vectors in the identity (preset default)")
    p.add_argument("--init", choices=["celebrity", "words", "word"], help="initialisation (preset default)")
    p.add_argument("--init-text", help="init words for --init words, or the one-token word for --init word")
    p.add_argument("--init-from", type=Path, help="start from an identity file (any layout) instead of --init")
    p.add_argument("--reg-weight", type=float, help="Cross-Init regulariser weight (preset default 1e-5)")
    p.add_argument("--resolution", type=int, help="training resolution (default: the model's native size)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same identity")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--legacy-pt", action="store_true", help="also write an A1111-style .pt beside the file")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m core` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m core", description="Identity Tokens: train and inspect identities")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("inspect", help="describe an identity file")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _output_paths(args: argparse.Namespace) -> dict[str, Path]:
    """Every file train will write, checked before any work starts."""
    from .files import check_output_path

    out: Path = args.out
    if out.suffix != ".safetensors":
        raise InputError(f"--out: '{out}' must end in .safetensors (the format every tool loads)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(
            f"--out: cannot create folder {out.parent} ({error.strerror}); choose a writable folder"
        ) from None
    paths = {"identity": out, "curve": out.with_suffix(".loss.png")}
    if args.legacy_pt:
        paths["legacy"] = out.with_suffix(".pt")
    for path in paths.values():
        check_output_path(path, args.overwrite)
    return paths


def _image_sources(values: Sequence[str]) -> list[Path]:
    """Paths from --images, with 'sample' meaning the bundled astronaut photo."""
    from .images import sample_photo_path

    return [sample_photo_path() if v == "sample" else Path(v) for v in values]


def _save(result: TrainResult, args: argparse.Namespace, paths: dict[str, Path], token: str) -> list[Path]:
    """Write the identity (or its partial rows), the loss curve and the optional .pt."""
    from .formats import save_a1111_pt, save_identity
    from .plot import loss_curve_png

    identity_path = paths["identity"]
    if result.stopped:
        identity_path = identity_path.with_name(identity_path.stem + ".partial.safetensors")
    written = [save_identity(result.identity, identity_path, token=token, overwrite=args.overwrite)]
    title = f"{token}: loss per step" + (f" (stopped: {result.stopped})" if result.stopped else "")
    loss_curve_png(result.losses, paths["curve"], title=title)
    written.append(paths["curve"])
    if "legacy" in paths and not result.stopped:
        written.append(
            save_a1111_pt(result.identity, paths["legacy"], name=token.strip("<>"), overwrite=args.overwrite)
        )
    return written


def run_train(args: argparse.Namespace) -> int:
    """Load, validate, train with a progress bar, save; returns the exit code."""
    from tqdm import tqdm

    from .images import load_training_images
    from .models import default_resolution, load_model, resolve_device
    from .trainer import Trainer, preset_config

    paths = _output_paths(args)
    token = args.token or f"<{args.out.stem}>"
    sources = _image_sources(args.images)
    model = load_model(args.model, resolve_device(args.device))
    resolution = args.resolution or default_resolution(model)
    config = preset_config(
        args.preset,
        token=token,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        scale_lr=args.scale_lr,
        n_tokens=args.n_tokens,
        init=args.init,
        init_text=args.init_text,
        reg_weight=args.reg_weight,
        resolution=resolution,
        seed=args.seed,
        flip_p=0.0 if args.no_flip else None,
    )
    images = load_training_images(sources, resolution)
    start = None
    if args.init_from is not None:
        from .formats import load_identity

        start = load_identity(args.init_from)
    trainer = Trainer(model, images, config, init=start)
    print(
        f"training {token} on {model.name} ({model.family}), {images.shape[0]} image(s) at {resolution}px, "
        f"{config.n_tokens} token(s), {config.steps} steps, device {model.denoiser.device}",
        file=sys.stderr,
    )
    with tqdm(total=config.steps, desc="training", unit="step") as bar:

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}")

        result = trainer.run(on_step=on_step)
    written = _save(result, args, paths, token)
    for path in written:
        print(f"wrote {path}")
    if result.stopped == "interrupted":
        print(
            f"interrupted after {trainer.steps_done} steps; the rows so far are in {written[0]} (marked partial)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if result.stopped:
        print(
            f"training stopped: {result.stopped}. The last good rows are in {written[0]} (marked partial); "
            "lower --lr or check the images and model",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    print(f"use it in ComfyUI as 'embedding:{args.out.stem}' after copying it into models/embeddings")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Print what an identity file holds."""
    from .formats import describe_identity_file

    info = describe_identity_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['path']}: {info['layout']} layout, {info['file_size']} bytes, {info['n_tokens']} token(s)")
    for key in info["encoders"]:
        norms = ", ".join(f"{n:.3f}" for n in info["row_norms"][key])
        print(f"  {key}: width {info['widths'][key]}, row norms [{norms}]")
    for key, value in sorted(info["metadata"].items()):
        print(f"  {key} = {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user mistakes print one clear line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return run_train(args) if args.command == "train" else run_inspect(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT
