"""Tests for core.files and core.formats: round trips, foreign layouts, safe pickles and safe writes."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import InputError
from core.files import atomic_write, check_output_path
from core.formats import (
    describe_identity_file,
    load_identity,
    save_a1111_pt,
    save_identity,
)
from core.identity import Identity, IdentityError

META = {"method": "textual_inversion", "base_model": "sd15", "steps": "500", "init": "person"}


def _rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Deterministic random rows."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _leftovers(folder: Path) -> list[str]:
    """Temp files a writer left behind in a folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _assert_mentions(error: pytest.ExceptionInfo[BaseException], path: Path) -> None:
    """The user-facing message names the file."""
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "widths",
    [
        {"clip_l": 32},
        {"clip_l": 768},
        {"clip_h": 1024},
        {"clip_h": 32},  # tiny model: width does not reveal the encoder, metadata does
        {"clip_l": 768, "clip_g": 1280},
    ],
    ids=["sd1-tiny", "sd1", "sd2", "sd2-tiny", "sdxl"],
)
def test_safetensors_round_trip(tmp_path: Path, widths: dict[str, int]) -> None:
    rows = {key: _rows(2, d, seed=i) for i, (key, d) in enumerate(widths.items())}
    identity = Identity(rows, META)
    path = save_identity(identity, tmp_path / "alice.safetensors", token="<alice>")

    loaded = load_identity(path)
    assert loaded.encoders == identity.encoders
    for key in widths:
        assert torch.equal(loaded.rows[key], rows[key])
        assert loaded.rows[key].dtype == torch.float32
    assert loaded.metadata == {**META, "token": "<alice>"}
    assert _leftovers(tmp_path) == []


def test_safetensors_file_layout(tmp_path: Path) -> None:
    single = save_identity(Identity({"clip_l": _rows(3, 768)}, META), tmp_path / "a.safetensors", token="<a>")
    with safe_open(str(single), framework="pt") as handle:
        assert list(handle.keys()) == ["<a>"]
        tensor = handle.get_tensor("<a>")
        metadata = handle.metadata()
    assert tensor.shape == (3, 768) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert metadata["format"] == "pt"
    assert metadata["identity_tokens.method"] == "textual_inversion"
    assert metadata["identity_tokens.encoders"] == "clip_l"
    assert metadata["identity_tokens.token"] == "<a>"

    sdxl = Identity({"clip_l": _rows(2, 768), "clip_g": _rows(2, 1280)})
    path = save_identity(sdxl, tmp_path / "x.safetensors", token="<x>")
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["clip_g", "clip_l"]


def test_saving_a_view_does_not_store_the_whole_table(tmp_path: Path) -> None:
    table = torch.randn(1000, 32)
    table_bytes = table.numel() * table.element_size()
    path = save_identity(Identity({"clip_l": table[10:12]}), tmp_path / "v.safetensors", token="<v>")
    legacy = save_a1111_pt(Identity({"clip_l": table[10:12]}), tmp_path / "v.pt", name="v")
    for written in (path, legacy):
        assert written.stat().st_size < table_bytes
        assert torch.equal(load_identity(written).rows["clip_l"], table[10:12])


def test_save_identity_rejects_bad_token_and_suffix(tmp_path: Path) -> None:
    identity = Identity({"clip_l": _rows(1, 8)})
    with pytest.raises(IdentityError):
        save_identity(identity, tmp_path / "a.safetensors", token="two words")
    with pytest.raises(IdentityError):
        save_identity(identity, tmp_path / "a.pt", token="<a>")
    with pytest.raises(IdentityError):
        save_identity(Identity({"clip_g": _rows(1, 8)}), tmp_path / "g.safetensors", token="<g>")


def test_a1111_pt_round_trip(tmp_path: Path) -> None:
    rows = _rows(2, 768)
    path = save_a1111_pt(Identity({"clip_l": rows}, META), tmp_path / "alice.pt", name="alice")

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["string_to_token"] == {"*": 265}
    assert type(raw["string_to_param"]) is dict
    assert torch.equal(raw["string_to_param"]["*"], rows)
    assert raw["string_to_param"]["*"].dtype == torch.float32
    assert (raw["name"], raw["step"], raw["sd_checkpoint"], raw["sd_checkpoint_name"]) == ("alice", 500, None, None)

    loaded = load_identity(path)
    assert torch.equal(loaded.rows["clip_l"], rows)
    assert loaded.metadata == {"source_layout": "a1111", "name": "alice", "steps": "500"}


