"""Command line: `train` makes an identity file from photos, `inspect` describes one, `score` measures likeness,
`export` writes a plain copy of a per-stage identity, `train-encoder` and `encode` train and use an identity encoder,
`train-many` trains many identities from a manifest."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .encoders.cli import add_encoder_parsers, run_encode, run_train_encoder
from .errors import InputError
from .face_cli import (
    FACE_CROP_SIZE,
    add_export_parser,
    add_face_arguments,
    check_face_arguments,
    crop_pictures,
    face_loss_setting,
    masks_at,
    run_export,
)
from .identity import Identity
from .many import add_many_parser, run_train_many
from .memory import MEMORY_MODES
from .models import PREDICTION_TYPES
from .protocols import SLOT, Model
from .score import add_score_parser, run_score
from .templates import TEMPLATE_KINDS
from .trainer import OUT_OF_MEMORY, PRESETS, TrainResult

EXIT_INPUT, EXIT_STOPPED, EXIT_INTERRUPTED = 2, 3, 130
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds, like ComfyUI's seed widgets
log = logging.getLogger(__name__)


@dataclass
class TrainPlan:
    """Everything `train` checked before loading the model: outputs, token, device, photos, start identity."""

    paths: dict[str, Path]
    token: str
    device: torch.device
    pictures: list[Image.Image]
    start: Identity | None
    face_masks: torch.Tensor | None = None  # (N, 1, S, S) soft face masks of the --face-crop crops


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
        help="image files or folders of them; 'sample' uses the bundled public-domain astronaut photo, "
        "'lab-sample' the lab world's sample subject (4 pictures; with --model lab)",
    )
    p.add_argument("--out", required=True, type=Path, help="output file, e.g. out/alice.safetensors")
    p.add_argument(
        "--model",
        required=True,
        help="a .safetensors checkpoint (e.g. from ComfyUI's models/checkpoints), a diffusers folder, 'lab' (the "
        "pack's own small model of the lab world, 32 px) or a random-weight test model: tiny, tiny-sd2, tiny-sdxl",
    )
    p.add_argument(
        "--prediction-type",
        choices=["auto", *PREDICTION_TYPES],
        default="auto",
        help="what the UNet predicts; auto reads it from the model (SD2 v models are told from their weights)",
    )
    p.add_argument("--preset", default="cross_init", choices=sorted(PRESETS), help="method and its reference defaults")
    p.add_argument("--token", help="placeholder name stored in the file (default: <file stem>)")
    p.add_argument("--steps", type=int, help="optimisation steps (preset default)")
    p.add_argument("--batch-size", type=int, help="images per step (preset default)")
    p.add_argument(
        "--micro-batch-size",
        type=int,
        help="images per forward/backward pass, to fit a small GPU; the step is the same (default: the whole batch)",
    )
    p.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        default="auto",
        help="auto: on a GPU, estimate the peak and add gradient checkpointing, then micro-batches, only if needed; "
        "default: neither; checkpointing: always (slower, far less memory); low: checkpointing + micro-batch 1",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the UNet (faster steps on a GPU after a one-time compile; falls back to eager on failure)",
    )
    p.add_argument("--lr", type=float, dest="learning_rate", help="learning rate (preset default)")
    p.add_argument("--scale-lr", action="store_true", default=None, help="multiply the learning rate by the batch size")
    p.add_argument("--tokens", type=int, dest="n_tokens", help="vectors in the identity (preset default)")
    p.add_argument("--init", choices=["celebrity", "words", "word"], help="initialisation (preset default)")
    p.add_argument("--init-text", help="init words for --init words, or the one-token word for --init word")
    p.add_argument(
        "--templates",
        choices=TEMPLATE_KINDS,
        help="training captions: object ('a photo of a {}'), face ('... face of {} person') or lab (the lab world's "
        "'a photo of {}'); default: the preset's, lab on the lab model",
    )
    p.add_argument(
        "--sample-prompts",
        nargs="+",
        help="after training, draw these prompts ({} is the identity) with and without it into OUT.samples.png "
        "(DDIM 25 steps; default: a few prompts on the lab model, none elsewhere)",
    )
    p.add_argument("--no-samples", action="store_true", help="write no OUT.samples.png, even on the lab model")
    p.add_argument("--init-from", type=Path, help="start from an identity file (any layout) instead of --init")
    p.add_argument(
        "--init-encoder",
        help="start from what an identity encoder makes of the photos (a file, or lab); e.g. with --preset "
        "cross_init_fast for encoder init + 25 steps",
    )
    p.add_argument("--vision", help="with --init-encoder: the vision tower folder it names (the lab's is found)")
    p.add_argument("--reg-weight", type=float, help="Cross-Init regulariser weight (preset default 1e-5)")
    p.add_argument("--resolution", type=int, help="training resolution (default: the model's native size)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--seed", type=int, default=0, help=f"seed, 0 to {MAX_SEED}; the same seed gives the same identity")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--legacy-pt", action="store_true", help="also write an A1111-style .pt beside the file")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_face_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m core` argument parser."""
    prog = "identity-tokens" if Path(sys.argv[0]).name == "identity-tokens" else f"python -m {__package__ or 'core'}"
    parser = argparse.ArgumentParser(prog=prog, description="Identity Tokens: train and inspect identities")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    add_score_parser(sub)
    add_export_parser(sub)
    add_encoder_parsers(sub)
    add_many_parser(sub)
    p = sub.add_parser("inspect", help="describe an identity file")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _output_paths(args: argparse.Namespace) -> dict[str, Path]:
    """Every file train will write, checked before any work starts."""
    from .files import check_output_path, make_parent

    out: Path = args.out
    if out.suffix != ".safetensors":
        raise InputError(f"--out: '{out}' must end in .safetensors (the format every tool loads)")
    make_parent(out)
    paths = {"identity": out, "curve": out.with_suffix(".loss.png"), "attention": out.with_suffix(".attention.png")}
    if _wants_samples(args):
        paths["samples"] = out.with_suffix(".samples.png")
        for prompt in args.sample_prompts or ():
            if SLOT not in prompt:
                raise InputError(f"--sample-prompts: '{prompt}' has no {SLOT} for the identity; write e.g. 'a photo of {SLOT}'")
    if args.legacy_pt:
        paths["legacy"] = out.with_suffix(".pt")
    for path in paths.values():
        check_output_path(path, args.overwrite)
    return paths


