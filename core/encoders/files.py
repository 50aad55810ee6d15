"""Encoder files: one .safetensors with the mapper's weights and, in its metadata, the spec it was trained for."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import InputError
from ..files import atomic_write, check_output_path
from ..pickles import PickleRefused, PickleUnreadable, load_weights_only, looks_like_torch_save
from .mapper import EncoderSpec, IdentityEncoder

FORMAT = "identity-tokens-encoder/1"  # the metadata "format" of an encoder file
SUFFIX = ".safetensors"


class EncoderFileError(InputError):
    """A user-facing problem with an encoder file; the message says the fix."""


def save_encoder(
    encoder: IdentityEncoder, path: Path, overwrite: bool = False, training: Mapping[str, object] | None = None
) -> Path:
    """Write the encoder atomically (never over an existing file unless overwrite)."""
    from safetensors.torch import save_file

    path = check_output_path(Path(path), overwrite)
    if path.suffix != SUFFIX:
        raise EncoderFileError(f"--out: an encoder is saved as {SUFFIX}, got '{path.name}'")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in encoder.state_dict().items()}
    metadata = {"format": FORMAT, "spec": json.dumps(encoder.spec.to_dict()), "training": json.dumps(training or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite)


def _refuse_other_formats(path: Path) -> None:
    """A non-safetensors file: say why it is refused (a pickle is never unpickled beyond torch's weights-only)."""
    try:
        load_weights_only(path)
    except PickleRefused as refusal:
        raise EncoderFileError(
            f"encoder file {path}: refused; {refusal}, which could run code when read, and nothing in it was run. "
            f"Encoders are {SUFFIX} files written by `python -m core train-encoder`"
        ) from None
    except PickleUnreadable:
        pass
    raise EncoderFileError(
        f"encoder file {path}: not a {SUFFIX} encoder; use a file written by `python -m core train-encoder`"
    )


def read_encoder_file(path: Path) -> tuple[EncoderSpec, dict[str, torch.Tensor], dict]:
    """(spec, tensors, training record) of an encoder file, checked; errors name the file and the fix."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise EncoderFileError(f"encoder file {path}: not found; put encoders in models/identity_encoders")
    if path.suffix != SUFFIX:
        _refuse_other_formats(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        if looks_like_torch_save(path):  # e.g. a .pt renamed: say what it is, never unpickle beyond weights-only
            _refuse_other_formats(path)
        raise EncoderFileError(
            f"encoder file {path}: cannot be read ({error}); it is corrupt or truncated, copy or train it again"
        ) from None
    if metadata.get("format") != FORMAT:
        raise EncoderFileError(
            f"encoder file {path}: not an identity encoder (format '{metadata.get('format')}', expected '{FORMAT}'); "
            "an identity or checkpoint goes to another loader"
        )
    try:
        spec = EncoderSpec.from_dict(json.loads(metadata["spec"]))
        training = json.loads(metadata.get("training", "{}"))
    except (KeyError, TypeError, ValueError) as error:
        raise EncoderFileError(f"encoder file {path}: its spec is damaged ({error}); train or copy it again") from None
    return spec, tensors, training


def load_encoder(path: Path, device: torch.device | str = "cpu") -> IdentityEncoder:
    """An IdentityEncoder from its file, in eval mode."""
    spec, tensors, training = read_encoder_file(path)
    base = {key: tensors.get(f"base_{key}") for key in spec.widths}
    missing = [f"base_{k}" for k, v in base.items() if v is None]
    if missing:
        raise EncoderFileError(f"encoder file {path}: tensors {missing} are missing; the file is damaged")
    try:
        encoder = IdentityEncoder(spec, base)
        result = encoder.load_state_dict(tensors, strict=False)
    except (RuntimeError, ValueError) as error:
        raise EncoderFileError(
            f"encoder file {path}: its tensors do not fit its spec ({str(error).splitlines()[0][:200]}); the file is "
            "damaged, train or copy it again"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise EncoderFileError(
            f"encoder file {path}: its tensors do not match its spec (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); the file is damaged, train or copy it again"
        )
    encoder.training_record = training
    return encoder.to(device).eval()


def check_text_widths(spec: EncoderSpec, widths: Mapping[str, int], where: str = "clip") -> None:
    """Refuse text encoders of other widths than the encoder's rows."""
    if dict(widths) != dict(spec.widths):
        raise EncoderFileError(
            f"{where}: the encoder makes rows for text encoders {spec.widths} ({spec.family}), but this model's are "
            f"{dict(widths)}; use a checkpoint of the family it was trained for, or train an encoder for this one"
        )