def test_a1111_pt_refuses_sdxl(tmp_path: Path) -> None:
    sdxl = Identity({"clip_l": _rows(1, 768), "clip_g": _rows(1, 1280)})
    with pytest.raises(IdentityError, match="two encoders"):
        save_a1111_pt(sdxl, tmp_path / "x.pt", name="x")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- foreign layouts


def test_diffusers_single_key_1d_safetensors(tmp_path: Path) -> None:
    vector = torch.randn(768)
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": vector}, str(path), metadata={"format": "pt"})
    loaded = load_identity(path)
    assert loaded.encoders == ("clip_l",)
    assert torch.equal(loaded.rows["clip_l"], vector.unsqueeze(0))
    assert loaded.metadata == {"source_layout": "diffusers", "token": "<cat-toy>"}


def test_diffusers_single_key_2d_bin(tmp_path: Path) -> None:
    rows = _rows(3, 1024)
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": rows}, path)
    loaded = load_identity(path)
    assert loaded.encoders == ("clip_h",)
    assert torch.equal(loaded.rows["clip_h"], rows)


def test_single_tensor_of_unknown_width_defaults_to_clip_l(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({"<t>": _rows(2, 32)}, str(path))
    assert load_identity(path).encoders == ("clip_l",)


def test_a1111_hand_written(tmp_path: Path) -> None:
    rows = _rows(4, 1024)
    path = tmp_path / "emb.pt"
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": rows},
        "name": "emb",
        "step": 1200,
        "sd_checkpoint": "abc123",
        "sd_checkpoint_name": "v2-1_768",
    }
    torch.save(data, path)
    loaded = load_identity(path)
    assert torch.equal(loaded.rows["clip_h"], rows)
    assert loaded.metadata["steps"] == "1200"
    assert loaded.metadata["name"] == "emb"
    assert describe_identity_file(path)["layout"] == "a1111"


def test_rinongal_parameter_dict(tmp_path: Path) -> None:
    rows = _rows(2, 768)
    path = tmp_path / "embeddings.pt"
    data = {
        "string_to_token": {"*": torch.tensor(265)},
        "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(rows.clone())}),
    }
    torch.save(data, path)
    with pytest.raises(pickle.UnpicklingError):  # the reason a safe fallback is needed at all
        torch.load(path, map_location="cpu", weights_only=True)

    loaded = load_identity(path)
    assert torch.equal(loaded.rows["clip_l"], rows)
    assert not loaded.rows["clip_l"].requires_grad
    assert loaded.metadata == {"source_layout": "rinongal"}
    assert torch.nn.ParameterDict not in torch.serialization.get_safe_globals()  # the allowlist does not leak


def test_cross_init_multi_key_orders_by_index(tmp_path: Path) -> None:
    vectors = [torch.full((768,), float(i)) for i in range(11)]
    keys = sorted(f"<ci>_v{i}" for i in range(11))  # string order puts _v10 before _v2
    assert keys[2] == "<ci>_v10"
    path = tmp_path / "learned_embeds.bin"
    torch.save({key: vectors[int(key.rsplit("_v", 1)[1])] for key in keys}, path)

    loaded = load_identity(path)
    assert loaded.n_tokens == 11
    assert loaded.rows["clip_l"][:, 0].tolist() == [float(i) for i in range(11)]
    assert loaded.metadata == {"source_layout": "cross_init_bin", "token": "<ci>"}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sdxl_foreign(tmp_path: Path, suffix: str) -> None:
    rows = {"clip_l": _rows(2, 768), "clip_g": _rows(2, 1280, seed=1)}
    path = tmp_path / f"xl{suffix}"
    if suffix == ".safetensors":
        save_file(rows, str(path))
    else:
        torch.save(rows, path)
    loaded = load_identity(path)
    assert loaded.encoders == ("clip_g", "clip_l")
    for key, value in rows.items():
        assert torch.equal(loaded.rows[key], value)
    assert loaded.metadata == {"source_layout": "sdxl"}


def test_half_precision_becomes_float32(tmp_path: Path) -> None:
    rows = _rows(2, 768)
    fp16 = tmp_path / "half.safetensors"
    save_file({"<h>": rows.half()}, str(fp16))
    bf16 = tmp_path / "brain.pt"
    torch.save({"<b>": rows.bfloat16()}, bf16)
    for path, dtype in ((fp16, torch.float16), (bf16, torch.bfloat16)):
        loaded = load_identity(path).rows["clip_l"]
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, rows.to(dtype).float())