def _wants_samples(args: argparse.Namespace) -> bool:
    """Whether train draws a sample sheet: --sample-prompts, or the lab model, unless --no-samples."""
    from .models import LAB_NAME

    return not args.no_samples and (bool(args.sample_prompts) or args.model == LAB_NAME)


def _write_samples(model: Model, result: TrainResult, args: argparse.Namespace, token: str, pictures: list,
                   resolution: int) -> Path:
    """References, then the prompts with the identity, then the same prompts and seed with the class word."""
    from .images import resize_and_crop, save_png_atomic, to_rgb
    from .lab.evaluation import DEMO_PROMPTS
    from .sample import generate, generate_identity, sample_sheet

    prompts = list(args.sample_prompts or DEMO_PROMPTS)
    with_identity = generate_identity(model, prompts, result.identity, seed=args.seed, resolution=resolution)
    without = generate(model, [p.replace(SLOT, "a person") for p in prompts], seed=args.seed, resolution=resolution)
    references = [np.asarray(resize_and_crop(to_rgb(p), resolution)) for p in pictures]
    sheet = sample_sheet(
        [
            ("the pictures it trained on", references),
            (f"generated with {token}", list(with_identity)),
            ("the same prompts and seed, 'a person' instead", list(without)),
        ],
        notes=[f"column {i + 1}: {p.replace(SLOT, token)}" for i, p in enumerate(prompts)],
    )
    return save_png_atomic(sheet, args.out.with_suffix(".samples.png"))


