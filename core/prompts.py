"""Token ids of a training prompt with room for identity rows at its slot, shared by every backend."""

from __future__ import annotations

import torch

from .errors import InputError
from .protocols import MAX_TOKENS, SLOT, TextEncoder, index_on


def check_trigger(trigger: str, input_name: str) -> str:
    """The trigger if it can be one: one word without spaces, brackets, colons or commas."""
    if not trigger or any(c.isspace() for c in trigger) or any(c in trigger for c in "():,"):
        raise InputError(
            f"{input_name}: '{trigger}' cannot be a trigger word; use one word without spaces, brackets, colons "
            "or commas, such as <alice>"
        )
    return trigger


def in_vocabulary(vocab: dict[str, int], word: str) -> bool:
    """Whether word is one entry of a CLIP BPE vocabulary already (as a whole word or a word piece)."""
    lowered = word.lower()
    return lowered in vocab or f"{lowered}</w>" in vocab


def prompt_ids(encoder: TextEncoder, prompt: str, n_rows: int) -> tuple[list[int], list[int]]:
    """77 ids for a prompt with n_rows placeholder ids at SLOT, and the positions of those rows."""
    bos, eos, pad = encoder.special_ids()
    pieces = prompt.split(SLOT)
    if len(pieces) > 2:
        raise InputError(f"prompt: '{prompt}' has more than one '{SLOT}'; put the identity in one place")
    ids = [bos] + encoder.token_ids(pieces[0])
    positions: list[int] = []
    if len(pieces) == 2:
        positions = list(range(len(ids), len(ids) + n_rows))
        ids += [0] * n_rows + encoder.token_ids(pieces[1])
    if len(ids) + 1 > MAX_TOKENS:
        raise InputError(
            f"prompt: '{prompt}' needs {len(ids) - 1} tokens ({n_rows} of them the identity's) but CLIP takes "
            f"{MAX_TOKENS - 2}; shorten the prompt or use fewer identity vectors"
        )
    ids = ids + [eos] + [pad] * (MAX_TOKENS - len(ids) - 1)
    return ids, positions


class PromptCache:
    """prompt_ids computed once per (prompt, n_rows), and their tensors once per device: templates repeat every step."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self._cache: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        self._tensors: dict[tuple[str, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def ids(self, prompt: str, n_rows: int) -> tuple[list[int], list[int]]:
        """The ids and row positions of one prompt."""
        key = (prompt, n_rows)
        if key not in self._cache:
            self._cache[key] = prompt_ids(self.encoder, prompt, n_rows)
        return self._cache[key]

    def has_rows(self, prompts: list[str], n_rows: int) -> bool:
        """Whether any prompt has a slot that rows go into; decided on the host, so no device tensor is read."""
        return n_rows > 0 and any(self.ids(p, n_rows)[1] for p in prompts)

    def tensors(self, prompt: str, n_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt's (77,) ids and (77,) row index (-1 where no row goes), copied to device once."""
        key = (prompt, n_rows, device)
        if key not in self._tensors:
            ids, positions = self.ids(prompt, n_rows)
            slots = [-1] * len(ids)
            for row, position in enumerate(positions):
                slots[position] = row
            self._tensors[key] = (index_on(device, ids), index_on(device, slots))
        return self._tensors[key]

    def spliced(self, prompts: list[str], n_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 77) ids and (B, 77) index of the identity row at each position (-1 for none), on device."""
        parts = [self.tensors(p, n_rows, device) for p in prompts]
        return torch.stack([ids for ids, _ in parts]), torch.stack([slots for _, slots in parts])

    def batch(self, prompts: list[str], n_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 77) ids and a (B, 77) boolean mask of the row positions, on device."""
        input_ids, slots = self.spliced(prompts, n_rows, device)
        return input_ids, slots >= 0
