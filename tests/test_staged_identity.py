"""Per-stage (SeFi-IDE-style) identities: the type, the sefi-stages file layout, and the lossy plain export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.formats import describe_identity_file, load_identity, save_a1111_pt, save_identity
from core.identity import Identity, IdentityError, plain_export
from core.stages import StageSchedule

META = {"method": "sefi-ide", "base_model": "sd15", "steps": "300"}
SDXL_WIDTHS = {"clip_l": 768, "clip_g": 1280}


def _stages(widths: dict[str, int], count: int = 5, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random (2, S, n, width) key/value tensors per encoder."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(2, count, n, width, generator=generator) for key, width in widths.items()}


def _staged(widths: dict[str, int], count: int = 5, n: int = 2) -> Identity:
    """A per-stage identity on the uniform schedule."""
    return Identity.from_stages(_stages(widths, count, n), StageSchedule.uniform(count), META)


def _saved(tmp_path: Path, widths: dict[str, int] | None = None) -> Path:
    """A per-stage identity saved as <tmp>/s.safetensors."""
    return save_identity(_staged(widths or {"clip_l": 16}), tmp_path / "s.safetensors", token="<s>")


def _edited(path: Path, tensors: dict | None = None, metadata: dict | None = None, drop: str | None = None) -> Path:
    """A copy of a saved file with some tensors or metadata replaced (a hand-edited or damaged file)."""
    stored = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        stored_metadata = dict(handle.metadata())
    stored.update(tensors or {})
    stored_metadata.update(metadata or {})
    if drop is not None:
        stored.pop(drop)
    edited = path.with_name("edited.safetensors")
    save_file(stored, str(edited), metadata=stored_metadata)
    return edited


# ---------------------------------------------------------------- the type


def test_rows_are_the_middle_stage_value_rows() -> None:
    for count, middle in ((5, 2), (4, 2), (1, 0)):
        stages = _stages({"clip_l": 8}, count)
        identity = Identity.from_stages(stages, StageSchedule.uniform(count), META)
        assert identity.is_staged and identity.num_stages == count
        assert torch.equal(identity.rows["clip_l"], stages["clip_l"][1, middle])
        assert not torch.equal(identity.rows["clip_l"], stages["clip_l"][0, middle])  # the value, not the key


def test_from_stages_metadata_and_schedule() -> None:
    uniform = _staged({"clip_l": 8})
    assert uniform.schedule == StageSchedule.uniform(5)
    assert uniform.metadata == {
        **META,
        "stage_bounds": "0,200,400,600,800,1000",
        "num_stages": "5",
        "stage_rule": "floor(t*S/T)",
    }
    custom = Identity.from_stages(_stages({"clip_l": 8}, 3), StageSchedule.parse("0,100,500,1000"), META)
    assert custom.metadata["stage_rule"] == "bounds"
    assert custom.schedule == StageSchedule((0, 100, 500, 1000))


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ({"clip_l": torch.zeros(2, 5, 1, 8), "clip_g": torch.zeros(2, 4, 1, 12)}, "stage count"),
        ({"clip_l": torch.zeros(2, 5, 1, 8), "clip_g": torch.zeros(2, 5, 2, 12)}, "token count"),
        ({"clip_l": torch.zeros(5, 1, 8)}, r"expected \(2, stages, n_tokens, width\)"),
        ({"clip_l": torch.zeros(3, 5, 1, 8)}, r"expected \(2, stages, n_tokens, width\)"),
    ],
    ids=["stages-differ", "n-differs", "3-d", "not-key-value"],
)
def test_from_stages_refuses_bad_tensors(stages: dict[str, torch.Tensor], match: str) -> None:
    with pytest.raises(IdentityError, match=match):
        Identity.from_stages(stages, StageSchedule.uniform(5), META)


def test_from_stages_refuses_a_schedule_of_another_length() -> None:
    with pytest.raises(IdentityError, match="the schedule has 3 stages .* the tensors hold 5"):
        Identity.from_stages(_stages({"clip_l": 8}), StageSchedule.uniform(3), META)


def test_direct_construction_is_checked_against_the_rows() -> None:
    stages = _stages({"clip_l": 8})
    meta = {"stage_bounds": "0,200,400,600,800,1000"}
    middle = stages["clip_l"][1, 2]
    assert Identity({"clip_l": middle}, meta, stages).metadata["num_stages"] == "5"
    with pytest.raises(IdentityError, match="rows' token count and width"):
        Identity({"clip_l": torch.zeros(3, 8)}, meta, stages)  # wrong n
    with pytest.raises(IdentityError, match="rows' token count and width"):
        Identity({"clip_l": torch.zeros(2, 9)}, meta, stages)  # wrong width
    with pytest.raises(IdentityError, match="not the value rows of the middle stage"):
        Identity({"clip_l": stages["clip_l"][0, 2]}, meta, stages)
    with pytest.raises(IdentityError, match="stage_bounds"):
        Identity({"clip_l": middle}, {}, stages)
    with pytest.raises(IdentityError, match="encoders"):
        Identity({"clip_l": middle, "clip_g": torch.zeros(2, 8)}, meta, stages)


def test_stage_rows_for() -> None:
    identity = _staged(SDXL_WIDTHS, n=1)
    assert torch.equal(identity.stage_rows_for("clip_g", 1280), identity.stages["clip_g"])
    assert identity.stage_rows_for("clip_l", 768).shape == (2, 5, 1, 768)
    with pytest.raises(IdentityError, match="1280 wide but text encoder 'clip_g' takes 768"):
        identity.stage_rows_for("clip_g", 768)
    with pytest.raises(IdentityError, match="no rows for text encoder 'clip_h'"):
        identity.stage_rows_for("clip_h", 1024)
    lone = _staged({"clip_l": 8})
    assert torch.equal(lone.stage_rows_for("clip_h", 8), lone.stages["clip_l"])  # like rows_for
    with pytest.raises(IdentityError, match="plain .* no per-stage key/value tokens"):
        plain_export(lone).stage_rows_for("clip_l", 8)


# ---------------------------------------------------------------- the file


@pytest.mark.parametrize(
    "widths", [{"clip_l": 768}, {"clip_h": 1024}, {"clip_h": 16}, SDXL_WIDTHS], ids=["sd1", "sd2", "sd2-tiny", "sdxl"]
)
def test_round_trip_keeps_every_tensor_and_the_schedule(tmp_path: Path, widths: dict[str, int]) -> None:
    stages = _stages(widths, count=3, n=2)
    schedule = StageSchedule.parse("0,300,700,1000")
    identity = Identity.from_stages(stages, schedule, META)
    loaded = load_identity(save_identity(identity, tmp_path / "a.safetensors", token="<a>"))
    assert loaded.is_staged and loaded.schedule == schedule
    assert loaded.encoders == identity.encoders
    for key in widths:
        assert torch.equal(loaded.stages[key], stages[key])
        assert torch.equal(loaded.rows[key], stages[key][1, 1])
        assert loaded.stages[key].dtype == torch.float32
    assert loaded.metadata == {**identity.metadata, "token": "<a>"}


def test_file_layout(tmp_path: Path) -> None:
    identity = _staged(SDXL_WIDTHS, count=5, n=1)
    path = save_identity(identity, tmp_path / "a.safetensors", token="<a>")
    with safe_open(str(path), framework="pt") as handle:
        names = sorted(handle.keys())
        tensors = {name: handle.get_tensor(name) for name in names}
        metadata = handle.metadata()
    assert names == ["sefi.k.clip_g", "sefi.k.clip_l", "sefi.v.clip_g", "sefi.v.clip_l"]  # no plain tensors
    assert tensors["sefi.k.clip_g"].shape == (5, 1, 1280) and tensors["sefi.v.clip_l"].shape == (5, 1, 768)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert torch.equal(tensors["sefi.k.clip_l"], identity.stages["clip_l"][0])
    assert torch.equal(tensors["sefi.v.clip_l"], identity.stages["clip_l"][1])
    assert metadata["identity_tokens.layout"] == "sefi-stages"
    assert metadata["identity_tokens.encoders"] == "clip_g,clip_l"
    assert metadata["identity_tokens.num_stages"] == "5"
    assert metadata["identity_tokens.stage_bounds"] == "0,200,400,600,800,1000"
    assert metadata["identity_tokens.stage_rule"] == "floor(t*S/T)"
    assert metadata["identity_tokens.token"] == "<a>"
    assert metadata["identity_tokens.method"] == "sefi-ide"


def test_describe_names_the_per_stage_kind(tmp_path: Path) -> None:
    info = describe_identity_file(_saved(tmp_path))
    assert info["layout"] == "sefi-stages"
    assert info["kind"] == "per-stage (SeFi-IDE-style), 5 stages, key/value tokens"
    assert info["num_stages"] == 5 and info["stage_bounds"] == [0, 200, 400, 600, 800, 1000]
    assert len(info["stage_norms"]["clip_l"]["key"]) == 5
    plain = save_identity(Identity({"clip_l": torch.ones(1, 4)}), tmp_path / "p.safetensors", token="<p>")
    assert describe_identity_file(plain)["kind"] == "plain, one vector per token"


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"identity_tokens.stage_bounds": "0,200,800"}, "num_stages 5 but stage_bounds '0,200,800' give 2 stages"),
        ({"identity_tokens.stage_bounds": "100,200,400,600,800,1000"}, "from timestep 0 without gaps"),
        ({"identity_tokens.stage_bounds": "0,400,200,600,800,1000"}, "from timestep 0 without gaps"),
        ({"identity_tokens.stage_bounds": "0,a,400,600,800,1000"}, "not comma-separated whole numbers"),
        ({"identity_tokens.stage_bounds": "0,250,500,1000", "identity_tokens.num_stages": "3"}, r"expected \(3,"),
        ({"identity_tokens.layout": "other"}, "not the metadata 'identity_tokens.layout = sefi-stages'"),
    ],
    ids=["too-few-bounds", "not-from-0", "not-increasing", "not-numbers", "tensors-disagree", "no-marker"],
)
def test_bad_stage_metadata_is_refused(tmp_path: Path, metadata: dict[str, str], match: str) -> None:
    edited = _edited(_saved(tmp_path), metadata=metadata)
    with pytest.raises(IdentityError, match=match) as error:
        load_identity(edited)
    assert str(edited) in str(error.value)


def test_missing_or_odd_tensors_are_refused(tmp_path: Path) -> None:
    saved = _saved(tmp_path, SDXL_WIDTHS)
    with pytest.raises(IdentityError, match=r"\['sefi.v.clip_g'\] are missing") as error:
        load_identity(_edited(saved, drop="sefi.v.clip_g"))
    assert str(tmp_path / "edited.safetensors") in str(error.value)
    with pytest.raises(IdentityError, match="besides the per-stage ones"):
        load_identity(_edited(saved, tensors={"clip_l": torch.zeros(2, 768)}))
    with pytest.raises(IdentityError, match="key and value tokens need the same shape"):
        load_identity(_edited(saved, tensors={"sefi.k.clip_l": torch.zeros(5, 3, 768)}))
    with pytest.raises(IdentityError, match="NaN or infinite"):
        load_identity(_edited(saved, tensors={"sefi.k.clip_l": torch.full((5, 2, 768), float("nan"))}))


def test_legacy_pt_refuses_a_staged_identity(tmp_path: Path) -> None:
    target = tmp_path / "a.pt"
    with pytest.raises(IdentityError, match="per-stage key/value tokens.*plain_export"):
        save_a1111_pt(_staged({"clip_l": 768}), target, name="a")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the plain export


class _Vocab:
    """The one tokenizer method diffusers' embedding-file reader calls."""

    def get_vocab(self) -> dict[str, int]:
        return {}