def _token(args: argparse.Namespace) -> str:
    """The placeholder token, checked (one word, not a CLIP word) with the flag that fixes it named."""
    from .formats import file_key
    from .prompts import in_vocabulary
    from .vocab import load_clip_tokenizer

    stem = args.out.stem
    if not stem or any(ch.isspace() for ch in stem):
        raise InputError(
            f"--out: the file name '{args.out.name}' has a space; ComfyUI (embedding:NAME) and A1111 use the file "
            f"name as the trigger word, so name it without spaces, e.g. {'-'.join(stem.split()) or 'my-id'}.safetensors"
        )
    flag, token = ("--token", args.token) if args.token is not None else ("--out", f"<{stem}>")
    bare = token.strip("<>")
    if not bare or any(ch.isspace() for ch in token) or any(ch in token for ch in "():,"):
        raise InputError(
            f"{flag}: the token {token!r} must be one word without spaces, brackets, colons or commas; "
            f"pass --token <{'-'.join(bare.split()) or 'my-id'}>"
        )
    try:
        vocab = load_clip_tokenizer().get_vocab()
    except InputError:  # no offline vocabulary here: the trainer checks against the model's own tokenizer
        vocab = {}
    if in_vocabulary(vocab, token):
        raise InputError(
            f"{flag}: the token '{token}' is already a word of the CLIP vocabulary, so prompts could not tell it "
            f"apart; pass --token {file_key(token)} or another new word"
        )
    return token


def _check_options(args: argparse.Namespace) -> None:
    """Numbers that are wrong whatever the model: refused before it loads."""
    if not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed: {args.seed} is out of range; use a whole number from 0 to {MAX_SEED}")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--tokens", args.n_tokens)):
        if value is not None and value < 1:
            raise InputError(f"{flag}: got {value}; it must be at least 1")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise InputError(f"--lr: got {args.learning_rate}; it must be a positive number such as 0.005")
    if args.resolution is not None:
        from .images import check_resolution

        check_resolution(args.resolution)


def plan_train(args: argparse.Namespace) -> TrainPlan:
    """Every check on inputs and outputs that needs no model, so nothing is lost to a late error after training."""
    from .images import list_image_paths, load_image
    from .models import check_model_spec, resolve_device

    _check_options(args)
    check_face_arguments(args)
    paths = _output_paths(args)
    token = _token(args)
    device = resolve_device(args.device)
    check_model_spec(args.model)
    image_paths = list_image_paths(_image_sources(args.images))
    pictures = [load_image(path) for path in image_paths]
    face_masks = None
    if args.face_crop:
        pictures, face_masks = crop_pictures(pictures, [p.name for p in image_paths], args.resolution or FACE_CROP_SIZE)
    start = None
    if args.init_from is not None and args.init_encoder is not None:
        raise InputError("--init-from and --init-encoder: choose one start")
    if args.init_from is not None:
        from .formats import load_identity

        start = load_identity(args.init_from)
    elif args.init_encoder is not None:
        from .encoders.cli import encode_pictures, load_encoder_and_tower

        start = encode_pictures(*load_encoder_and_tower(args.init_encoder, args.vision), pictures, token)
    return TrainPlan(paths, token, device, pictures, start, face_masks)


def _image_sources(values: Sequence[str]) -> list[Path]:
    """Paths from --images: 'sample' is the bundled astronaut photo, 'lab-sample' the lab world's sample subject."""
    from .images import LAB_SAMPLE, lab_sample_paths, sample_photo_path

    paths: list[Path] = []
    for value in values:
        if value == "sample":
            paths.append(sample_photo_path())
        elif value == LAB_SAMPLE:
            paths.extend(lab_sample_paths())
        else:
            paths.append(Path(value))
    return paths


