"""Prompts with identities: trigger words become identity rows exactly where stock `embedding:NAME` would put them."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from ..core.errors import InputError
from ..core.identity import Identity, IdentityError
from ..core.prompts import check_trigger
from .comfy_backend import clip_encoders, clip_widths

NAME_PREFIX = "identitytokens"  # internal embedding names: identitytokens1, identitytokens2, ...


def trigger_pattern(trigger: str) -> re.Pattern[str]:
    """The trigger as a whole word: not glued to letters, digits or other name characters."""
    return re.compile(r"(?<![\w<>:\-])" + re.escape(trigger) + r"(?![\w<>\-])")


def _check_triggers(text: str, pairs: Sequence[tuple[Identity, str, str]]) -> None:
    """Each trigger is one word, used once among the identities, and present in the prompt."""
    seen: set[str] = set()
    for _, trigger, input_name in pairs:
        check_trigger(trigger, input_name)
        if trigger in seen:
            raise InputError(f"{input_name}: '{trigger}' is already the trigger of another identity; give each its own")
        seen.add(trigger)
        if not trigger_pattern(trigger).search(text):
            raise InputError(
                f"text: the trigger word '{trigger}' ({input_name}) is not in the prompt; write it where the subject "
                f"should appear, e.g. 'a photo of {trigger}'"
            )


def _rows_by_name(clip: object, pairs: Sequence[tuple[Identity, str, str]]) -> dict[str, dict[str, torch.Tensor]]:
    """{internal name: {encoder key: rows}} for every identity, checked against this CLIP's encoders."""
    widths = clip_widths(clip)
    if not widths:
        raise InputError("clip: this CLIP has no CLIP text encoder the pack knows; use an SD1.x, SD2.x or SDXL CLIP")
    table: dict[str, dict[str, torch.Tensor]] = {}
    for number, (identity, _, input_name) in enumerate(pairs, start=1):
        rows = {}
        for key, width in widths.items():
            try:
                rows[key] = identity.rows_for(key, width).detach().float().cpu()
            except IdentityError as error:
                made_for = identity.metadata.get("base_family", "another model")
                raise InputError(
                    f"{input_name}: it was made for {made_for} ({_shapes(identity)}) and does not fit this CLIP, which "
                    f"needs {key} rows of width {width} ({error}); use an identity trained on this model family"
                ) from None
        table[f"{NAME_PREFIX}{number}"] = rows
    return table


def _shapes(identity: Identity) -> str:
    """'clip_l 2x768' style summary of an identity's rows."""
    return ", ".join(f"{k} {v.shape[0]}x{v.shape[1]}" for k, v in identity.rows.items())


def rewrite_prompt(text: str, pairs: Sequence[tuple[Identity, str, str]]) -> str:
    """The prompt with every trigger word replaced by `embedding:<internal name>`."""
    for number, (_, trigger, _) in enumerate(pairs, start=1):
        text = trigger_pattern(trigger).sub(f"embedding:{NAME_PREFIX}{number}", text)
    return text


_PATCHED = ("_try_get_embedding", "embedding_directory")
_ABSENT = object()  # the tokenizer had no instance attribute of that name (the class's method or value showed through)


def _own_attributes(tokenizer: object) -> dict[str, object]:
    """The tokenizer's own (instance) values of the attributes the identity lookup patches, _ABSENT where it has none."""
    own = getattr(tokenizer, "__dict__", {})
    return {name: own.get(name, _ABSENT) for name in _PATCHED}


def _restore_attributes(tokenizer: object, saved: dict[str, object]) -> None:
    """Put back exactly what was there: another pack's instance patch stays, a class attribute shows through again."""
    for name, value in saved.items():
        if value is not _ABSENT:
            setattr(tokenizer, name, value)
        elif name in getattr(tokenizer, "__dict__", {}):
            delattr(tokenizer, name)


