"""The real CLIP BPE vocabulary, found offline (open_clip's BPE file or a ComfyUI tokenizer folder)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import InputError

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # the merge count the CLIP text models were trained with


def _byte_symbols() -> list[str]:
    """CLIP's 256 byte stand-in characters in vocabulary order: printable bytes first, then the rest."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def find_open_clip_bpe() -> Path | None:
    """The BPE file open_clip_torch ships, located without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def _cache_root() -> Path:
    """Where generated tokenizer files are kept (IDENTITY_TOKENS_CACHE overrides)."""
    root = os.environ.get("IDENTITY_TOKENS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "identity_tokens")
    return Path(root)


def tokenizer_folder_from_bpe(bpe_path: Path, cache_root: Path | None = None) -> Path:
    """Write vocab.json and merges.txt for transformers' CLIPTokenizer from a CLIP BPE .txt.gz file."""
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    folder = (cache_root or _cache_root()) / "clip_tokenizer"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    contents = {
        "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab_list)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
    }
    for name, text in contents.items():
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, delete=False, suffix=".tmp") as handle:
            handle.write(text)
        os.replace(handle.name, folder / name)
    return folder


@lru_cache(maxsize=4)
def clip_tokenizer_folder(explicit: str | None = None) -> Path:
    """A folder with vocab.json + merges.txt: the explicit one, else built from open_clip's BPE file."""
    if explicit:
        folder = Path(explicit)
        if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
            raise InputError(
                f"tokenizer: {folder} has no vocab.json and merges.txt; point it at a CLIP tokenizer folder"
            )
        return folder
    bpe = find_open_clip_bpe()
    if bpe is None:
        raise InputError(
            "tokenizer: no CLIP vocabulary found offline; `pip install open_clip_torch` (it ships the BPE file) "
            "or use a diffusers model folder that has a tokenizer/ subfolder"
        )
    return tokenizer_folder_from_bpe(bpe)


def load_clip_tokenizer(pad_token: str = "<|endoftext|>", folder: str | None = None):  # noqa: ANN201 - transformers type
    """transformers' CLIPTokenizer over the real vocabulary; SD2/SDXL-G pad with '!', SD1 with EOS."""
    from transformers import CLIPTokenizer

    path = clip_tokenizer_folder(folder)
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), pad_token=pad_token, model_max_length=77)