def _save(result: TrainResult, args: argparse.Namespace, paths: dict[str, Path], token: str,
          images: torch.Tensor | None = None) -> list[Path]:
    """Write the identity (or its partial rows), its loss curve and the optional .pt; a failed write keeps the rows."""
    from .formats import save_a1111_pt
    from .plot import loss_curve_png

    identity_path, curve_path, attention_path = paths["identity"], paths["curve"], paths["attention"]
    if result.stopped:  # a partial run's files sit together, apart from any finished run's
        identity_path = identity_path.with_name(identity_path.stem + ".partial.safetensors")
        curve_path = curve_path.with_name(identity_path.stem + ".loss.png")
        attention_path = attention_path.with_name(identity_path.stem + ".attention.png")
    written = [_save_rows(result, identity_path, token, args.overwrite)]
    title = f"{token}: loss per step" + (f" (stopped: {result.stopped})" if result.stopped else "")
    try:
        loss_curve_png(result.losses, curve_path, title=title)
        written.append(curve_path)
    except OSError as error:
        log.warning("could not write the loss chart %s (%s); the identity is saved", curve_path, error.strerror or error)
    if result.attention is not None and images is not None:
        from .heatmap import attention_picture, save_attention_png

        try:
            save_attention_png(attention_picture(images, result.attention), attention_path)
            written.append(attention_path)
        except OSError as error:
            log.warning("could not write the attention heatmap %s (%s)", attention_path, error.strerror or error)
    if "legacy" in paths and not result.stopped:
        written.append(
            save_a1111_pt(result.identity, paths["legacy"], name=token.strip("<>"), overwrite=args.overwrite)
        )
    return written


class RowsKeptElsewhere(InputError):
    """The identity could not be written where asked; the message says where the rows were kept instead."""


def _save_rows(result: TrainResult, path: Path, token: str, overwrite: bool) -> Path:
    """save_identity at `path`; if that fails after training, the rows go to a temp folder and the error says where."""
    import tempfile
    import time

    from .formats import save_identity

    try:
        return save_identity(result.identity, path, token=token, overwrite=overwrite)
    except InputError as error:
        folder = Path(tempfile.gettempdir()) / "identity_tokens"
        fallback = folder / f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            kept = save_identity(result.identity, fallback, token=token, overwrite=False)
        except (InputError, OSError):
            raise error from None
        raise RowsKeptElsewhere(
            f"--out: {error}. The trained rows are safe in {kept}; copy that file where you want it"
        ) from None


def run_train(args: argparse.Namespace) -> int:
    """Check everything, load, train with a progress bar, save; returns the exit code."""
    from tqdm import tqdm

    from .images import images_to_tensor
    from .models import default_resolution, default_templates, load_model
    from .trainer import Trainer, is_out_of_memory, preset_config

    plan = plan_train(args)
    prediction_type = None if args.prediction_type == "auto" else args.prediction_type
    model = load_model(args.model, plan.device, prediction_type)
    if "legacy" in plan.paths and len(model.encoders) > 1:
        raise InputError(
            f"--legacy-pt: the A1111 .pt layout holds one text encoder, and {model.name} ({model.family}) has "
            f"{len(model.encoders)}; drop --legacy-pt, the .safetensors file loads in A1111 and ComfyUI"
        )
    resolution = args.resolution or default_resolution(model)
    config = preset_config(
        args.preset,
        token=plan.token,
        steps=args.steps,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        memory=args.memory,
        compile=args.compile,
        learning_rate=args.learning_rate,
        scale_lr=args.scale_lr,
        n_tokens=args.n_tokens,
        init=args.init,
        init_text=args.init_text,
        reg_weight=args.reg_weight,
        resolution=resolution,
        seed=args.seed,
        flip_p=0.0 if args.no_flip else None,
        face_loss=face_loss_setting(args),
        stages=args.stages,
        templates=args.templates or default_templates(model),
    )
    images = images_to_tensor(plan.pictures, resolution)
    try:
        trainer = Trainer(model, images, config, init=plan.start, face_masks=masks_at(plan.face_masks, resolution))
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise InputError(
            f"--resolution: out of memory while encoding {images.shape[0]} photo(s) at {resolution}px; "
            "lower --resolution or free memory on the device"
        ) from None
    print(
        f"training {plan.token} on {model.name} ({model.family}, {model.denoiser.prediction_type}), "
        f"{images.shape[0]} image(s) at {resolution}px, {config.n_tokens} token(s), {config.steps} steps, "
        f"device {model.denoiser.device}",
        file=sys.stderr,
    )
    with tqdm(total=config.steps, desc="training", unit="step") as bar:

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}")

        result = trainer.run(on_step=on_step)
    written = _save(result, args, plan.paths, plan.token, images)
    if "samples" in plan.paths and not result.stopped:
        print(f"drawing {plan.paths['samples'].name} ...", file=sys.stderr)
        try:
            written.append(_write_samples(model, result, args, plan.token, plan.pictures, resolution))
        except OSError as error:
            log.warning("could not write the sample sheet (%s); the identity is saved", error.strerror or error)
    for path in written:
        print(f"wrote {path}")
    return _report_stop(result, trainer.steps_done, written[0], config.batch_size, resolution)