def test_describe_identity_file(tmp_path: Path) -> None:
    rows = {
        "clip_l": torch.tensor([[3.0, 4.0], [0.0, 1.0]]),
        "clip_g": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]),
    }
    path = save_identity(Identity(rows, {"method": "ti"}), tmp_path / "d.safetensors", token="<d>")
    info = describe_identity_file(path)
    assert info["layout"] == "identity_tokens"
    assert info["encoders"] == ["clip_g", "clip_l"]
    assert info["n_tokens"] == 2
    assert info["widths"] == {"clip_g": 3, "clip_l": 2}
    assert info["row_norms"] == {"clip_g": [1.0, 2.0], "clip_l": [5.0, 1.0]}
    assert info["metadata"] == {"method": "ti", "token": "<d>"}
    assert info["file_size"] == path.stat().st_size


# ---------------------------------------------------------------- safe writing


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = save_identity(Identity({"clip_l": _rows(1, 8)}), tmp_path / "a.safetensors", token="<a>")
    before = path.read_bytes()
    with pytest.raises(InputError, match="exists; pass --overwrite") as error:
        save_identity(Identity({"clip_l": _rows(1, 8, seed=5)}), path, token="<a>")
    _assert_mentions(error, path)
    assert path.read_bytes() == before
    existing_pt = tmp_path / "a.pt"
    existing_pt.write_bytes(b"keep me")
    with pytest.raises(InputError, match="exists"):
        save_a1111_pt(Identity({"clip_l": _rows(1, 8)}), existing_pt, name="a")
    assert existing_pt.read_bytes() == b"keep me"
    assert _leftovers(tmp_path) == []

    newer = _rows(1, 8, seed=5)
    save_identity(Identity({"clip_l": newer}), path, token="<a>", overwrite=True)
    assert path.read_bytes() != before
    assert torch.equal(load_identity(path).rows["clip_l"], newer)


def test_check_output_path_problems(tmp_path: Path) -> None:
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    for bad in (blocker / "a.safetensors", tmp_path / "missing" / "a.safetensors", tmp_path):
        with pytest.raises(InputError) as error:
            check_output_path(bad, overwrite=True)
        _assert_mentions(error, bad)
    with pytest.raises(InputError, match="does not exist"):
        save_identity(Identity({"clip_l": _rows(1, 8)}), tmp_path / "missing" / "a.safetensors", token="<a>")
    assert not (tmp_path / "missing").exists()
    assert check_output_path(tmp_path / "ok.safetensors", overwrite=False) == tmp_path / "ok.safetensors"


