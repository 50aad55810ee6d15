"""Identity files: write our .safetensors and the A1111 .pt, read every embedding layout of METHODS.md 5.4.

A per-stage (SeFi-IDE-style) identity is written in the pack's own layout (sefi.k.<encoder>, sefi.v.<encoder>), which
stock loaders cannot use; core.identity.plain_export makes the lossy plain identity they can.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError
from .files import atomic_write
from .identity import ENCODER_KEYS, STAGE_METADATA_KEYS, WIDTH_TO_ENCODER, Identity, IdentityError
from .pickles import PickleRefused, PickleUnreadable, gist, load_weights_only
from .stages import StageSchedule

SUPPORTED_SUFFIXES = (".safetensors", ".pt", ".bin")
METADATA_PREFIX = "identity_tokens."
SINGLE_ENCODERS = ("clip_l", "clip_h")
SDXL_ENCODERS = ("clip_g", "clip_l")
A1111_PLACEHOLDER_ID = 265
SEFI_LAYOUT = "sefi-stages"  # identity_tokens.layout of a per-stage file
SEFI_PREFIX = "sefi."  # its tensors: sefi.k.<encoder> and sefi.v.<encoder>, each (S, n_tokens, width)
_PLAIN_FILE_KEYS = ("encoders",)  # file facts in our metadata, not part of the identity's own metadata
_SEFI_FILE_KEYS = ("encoders", "layout")

# The only classes beyond torch's weights_only defaults that a .pt may reference: rinongal's ParameterDict.
SAFE_PICKLE_CLASSES: tuple[type, ...] = (torch.nn.ParameterDict,)

_CROSS_INIT_KEY = re.compile(r"^(?P<stem>.+)_v(?P<index>\d+)$")
_LAYOUT_HELP = (
    "expected one of: {'<token>': tensor} (diffusers), {'string_to_param': {'*': tensor}} (A1111/rinongal), "
    "{'<t>_v0': ..., '<t>_v1': ...} (Cross-Initialization), {'clip_l': ..., 'clip_g': ...} (SDXL)"
)


class _Parsed(NamedTuple):
    """Rows (or per-stage tensors and schedule), metadata and layout name read from one file, before the Identity."""

    rows: dict[str, torch.Tensor]
    metadata: dict[str, str]
    layout: str
    stages: dict[str, torch.Tensor] | None = None
    schedule: StageSchedule | None = None


# ---------------------------------------------------------------- writing


def save_identity(identity: Identity, path: Path, *, token: str, overwrite: bool = False) -> Path:
    """Write `identity` as a .safetensors that A1111, diffusers and ComfyUI load unchanged (METHODS.md 5.5).

    A per-stage identity is written in the pack's sefi-stages layout instead, which only this pack reads.
    """
    path = Path(path)
    _require_suffix(path, ".safetensors")
    token = file_key(_check_name(token, "token", path))
    tensors = _stage_tensors(identity, path) if identity.is_staged else _file_tensors(identity, token, path)
    metadata = {"format": "pt"}
    metadata.update({METADATA_PREFIX + key: value for key, value in identity.metadata.items()})
    metadata[METADATA_PREFIX + "encoders"] = ",".join(identity.encoders)
    metadata[METADATA_PREFIX + "token"] = token
    if identity.is_staged:
        metadata.update({METADATA_PREFIX + key: value for key, value in _stage_file_metadata(identity).items()})

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)

    return atomic_write(path, write, overwrite)


def save_a1111_pt(identity: Identity, path: Path, *, name: str, overwrite: bool = False) -> Path:
    """Write the legacy A1111 .pt (plain dicts only, so `torch.load(weights_only=True)` reads it)."""
    path = Path(path)
    _require_suffix(path, ".pt")
    name = _check_name(name, "name", path)
    if identity.is_staged:
        raise IdentityError(
            f"output {path}: the A1111 .pt layout holds one vector per token, not per-stage key/value tokens; "
            "save the per-stage identity as .safetensors, or make a lossy plain one with "
            "core.identity.plain_export (the 'plain export') and save that"
        )
    if set(identity.encoders) == set(SDXL_ENCODERS):
        raise IdentityError(
            f"output {path}: the A1111 .pt layout cannot hold two encoders (clip_l and clip_g); "
            "save this SDXL identity as .safetensors instead"
        )
    rows = _single_encoder_rows(identity, path)
    data = {
        "string_to_token": {"*": A1111_PLACEHOLDER_ID},
        "string_to_param": {"*": rows},
        "name": name,
        "step": _int_or_zero(identity.metadata.get("steps", "0")),
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }

    def write(tmp: Path) -> None:
        torch.save(data, tmp)

    return atomic_write(path, write, overwrite)


def file_key(token: str) -> str:
    """The tensor key of a one-encoder file: the token in angle brackets ('alice' and '<alice>' give '<alice>').

    A1111 and ComfyUI trigger on the file name and ignore the key; diffusers' load_textual_inversion adds the key as a
    new word, and a bracketed word is never one CLIP already knows, so every loader works without extra arguments.
    """
    return f"<{token.strip('<>')}>"


def _require_suffix(path: Path, suffix: str) -> None:
    """Refuse an output name whose extension the loaders would not read back as this layout."""
    if path.suffix.lower() != suffix:
        raise IdentityError(
            f"output {path}: this layout is written as a {suffix} file; name it like '{path.stem}{suffix}'"
        )


def _check_name(value: str, what: str, path: Path) -> str:
    """A non-empty token or name without whitespace."""
    if not isinstance(value, str) or not value.strip() or any(ch.isspace() for ch in value):
        raise IdentityError(f"output {path}: {what} {value!r} must be a non-empty word without spaces, e.g. '<alice>'")
    return value


def _file_tensors(identity: Identity, token: str, path: Path) -> dict[str, torch.Tensor]:
    """The tensors to store: one under the token for SD1/SD2, or clip_l and clip_g for SDXL."""
    if set(identity.encoders) == set(SDXL_ENCODERS):
        return {key: _clean(identity.rows[key]) for key in SDXL_ENCODERS}
    return {token: _single_encoder_rows(identity, path)}


def _stage_tensors(identity: Identity, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a per-stage file: sefi.k.<encoder> and sefi.v.<encoder>, each (S, n_tokens, width)."""
    if set(identity.encoders) != set(SDXL_ENCODERS):
        _single_encoder_rows(identity, path)  # the same supported encoder sets as plain files
    tensors = {}
    for key, value in (identity.stages or {}).items():
        tensors[f"{SEFI_PREFIX}k.{key}"] = _clean(value[0])
        tensors[f"{SEFI_PREFIX}v.{key}"] = _clean(value[1])
    return tensors