def _report_stop(result: TrainResult, steps_done: int, saved: Path, batch_size: int, resolution: int) -> int:
    """Say why training ended early (and what to change), or how to use the file; returns the exit code."""
    if result.stopped == "interrupted":
        print(f"interrupted after {steps_done} steps; the rows so far are in {saved} (marked partial)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.stopped.startswith(OUT_OF_MEMORY):
        print(
            f"training stopped: {result.stopped}. The rows so far are in {saved} (marked partial); lower "
            f"--batch-size (now {batch_size}) or --resolution (now {resolution}), or free memory, and run again "
            f"with --init-from {saved} to continue",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    if result.stopped:
        print(
            f"training stopped: {result.stopped}. The last good rows are in {saved} (marked partial); "
            "lower --lr or check the images and model",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    if result.identity.is_staged:
        print(
            f"a per-stage identity: in ComfyUI load it with Load Identity (copy it into models/embeddings as "
            f"{saved.stem}.sefi.safetensors) and sample with Apply Identity's MODEL; for other tools run "
            f"'export {saved} --out {saved.with_name(saved.stem + '-plain.safetensors')}' (lossy)"
        )
        return 0
    print(f"use it in ComfyUI as 'embedding:{saved.stem}' after copying it into models/embeddings")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Print what an identity file holds."""
    from .formats import describe_identity_file

    info = describe_identity_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['path']}: {info['layout']} layout, {info['file_size']} bytes, {info['n_tokens']} token(s)")
    print(f"  {info['kind']}")
    for key in info["encoders"]:
        norms = ", ".join(f"{n:.3f}" for n in info["row_norms"][key])
        print(f"  {key}: width {info['widths'][key]}, row norms [{norms}]")
    for key, value in sorted(info["metadata"].items()):
        print(f"  {key} = {value}")
    return 0


class _NoteHandler(logging.Handler):
    """Notes from the pack's modules as one 'note: ...' line each, on whatever sys.stderr is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"note: {record.getMessage()}", file=sys.stderr)


def _show_notes() -> None:
    """Print the pack's warnings and info (skipped files, detected settings) on stderr, one line each."""
    package = logging.getLogger(__package__ or "core")
    if not any(isinstance(handler, _NoteHandler) for handler in package.handlers):
        package.addHandler(_NoteHandler())
    package.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user mistakes print one clear line and exit 2, Ctrl-C before training exits 130."""
    args = build_parser().parse_args(argv)
    _show_notes()
    try:
        commands = {
            "train": run_train,
            "inspect": run_inspect,
            "score": run_score,
            "export": run_export,
            "train-encoder": run_train_encoder,
            "encode": run_encode,
            "train-many": run_train_many,
        }
        return commands[args.command](args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