def test_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root ignores directory modes: deny the write check the way a normal user meets it
        import core.files

        real_access = os.access
        monkeypatch.setattr(core.files.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    try:
        with pytest.raises(InputError, match="not writable"):
            save_identity(Identity({"clip_l": _rows(1, 8)}), locked / "a.safetensors", token="<a>")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_parent_is_a_file_when_saving(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    target = blocker / "a.safetensors"
    with pytest.raises(InputError) as error:
        save_identity(Identity({"clip_l": _rows(1, 8)}), target, token="<a>")
    _assert_mentions(error, target)


def _failing_writer(message: str) -> Callable[[Path], None]:
    """A writer that writes part of a file and then fails."""

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise RuntimeError(message)

    return write


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "a.safetensors"
    with pytest.raises(RuntimeError, match="midway"):
        atomic_write(target, _failing_writer("midway"), overwrite=False)
    assert list(tmp_path.iterdir()) == []

    target.write_bytes(b"original")
    with pytest.raises(RuntimeError, match="midway"):
        atomic_write(target, _failing_writer("midway"), overwrite=True)
    assert target.read_bytes() == b"original"
    assert _leftovers(tmp_path) == []


def test_permission_error_becomes_input_error(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        raise PermissionError(13, "Permission denied", str(tmp))

    target = tmp_path / "a.safetensors"
    with pytest.raises(InputError, match="permission denied") as error:
        atomic_write(target, write, overwrite=False)
    _assert_mentions(error, target)
    assert list(tmp_path.iterdir()) == []


def test_file_appearing_during_write_is_not_clobbered(tmp_path: Path) -> None:
    target = tmp_path / "a.safetensors"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"someone else's")  # another process wins the race

    with pytest.raises(InputError, match="exists"):
        atomic_write(target, write, overwrite=False)
    assert target.read_bytes() == b"someone else's"
    assert _leftovers(tmp_path) == []


def test_atomic_write_success(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    assert atomic_write(target, lambda tmp: tmp.write_bytes(b"data"), overwrite=False) == target
    assert target.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


# ---------------------------------------------------------------- unsafe and broken files


class _MarkerPayload:
    """Pickles into a call that would create a marker file if it were ever run."""

    def __init__(self, func: Callable[..., object], arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (self.func, (self.arg,))


def _payloads(marker: Path) -> dict[str, object]:
    """Malicious objects that would each create `marker` when unpickled."""
    return {
        "os.system": _MarkerPayload(os.system, f"touch '{marker}'"),
        "exec": _MarkerPayload(exec, f"open({str(marker)!r}, 'w').write('pwned')"),
    }


@pytest.mark.parametrize("payload_name", ["os.system", "exec"])
@pytest.mark.parametrize("container", ["zip", "legacy", "raw_pickle", "with_parameter_dict"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, payload_name: str, container: str) -> None:
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[payload_name]
    path = tmp_path / "evil.pt"
    data: dict[str, object] = {"<tok>": torch.zeros(768), "extra": payload}
    if container == "zip":
        torch.save(data, path)
    elif container == "legacy":
        torch.save(data, path, _use_new_zipfile_serialization=False)
    elif container == "raw_pickle":
        path.write_bytes(pickle.dumps(data, protocol=2))
    else:
        rinongal = {
            "string_to_token": {"*": torch.tensor(265)},
            "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 768))}),
            "extra": payload,
        }
        torch.save(rinongal, path)

    with pytest.raises(IdentityError) as error:
        load_identity(path)
    _assert_mentions(error, path)
    assert not marker.exists()
    assert torch.nn.ParameterDict not in torch.serialization.get_safe_globals()


def test_refusal_message_names_the_global(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": _payloads(marker)["os.system"]}, path)
    with pytest.raises(IdentityError, match=r"refused.*system"):
        load_identity(path)
    assert not marker.exists()


def _write(path: Path, data: object) -> Path:
    """Write hand-made content: bytes as-is, a dict of tensors by extension."""
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif path.suffix == ".safetensors":
        save_file(data, str(path))  # type: ignore[arg-type]
    else:
        torch.save(data, path)
    return path


def _good_bytes(tmp_path: Path, suffix: str) -> bytes:
    """The bytes of a valid embedding file, for truncating."""
    good = tmp_path / f"good{suffix}"
    _write(good, {"<t>": _rows(2, 768)})
    return good.read_bytes()


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("trunc.safetensors", lambda tmp: _good_bytes(tmp, ".safetensors")[:-100], "cannot be read"),
        ("junk.safetensors", lambda tmp: b"\x00\x01 not a safetensors file", "cannot be read"),
        ("trunc.pt", lambda tmp: _good_bytes(tmp, ".pt")[:200], "cannot be read"),
        ("junk.bin", lambda tmp: b"definitely not a pickle", "cannot be read"),
        ("empty_file.pt", lambda tmp: b"", "cannot be read"),
        ("empty.safetensors", lambda tmp: {}, "no tensors"),
        ("empty.pt", lambda tmp: {}, "no tensors"),
        ("nan.safetensors", lambda tmp: {"<t>": torch.tensor([[1.0, float("nan")]])}, "NaN"),
        ("inf.pt", lambda tmp: {"<t>": torch.tensor([float("inf"), 1.0])}, "NaN or infinite"),
        ("text.pt", lambda tmp: {"<t>": "not a tensor"}, "not a tensor"),
        ("ints.pt", lambda tmp: {"<t>": torch.arange(4)}, "not floats"),
        ("list.pt", lambda tmp: [torch.zeros(3)], "not a dict"),
        ("keys.pt", lambda tmp: {"alpha": torch.zeros(3), "beta": torch.zeros(3)}, "'alpha', 'beta'"),
        ("two.pt", lambda tmp: {"string_to_param": {"*": torch.zeros(1, 4), "b": torch.zeros(1, 4)}}, "exactly one"),
        ("3d.pt", lambda tmp: {"<t>": torch.zeros(1, 2, 3)}, "expected"),
        (
            "xl_n.safetensors",
            lambda tmp: {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)},
            "token count",
        ),
        ("ci_dup.bin", lambda tmp: {"<c>_v1": torch.zeros(4), "<c>_v01": torch.zeros(4)}, "both claim"),
        ("model.ckpt", lambda tmp: {"<t>": torch.zeros(3)}, r"unknown extension.*\.safetensors"),
        ("notes.txt", lambda tmp: b"hello", "unknown extension"),
    ],
)
def test_bad_files_raise_identity_error(tmp_path: Path, name: str, make: Callable[[Path], object], match: str) -> None:
    path = _write(tmp_path / name, make(tmp_path))
    with pytest.raises(IdentityError, match=match) as error:
        load_identity(path)
    _assert_mentions(error, path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.safetensors", tmp_path):
        with pytest.raises(IdentityError) as error:
            load_identity(path)
        _assert_mentions(error, path)
