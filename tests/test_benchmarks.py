"""The benchmark scripts run (tiny model, a couple of steps) and the baseline keeps the diffusers example's semantics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.baseline_ti import BaselineTI, cast_copy, family_of, random_components
from benchmarks.compare_baseline import (
    MODES,
    BaselineRunner,
    PackRunner,
    build_pack_model,
    compare,
    count_flops,
    matmul_peak,
    mode_config,
)
from benchmarks.gpu_tables import loops_table as markdown_table
from core.templates import training_prompts
from core.trainer import TrainConfig, preset_config


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def parts() -> dict[str, dict[str, object]]:
    """float32 random components, built once: the loops copy what they change (text encoders, tokenizers)."""
    return {name: random_components(name) for name in ("tiny", "tiny-sdxl")}


def _loop(components: dict[str, object], name: str, **kwargs: object) -> BaselineTI:
    images, templates = _images(), training_prompts("object")
    return BaselineTI(family_of(name), components, images, templates, num_vectors=2, batch_size=2, **kwargs)


def _counting_vae(loop: BaselineTI, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of the VAE's own encode method (not the loop's bookkeeping)."""
    calls = [0]
    encode = loop.vae.encode

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(loop.vae, "encode", counted)
    return calls


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_baseline_trains_only_placeholder_rows_and_encodes_every_step(
    parts: dict, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = _loop(parts[name], name)
    calls = _counting_vae(loop, monkeypatch)
    starts = [t.detach().clone() for t in loop.tables]
    for tokenizer, table, ids in zip(loop.tokenizers, loop.tables, loop.placeholder_ids):
        assert table.shape[0] == len(tokenizer) == 49408 + 2  # the table was resized for the two added tokens
        assert ids == [49408, 49409]
        assert table.dtype == torch.float32 and table.requires_grad
    # the whole table of each encoder, and nothing else, is in AdamW
    assert [p for g in loop.optimizer.param_groups for p in g["params"]] == loop.tables
    for step in (1, 2):
        loop.step()
        assert calls[0] == step  # the VAE encodes the batch every step
        for table, start, ids in zip(loop.tables, starts, loop.placeholder_ids):
            others = torch.ones(table.shape[0], dtype=torch.bool)
            others[ids] = False
            assert torch.equal(table[others], start[others])  # every other row restored exactly
            assert not torch.equal(table[ids], start[ids])  # the placeholder rows trained


def test_without_the_restore_other_rows_would_change(parts: dict) -> None:
    loop = _loop(parts["tiny"], "tiny")
    loop._restore_other_rows = lambda: None  # what the restore prevents: AdamW moves rows of prompt words too
    start = loop.tables[0].detach().clone()
    loop.step()
    others = torch.ones(start.shape[0], dtype=torch.bool)
    others[loop.placeholder_ids[0]] = False
    assert not torch.equal(loop.tables[0][others], start[others])


def test_baseline_mixed_precision_casts_unet_and_vae_weights_and_keeps_text_encoder_fp32(parts: dict) -> None:
    master = parts["tiny"]
    with pytest.raises(ValueError, match="bfloat16"):
        BaselineTI("sd1", master, _images(), ["a photo of a {}"], mixed_precision="bf16")
    half = {**master, "unet": cast_copy(master["unet"], torch.bfloat16), "vae": cast_copy(master["vae"], torch.bfloat16)}
    loop = BaselineTI("sd1", half, _images(), ["a photo of a {}"], mixed_precision="bf16", batch_size=2)
    assert next(master["unet"].parameters()).dtype == torch.float32  # the master weights are left as they were
    assert torch.isfinite(torch.tensor(loop.step()))
    assert next(loop.unet.parameters()).dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in loop.tables)


def test_compare_runs_both_loops_side_by_side(parts: dict) -> None:
    result = compare(
        model="tiny", resolution=32, batch_size=2, warmup=1, steps=1, rounds=1, flops=False, log=lambda _: None,
        components=parts["tiny"],
    )
    loops = result["loops"]
    assert set(loops) == {"pack", "baseline (no)", "baseline (bf16)"}
    assert all(e["status"] == "ok" and e["samples_per_s"] > 0 for e in loops.values())
    assert loops["pack"]["ratio_vs_baseline (bf16)"] > 0
    assert result["info"]["target_3x_vs_mixed"].startswith(("holds", "misses"))
    assert "| pack | fp32 |" in markdown_table(result)


def test_flop_count_and_matmul_peak(parts: dict) -> None:
    model = build_pack_model("sd1", parts["tiny"], torch.device("cpu"), torch.float32, "random-tiny")
    config = preset_config("cross_init", steps=1, batch_size=2, resolution=32, token="<pack>")
    pack = PackRunner(model, _images(), config)
    loop = BaselineTI("sd1", parts["tiny"], _images(), training_prompts(config.templates), num_vectors=2, batch_size=2)
    pack_flops, pack_parts = count_flops(pack)
    base_flops, base_parts = count_flops(BaselineRunner(loop))
    assert 0 < pack_flops < base_flops  # the baseline also runs the VAE encoder every step
    assert "Encoder" in base_parts and "Encoder" not in pack_parts
    assert pack_parts["UNet2DConditionModel"] == base_parts["UNet2DConditionModel"]
    assert pack.trainer.steps_done == 1
    assert matmul_peak(torch.device("cpu"), torch.bfloat16, size=64, seconds=0.01) > 0


def test_memory_modes_fall_back_to_not_available() -> None:
    config = TrainConfig()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for mode in MODES:
        got = mode_config(config, mode)
        usable = [o for o in MODES[mode] if set(o) <= fields]
        if usable:
            assert all(getattr(got, k) == v for k, v in usable[0].items())
        else:
            assert got.startswith("not available")