@contextmanager
def _identity_embeddings(clip: object, table: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
    """While active, the CLIP's tokenizers resolve the internal names to identity rows; other names load as usual."""
    patched = []
    pattern = re.compile(rf"({NAME_PREFIX}\d+)(.*)", re.DOTALL)
    for key, (_, tokenizer) in clip_encoders(clip).items():
        original = tokenizer._try_get_embedding

        def lookup(embedding_name: str, _original=original, _key=key) -> tuple[torch.Tensor | None, str]:
            first, _, rest = embedding_name.strip().partition(" ")
            match = pattern.fullmatch(first)
            if match is None or match.group(1) not in table:
                return _original(embedding_name)
            leftover = " ".join(part for part in (match.group(2), rest) if part)
            return table[match.group(1)][_key], leftover

        patched.append((tokenizer, _own_attributes(tokenizer)))
        tokenizer._try_get_embedding = lookup
        if tokenizer.embedding_directory is None:
            tokenizer.embedding_directory = []  # the tokenizer only looks names up when it has a folder list
    try:
        yield
    finally:
        for tokenizer, saved in reversed(patched):
            _restore_attributes(tokenizer, saved)


def _conditioning(clip: object, text: str, pairs: Sequence[tuple[Identity, str, str]],
                  table: dict[str, dict[str, torch.Tensor]]) -> list:
    """CONDITIONING of the prompt with each identity's internal name resolving to its rows in table."""
    with _identity_embeddings(clip, table):
        tokens = clip.tokenize(rewrite_prompt(text, pairs))
    if hasattr(clip, "encode_from_tokens_scheduled"):  # today's ComfyUI, as its CLIPTextEncode does
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def encode_with_identities(clip: object, text: str, pairs: Sequence[tuple[Identity, str, str]]) -> list:
    """CONDITIONING for a prompt whose trigger words carry identities; pairs are (identity, trigger, input name)."""
    _check_triggers(text, pairs)
    return _conditioning(clip, text, pairs, _rows_by_name(clip, pairs))


StageRows = Mapping[str, torch.Tensor]  # {encoder key: (2, S, n, width)}: [0] the key rows, [1] the value rows


def _stage_tensor(stages: StageRows, key: str) -> torch.Tensor | None:
    """One encoder's per-stage rows; a lone tensor serves any encoder (as Identity.rows_for does)."""
    value = stages.get(key)
    if value is None and len(stages) == 1:
        value = next(iter(stages.values()))
    return value


def _stage_count(stage_rows: Sequence[StageRows | None], pairs: Sequence[tuple[Identity, str, str]]) -> int:
    """The one stage count S of every per-stage identity (1 when none has stages)."""
    counts: dict[str, int] = {}
    for stages, (_, _, input_name) in zip(stage_rows, pairs):
        for key, value in (stages or {}).items():
            if value.dim() != 4 or value.shape[0] != 2:
                raise InputError(
                    f"{input_name}: its {key} stage rows have shape {list(value.shape)}; per-stage rows are "
                    "(2, stages, tokens, width): key rows then value rows"
                )
            counts[f"{input_name} {key}"] = int(value.shape[1])
    if len(set(counts.values())) > 1:
        raise InputError(f"stages: the identities have different stage counts ({counts}); use identities trained alike")
    return next(iter(counts.values()), 1)


def _stage_table(plain: dict[str, dict[str, torch.Tensor]], stage_rows: Sequence[StageRows | None], stage: int,
                 part: int, pairs: Sequence[tuple[Identity, str, str]]) -> dict[str, dict[str, torch.Tensor]]:
    """{internal name: {encoder key: rows}} of one stage's key (part 0) or value (part 1) rows; plain identities as is."""
    table = {}
    for (name, rows), stages, (_, _, input_name) in zip(plain.items(), stage_rows, pairs):
        if stages is None:
            table[name] = rows
            continue
        table[name] = {}
        for key, own in rows.items():
            value = _stage_tensor(stages, key)
            if value is None or value.shape[-1] != own.shape[-1]:
                raise InputError(
                    f"{input_name}: it has no {key} stage rows of width {own.shape[-1]} for this CLIP; use an "
                    "identity trained on this model family"
                )
            table[name][key] = value[part, stage].detach().float().cpu()
    return table


def encode_stage_contexts(clip: object, text: str, pairs: Sequence[tuple[Identity, str, str]],
                          stage_rows: Sequence[StageRows | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per stage, the prompt's (keys, values) contexts, each (1, 77*k, D) as ComfyUI's CLIP encodes it.

    stage_rows[i] belongs to pairs[i]: {encoder key: (2, S, n, width)} (an identity's per-stage rows, [0] keys and
    [1] values), or None for an identity without stages, whose plain rows then serve every stage as keys and values.
    """
    if len(stage_rows) != len(pairs):
        raise ValueError(f"stages: {len(stage_rows)} stage row sets for {len(pairs)} identities; give one per identity")
    _check_triggers(text, pairs)
    plain = _rows_by_name(clip, pairs)
    contexts = []
    for stage in range(_stage_count(stage_rows, pairs)):
        keys, values = (_stage_table(plain, stage_rows, stage, part, pairs) for part in (0, 1))
        contexts.append(tuple(_conditioning(clip, text, pairs, table)[0][0] for table in (keys, values)))
    return contexts