def _diffusers_reads(path: Path) -> tuple[list[str], list[torch.Tensor]]:
    """Tokens and embeddings as diffusers' load_textual_inversion takes them from a file's state dict."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    return TextualInversionLoaderMixin._retrieve_tokens_and_embeddings([None], [load_file(str(path))], _Vocab())


def test_plain_export_keeps_the_middle_value_rows(tmp_path: Path) -> None:
    staged = load_identity(_saved(tmp_path))
    plain = plain_export(staged)
    assert not plain.is_staged and plain.schedule is None
    assert torch.equal(plain.rows["clip_l"], staged.stages["clip_l"][1, 2])
    assert plain.metadata["lossy"] == "true"
    assert plain.metadata["exported_from"] == (
        "per-stage identity (5 stages, key/value split): only the middle stage's value token kept"
    )
    assert plain.metadata["method"] == "sefi-ide" and plain.metadata["token"] == "<s>"
    assert not {"stage_bounds", "num_stages", "stage_rule"} & set(plain.metadata)

    path = save_identity(plain, tmp_path / "plain.safetensors", token="<s>")
    loaded = load_identity(path)
    assert not loaded.is_staged and torch.equal(loaded.rows["clip_l"], plain.rows["clip_l"])
    assert loaded.metadata == plain.metadata
    tokens, embeddings = _diffusers_reads(path)  # a stock loader takes it as one 2-vector token
    assert tokens == ["<s>"] and torch.equal(embeddings[0], plain.rows["clip_l"])
    pt = torch.load(save_a1111_pt(plain, tmp_path / "plain.pt", name="s"), weights_only=True)
    assert torch.equal(pt["string_to_param"]["*"], plain.rows["clip_l"])


def test_staged_file_is_not_a_stock_embedding(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Loaded state dictionary is incorrect"):
        _diffusers_reads(_saved(tmp_path))


def test_plain_export_sdxl_saves_the_stock_sdxl_keys(tmp_path: Path) -> None:
    plain = plain_export(_staged(SDXL_WIDTHS, n=1))
    path = save_identity(plain, tmp_path / "x.safetensors", token="<x>")
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["clip_g", "clip_l"]
        assert handle.get_tensor("clip_g").shape == (1, 1280)


def test_plain_export_refuses_a_plain_identity() -> None:
    with pytest.raises(IdentityError, match="already plain"):
        plain_export(Identity({"clip_l": torch.zeros(1, 8)}, META))