def _stage_file_metadata(identity: Identity) -> dict[str, str]:
    """The layout marker and the stage facts of a per-stage file (a staged Identity keeps them consistent)."""
    return {"layout": SEFI_LAYOUT, **{key: identity.metadata[key] for key in STAGE_METADATA_KEYS}}


def _single_encoder_rows(identity: Identity, path: Path) -> torch.Tensor:
    """The rows of a one-encoder (clip_l or clip_h) identity, or IdentityError for other encoder sets."""
    if len(identity.encoders) != 1 or identity.encoders[0] not in SINGLE_ENCODERS:
        raise IdentityError(
            f"output {path}: cannot save an identity with encoders {', '.join(identity.encoders)}; "
            "supported are one of clip_l or clip_h (SD1/SD2), or clip_l with clip_g (SDXL)"
        )
    return _clean(identity.rows[identity.encoders[0]])


def _clean(rows: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous float32 CPU copy that owns its storage (so a view never drags a big table along)."""
    return rows.detach().to("cpu", torch.float32).contiguous().clone()


def _int_or_zero(value: str) -> int:
    """Parse a step count from metadata text, 0 if it is not a number."""
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return 0


# ---------------------------------------------------------------- reading


def load_identity(path: Path) -> Identity:
    """Read an identity from any supported embedding file (.safetensors, .pt, .bin)."""
    identity, _layout = _load(Path(path))
    return identity


def describe_identity_file(path: Path) -> dict[str, object]:
    """Summarise an identity file for `inspect`: layout, kind, encoders, token count, widths, norms, metadata, size."""
    path = Path(path)
    identity, layout = _load(path)
    info: dict[str, object] = {
        "path": str(path),
        "layout": layout,
        "kind": describe_kind(identity),
        "encoders": list(identity.encoders),
        "n_tokens": identity.n_tokens,
        "widths": {key: int(identity.rows[key].shape[1]) for key in identity.encoders},
        "row_norms": {key: [float(x) for x in identity.rows[key].norm(dim=1)] for key in identity.encoders},
        "metadata": dict(identity.metadata),
        "file_size": path.stat().st_size,
    }
    if identity.stages is not None:
        info["num_stages"] = identity.num_stages
        info["stage_bounds"] = list(identity.schedule.bounds) if identity.schedule else []
        info["stage_norms"] = {key: _stage_norms(value) for key, value in sorted(identity.stages.items())}
    return info


def describe_kind(identity: Identity) -> str:
    """One line on what the identity holds: plain vectors, or per-stage (SeFi-IDE-style) key/value tokens."""
    if identity.is_staged:
        return f"per-stage (SeFi-IDE-style), {identity.num_stages} stages, key/value tokens"
    return "plain, one vector per token"


def _stage_norms(value: torch.Tensor) -> dict[str, list[list[float]]]:
    """Norms of a (2, S, n, width) tensor's vectors: per stage, per token, for the key and the value rows."""
    norms = value.norm(dim=3)
    return {"key": norms[0].tolist(), "value": norms[1].tolist()}


def _load(path: Path) -> tuple[Identity, str]:
    """Read and check a file; return the identity and the name of the layout it was stored in."""
    path = path.expanduser()
    if not path.exists():
        raise IdentityError(f"identity file {path}: not found; check the path and the file name")
    if path.is_dir():
        raise IdentityError(f"identity file {path}: is a folder; give the embedding file inside it")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        parsed = _read_safetensors(path)
    elif suffix in (".pt", ".bin"):
        parsed = _parse_object(path, _torch_load(path))
    else:
        raise IdentityError(
            f"identity file {path}: unknown extension '{path.suffix}'; supported are {', '.join(SUPPORTED_SUFFIXES)}"
        )
    try:
        if parsed.stages is not None and parsed.schedule is not None:
            identity = Identity.from_stages(parsed.stages, parsed.schedule, parsed.metadata)
        else:
            identity = Identity(parsed.rows, parsed.metadata)
    except IdentityError as error:
        raise IdentityError(f"identity file {path}: {error}") from error
    return identity, parsed.layout


def _read_safetensors(path: Path) -> _Parsed:
    """Read a .safetensors: our own file (by its metadata) or a foreign tensor dict."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            names = list(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in names}
    except Exception as error:  # safetensors raises its own error types for bad headers and truncation
        raise IdentityError(
            f"identity file {path}: cannot be read as safetensors ({gist(error)}); "
            "the file is corrupt or truncated, export or download it again"
        ) from error
    if metadata.get(METADATA_PREFIX + "layout") == SEFI_LAYOUT or any(k.startswith(SEFI_PREFIX) for k in tensors):
        return _parse_sefi(path, tensors, metadata)
    if METADATA_PREFIX + "encoders" in metadata:
        return _parse_own(path, tensors, metadata)
    return _parse_object(path, tensors)


def _own_encoders(path: Path, metadata: dict[str, str]) -> list[str]:
    """The encoder keys named in our metadata, refused when missing or unknown."""
    text = metadata.get(METADATA_PREFIX + "encoders", "")
    encoders = [key.strip() for key in text.split(",") if key.strip()]
    unknown = [key for key in encoders if key not in ENCODER_KEYS]
    if not encoders or unknown:
        raise IdentityError(
            f"identity file {path}: its metadata names encoders {encoders}; expected some of {', '.join(ENCODER_KEYS)}. "
            "The file was edited or damaged; save it again"
        )
    return encoders


def _own_metadata(metadata: dict[str, str], file_keys: tuple[str, ...]) -> dict[str, str]:
    """The identity's metadata from a file's identity_tokens.* keys, less the file facts `file_keys`."""
    return {
        key[len(METADATA_PREFIX) :]: value
        for key, value in metadata.items()
        if key.startswith(METADATA_PREFIX) and key[len(METADATA_PREFIX) :] not in file_keys
    }


def _parse_sefi(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> _Parsed:
    """Read a per-stage file: sefi.k/sefi.v per encoder, stacked to (2, S, n, width), checked against its metadata."""
    damaged = "the file was edited or damaged, save it again"
    if metadata.get(METADATA_PREFIX + "layout") != SEFI_LAYOUT:
        raise IdentityError(
            f"identity file {path}: holds per-stage tensors {_key_list(tensors)} but not the metadata "
            f"'{METADATA_PREFIX}layout = {SEFI_LAYOUT}' this pack writes with them; it was not saved by Identity "
            f"Tokens or {damaged}"
        )
    encoders = _own_encoders(path, metadata)
    expected = [f"{SEFI_PREFIX}{part}.{key}" for key in encoders for part in ("k", "v")]
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise IdentityError(
            f"identity file {path}: per-stage tensor(s) {missing} are missing; every encoder needs "
            f"{SEFI_PREFIX}k.<encoder> and {SEFI_PREFIX}v.<encoder>, {damaged}"
        )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise IdentityError(
            f"identity file {path}: holds tensors {extra} besides the per-stage ones of encoders {encoders}; {damaged}"
        )
    schedule = _file_schedule(path, metadata)
    stages = {}
    for key in encoders:
        keys, values = (_as_stage_rows(path, f"{SEFI_PREFIX}{part}.{key}", tensors, schedule) for part in ("k", "v"))
        if keys.shape != values.shape:
            raise IdentityError(
                f"identity file {path}: '{SEFI_PREFIX}k.{key}' is {tuple(keys.shape)} but '{SEFI_PREFIX}v.{key}' is "
                f"{tuple(values.shape)}; key and value tokens need the same shape, {damaged}"
            )
        stages[key] = torch.stack([keys, values])
    return _Parsed({}, _own_metadata(metadata, _SEFI_FILE_KEYS), SEFI_LAYOUT, stages, schedule)


def _file_schedule(path: Path, metadata: dict[str, str]) -> StageSchedule:
    """The stage schedule of a per-stage file: bounds that parse, cover 0..T, and agree with num_stages."""
    bounds = metadata.get(METADATA_PREFIX + "stage_bounds")
    count = metadata.get(METADATA_PREFIX + "num_stages")
    if bounds is None or count is None:
        raise IdentityError(
            f"identity file {path}: a per-stage file needs metadata '{METADATA_PREFIX}stage_bounds' and "
            f"'{METADATA_PREFIX}num_stages'; the file was edited or damaged, save it again"
        )
    try:
        schedule = StageSchedule.parse(bounds)
    except InputError as error:
        raise IdentityError(f"identity file {path}: {error}") from None
    if count.strip() != str(schedule.count):
        raise IdentityError(
            f"identity file {path}: metadata says num_stages {count} but stage_bounds '{bounds}' give "
            f"{schedule.count} stages; the file was edited or damaged, save it again"
        )
    return schedule


def _as_stage_rows(path: Path, name: str, tensors: dict[str, torch.Tensor], schedule: StageSchedule) -> torch.Tensor:
    """One sefi.k/sefi.v tensor as finite float32 (S, n, width), S checked against the schedule."""
    value = tensors[name]
    if value.ndim != 3 or int(value.shape[0]) != schedule.count or value.numel() == 0:
        raise IdentityError(
            f"identity file {path}: tensor '{name}' has shape {tuple(value.shape)}; expected ({schedule.count}, "
            f"n_tokens, width) for its {schedule.count} stages ({schedule.text()}); the file was edited or "
            "damaged, save it again"
        )
    return torch.stack([_as_rows(path, f"{name}[{i}]", stage) for i, stage in enumerate(value)])


def _parse_own(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> _Parsed:
    """Read a file written by save_identity: the encoder keys and provenance come from its metadata."""
    encoders = _own_encoders(path, metadata)
    if len(encoders) == 1:
        if len(tensors) != 1:
            raise IdentityError(
                f"identity file {path}: its metadata says one encoder but it holds tensors {_key_list(tensors)}; "
                "the file was edited or damaged, save it again"
            )
        ((key, value),) = tensors.items()
        rows = {encoders[0]: _as_rows(path, key, value)}
    else:
        if set(tensors) != set(encoders):
            raise IdentityError(
                f"identity file {path}: its metadata names encoders {encoders} but it holds tensors "
                f"{_key_list(tensors)}; the file was edited or damaged, save it again"
            )
        rows = {key: _as_rows(path, key, tensors[key]) for key in encoders}
    return _Parsed(rows, _own_metadata(metadata, _PLAIN_FILE_KEYS), "identity_tokens")


def _torch_load(path: Path) -> object:
    """A .pt/.bin through the weights-only unpickler; only torch's ParameterDict (rinongal files) is allowed extra."""
    try:
        return load_weights_only(path, SAFE_PICKLE_CLASSES)
    except PickleRefused as refusal:
        raise IdentityError(
            f"identity file {path}: refused; {refusal}, which could run code when read, and nothing in it was run. "
            "Use a .safetensors embedding, or re-export the file from a tool you trust"
        ) from None
    except PickleUnreadable as damage:
        raise IdentityError(
            f"identity file {path}: cannot be read ({damage}); it is corrupt, truncated or not a PyTorch "
            "embedding file, export or download it again"
        ) from None


def _parse_object(path: Path, data: object) -> _Parsed:
    """Recognise a loaded object's layout, in the order A1111 checks them, and take its rows."""
    if isinstance(data, torch.Tensor):
        rows = _as_rows(path, "tensor", data)
        return _Parsed({_guess_encoder(rows): rows}, {"source_layout": "tensor"}, "tensor")
    if not isinstance(data, Mapping):
        raise IdentityError(
            f"identity file {path}: holds a {type(data).__name__}, not a dict of tensors; it is not an embedding file"
        )
    if not data:
        raise IdentityError(f"identity file {path}: holds no tensors (empty dict); export the embedding again")
    if "string_to_param" in data:
        return _parse_string_to_param(path, data)
    keys = set(data)
    if keys == set(SDXL_ENCODERS):
        rows = {key: _as_rows(path, key, data[key]) for key in SDXL_ENCODERS}
        return _Parsed(rows, {"source_layout": "sdxl"}, "sdxl")
    if len(data) == 1:
        ((key, value),) = data.items()
        rows = _as_rows(path, str(key), value)
        if key in ENCODER_KEYS:
            return _Parsed({str(key): rows}, {"source_layout": "diffusers"}, "diffusers")
        return _Parsed({_guess_encoder(rows): rows}, {"source_layout": "diffusers", "token": str(key)}, "diffusers")
    cross_init = _parse_cross_init(path, data)
    if cross_init is not None:
        return cross_init
    raise IdentityError(f"identity file {path}: unrecognised layout with keys {_key_list(data)}; {_LAYOUT_HELP}")


def _parse_string_to_param(path: Path, data: Mapping) -> _Parsed:
    """A1111 plain dicts, or rinongal's pickled ParameterDict: exactly one entry under string_to_param."""
    holder = data["string_to_param"]
    if isinstance(holder, torch.nn.ParameterDict):
        params, layout = vars(holder).get("_parameters"), "rinongal"
    else:
        params, layout = holder, "a1111"
    if not isinstance(params, Mapping):
        raise IdentityError(
            f"identity file {path}: 'string_to_param' is a {type(holder).__name__}, not a dict of tensors; "
            "it is not an A1111 or textual-inversion embedding"
        )
    if len(params) != 1:
        raise IdentityError(
            f"identity file {path}: 'string_to_param' holds {len(params)} entries {_key_list(params)}; "
            "exactly one is expected, split the file into one embedding per concept"
        )
    ((key, value),) = params.items()
    rows = _as_rows(path, f"string_to_param/{key}", value)
    metadata = {"source_layout": layout}
    name = data.get("name")
    if isinstance(name, str) and name:
        metadata["name"] = name
    step = data.get("step")
    if isinstance(step, int) and not isinstance(step, bool):
        metadata["steps"] = str(step)
    for extra in ("sd_checkpoint", "sd_checkpoint_name"):
        if isinstance(data.get(extra), str) and data[extra]:
            metadata[extra] = data[extra]
    return _Parsed({_guess_encoder(rows): rows}, metadata, layout)


def _parse_cross_init(path: Path, data: Mapping) -> _Parsed | None:
    """Cross-Initialization's one-key-per-vector dict {'<t>_v0': (d,), ...}, stacked by vector index; None if not it."""
    indexed: dict[int, tuple[str, object]] = {}
    stems = set()
    for key, value in data.items():
        match = _CROSS_INIT_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            return None
        stems.add(match.group("stem"))
        index = int(match.group("index"))
        if index in indexed:
            raise IdentityError(
                f"identity file {path}: keys '{indexed[index][0]}' and '{key}' both claim vector {index}; "
                "keep one of them and save the file again"
            )
        indexed[index] = (key, value)
    if len(stems) != 1:
        return None
    parts = [_as_rows(path, key, value) for _index, (key, value) in sorted(indexed.items())]
    widths = {int(part.shape[1]) for part in parts}
    if len(widths) != 1:
        raise IdentityError(
            f"identity file {path}: its vectors have different widths {sorted(widths)}; the file mixes two models"
        )
    rows = torch.cat(parts, dim=0)
    return _Parsed(
        {_guess_encoder(rows): rows}, {"source_layout": "cross_init_bin", "token": stems.pop()}, "cross_init_bin"
    )


def _as_rows(path: Path, key: str, value: object) -> torch.Tensor:
    """Check one stored value and return it as finite float32 rows of shape (n, d)."""
    if not isinstance(value, torch.Tensor):
        raise IdentityError(
            f"identity file {path}: the value under '{key}' is a {type(value).__name__}, not a tensor; "
            "it is not an embedding file"
        )
    if not value.is_floating_point():
        raise IdentityError(
            f"identity file {path}: tensor '{key}' holds {value.dtype} values, not floats; it is not an embedding"
        )
    if value.ndim == 1:
        value = value.unsqueeze(0)
    if value.ndim != 2 or value.numel() == 0:
        raise IdentityError(
            f"identity file {path}: tensor '{key}' has shape {tuple(value.shape)}; expected (n_tokens, width) or (width,)"
        )
    rows = value.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(rows).all()):
        raise IdentityError(
            f"identity file {path}: tensor '{key}' contains NaN or infinite values; training diverged, "
            "retrain or use an earlier checkpoint"
        )
    return rows


def _guess_encoder(rows: torch.Tensor) -> str:
    """The encoder of a lone tensor, from its width; clip_l when the width is not a known model's."""
    return WIDTH_TO_ENCODER.get(int(rows.shape[1]), "clip_l")


def _key_list(data: Mapping) -> str:
    """The keys of a dict for a message, shortened when there are many."""
    keys = [str(key) for key in data]
    shown = ", ".join(repr(key) for key in keys[:12])
    return f"[{shown}{', ...' if len(keys) > 12 else ''}]"
