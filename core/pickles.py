"""The one way the pack reads a pickle (.pt/.ckpt/.bin): torch's weights-only unpickler, refusals told from damage."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

# Phrases of torch's weights-only unpickler when it refuses something (as opposed to finding broken bytes).
_REFUSAL_MARKERS = ("was not an allowed global", "is blocked", "unrecognized function", "Can only create", "Can only build")
_PLAIN_PICKLE_MARKER = "Unsupported operand"  # a plain Python pickle, not torch's zip format
# Lines of torch's message that give advice we must never pass on (re-running without the safety net).
_ADVICE_MARKERS = ("weights_only", "Weights only load failed", "file an issue", "Check the documentation", "trusted source")


class PickleRefused(Exception):
    """The file asks for Python objects beyond tensor data; nothing in it was run. str() says what it asked for."""


class PickleUnreadable(Exception):
    """The file is not a readable PyTorch pickle (corrupt, truncated, or another format). str() is the gist."""


def load_weights_only(path: Path, allowed: tuple[type, ...] = ()) -> object:
    """torch.load(weights_only=True) on the CPU, allowing only `allowed` classes beyond torch's defaults."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # A handle, not the path: torch 2.14 reads a path named *.safetensors with safetensors, whatever it holds.
            with torch.serialization.safe_globals(list(allowed)), open(path, "rb") as handle:
                return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = refusal_reason(error, _starts_like_pickle(Path(path)))
        if reason is not None:
            raise PickleRefused(reason) from None
        raise PickleUnreadable(gist(error)) from None
    except Exception as error:  # zip, EOF and format errors come as RuntimeError/EOFError/OSError/ValueError
        raise PickleUnreadable(gist(error)) from None


def _starts_like_pickle(path: Path) -> bool:
    """Whether the file opens with a pickle PROTO opcode (protocol 2-5), as plain Python pickles do."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def looks_like_torch_save(path: Path) -> bool:
    """Whether the file opens like torch.save's output (a zip archive, or a plain pickle), whatever its name."""
    try:
        with open(path, "rb") as handle:
            zipped = handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False
    return zipped or _starts_like_pickle(Path(path))


def refusal_reason(error: Exception, plain_pickle: bool = False) -> str | None:
    """What a refused pickle asked for (e.g. 'it asks for posix.system'), or None if the bytes are just broken."""
    text = str(error)
    if _PLAIN_PICKLE_MARKER in text:
        return "it is a plain Python pickle, not a PyTorch tensor file" if plain_pickle else None
    if not any(marker in text for marker in _REFUSAL_MARKERS):
        return None
    match = re.search(r"GLOBAL (\S+)", text) or re.search(r"function (\S+)", text)
    return f"it asks for {match.group(1)}" if match else "it asks for an object outside the tensor allowlist"


def gist(error: Exception) -> str:
    """The error's type and first meaningful line, without torch's advice to turn the safety net off."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not any(marker in line for marker in _ADVICE_MARKERS)]
    short = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return short if len(short) <= 200 else short[:197] + "..."
