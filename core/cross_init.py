"""Initial identity rows: Cross Initialization (celebrity names or init words, METHODS.md 2.2) and plain word rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import InputError
from .protocols import SLOT, Model, TextEncoder

NAMES_FILE = Path(__file__).parent / "data" / "celebrity_names.txt"


def read_names(path: Path = NAMES_FILE) -> list[str]:
    """The celebrity-name list, one name per line."""
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise InputError(f"names: {path} holds no names; give a file with one name per line")
    return names


def column_means(encoder: TextEncoder, names: Sequence[str], n_tokens: int) -> torch.Tensor:
    """Per-column means of raw token rows: column j averages the (j+1)-th BPE token of every name that has one."""
    table = encoder.token_table().detach().float()
    columns: list[list[torch.Tensor]] = [[] for _ in range(n_tokens)]
    for name in names:
        for j, token_id in enumerate(encoder.token_ids(name)[:n_tokens]):
            columns[j].append(table[token_id])
    if any(not col for col in columns):
        raise InputError(
            f"tokens: no name in the list is {n_tokens} tokens long; use fewer tokens or a longer name list"
        )
    return torch.stack([torch.stack(col).mean(dim=0) for col in columns])


@torch.no_grad()
def output_rows(encoder: TextEncoder, input_rows: torch.Tensor) -> torch.Tensor:
    """The encoder's output at positions 1..n for [BOS, rows, EOS, PAD...], at the family's conditioning layer."""
    hidden = encoder.encode([SLOT], input_rows).hidden
    return hidden[0, 1 : 1 + input_rows.shape[0]].float().cpu()


def celebrity_init(encoder: TextEncoder, n_tokens: int, names: Sequence[str] | None = None) -> torch.Tensor:
    """Cross Initialization from the mean celebrity-name token rows, mapped through the text encoder."""
    means = column_means(encoder, names if names is not None else read_names(), n_tokens)
    return output_rows(encoder, means)


def word_cross_init(encoder: TextEncoder, words: str, n_tokens: int) -> torch.Tensor:
    """Cross Initialization from init words: the encoder's output rows for exactly n_tokens word tokens."""
    ids = encoder.token_ids(words)
    if len(ids) != n_tokens:
        raise InputError(
            f"init words: '{words}' is {len(ids)} CLIP tokens but the identity has {n_tokens}; "
            f"give words that make exactly {n_tokens} tokens or set tokens to {len(ids)}"
        )
    table = encoder.token_table().detach().float()
    return output_rows(encoder, table[ids])


def word_init(encoder: TextEncoder, word: str, n_tokens: int) -> torch.Tensor:
    """Textual Inversion's start: the raw token row of a one-token word, copied into every row."""
    ids = encoder.token_ids(word)
    if len(ids) != 1:
        raise InputError(
            f"init word: '{word}' is {len(ids)} CLIP tokens; pick a word that is a single token, e.g. 'person'"
        )
    return encoder.token_table().detach().float()[ids[0]].cpu().repeat(n_tokens, 1)


def initial_rows(model: Model, method: str, n_tokens: int, init_text: str = "") -> dict[str, torch.Tensor]:
    """Initial rows for every encoder: method 'celebrity', 'words' (cross-init of words) or 'word' (plain TI)."""
    if method == "celebrity":
        return {enc.key: celebrity_init(enc, n_tokens, model.celebrity_names) for enc in model.encoders}
    if method == "words":
        return {enc.key: word_cross_init(enc, init_text, n_tokens) for enc in model.encoders}
    if method == "word":
        return {enc.key: word_init(enc, init_text or "person", n_tokens) for enc in model.encoders}
    raise InputError(f"init: unknown method '{method}'; use celebrity, words or word")
