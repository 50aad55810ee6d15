"""The meta-device memory estimate and the choice of memory mode (checkpointing, micro-batch) before training."""

from __future__ import annotations

import math

import pytest
import torch

from core.memory import (
    GB,
    HEADROOM,
    LiveBytes,
    MemoryPlan,
    _micro_batch_sizes,
    choose_memory_mode,
    estimate_training_memory,
    fixed_plan,
    free_memory_bytes,
    module_bytes,
    training_estimator,
)

SD1_PARAMETERS = 859_520_964 + 123_060_480 + 83_653_863  # UNet + CLIP ViT-L/14 text model + KL VAE of SD1.5


def _sd1(resolution: int, micro_batch: int, checkpointing: bool = False):  # noqa: ANN202 - a Footprint
    """The SD1 estimate in fp16 (cached by core.memory)."""
    return estimate_training_memory("sd1", resolution, micro_batch, torch.float16, checkpointing)


def test_live_bytes_follows_creation_and_freeing() -> None:
    """Storages count while alive, views add nothing, and the peak is the most held at once."""
    with LiveBytes() as live:
        first = torch.empty(1024, device="meta")  # 4 KiB
        second = torch.empty(2048, device="meta")  # 8 KiB
        del first
        third = torch.empty(1024, device="meta")
        view = second.view(2, 1024)
        assert live.live == 12 * 1024 and live.peak == 12 * 1024
        del second, third, view
        assert live.live == 0


def test_weights_are_the_real_sd1_parameter_count() -> None:
    """fp16 weights are two bytes per parameter of the real UNet, text encoder and VAE built from the shipped configs."""
    footprint = _sd1(128, 1)
    assert abs(footprint.weights - 2 * SD1_PARAMETERS) < 0.001 * footprint.weights
    fp32 = estimate_training_memory("sd1", 128, 1, torch.float32)
    assert abs(fp32.weights - 2 * footprint.weights) <= 77 * 8  # but CLIP's int64 position ids


def test_text_encoders_count_the_step_prompts() -> None:
    """The step's prompts go through the text encoders once, whatever the micro-batch: more prompts, more memory."""
    one = estimate_training_memory("sd1", 128, 1, torch.float16, True, prompts=1)
    eight = estimate_training_memory("sd1", 128, 1, torch.float16, True, prompts=8)
    assert one.activations < eight.activations
    assert one.weights == eight.weights


def test_estimate_grows_with_micro_batch() -> None:
    """More samples per pass hold proportionally more activations."""
    one, two, four = (_sd1(128, size) for size in (1, 2, 4))
    assert one.peak < two.peak < four.peak
    assert four.activations == pytest.approx(4 * one.activations, rel=0.05)
    assert one.weights == four.weights


def test_estimate_grows_with_resolution() -> None:
    """Activations grow with the latent area (less than in proportion at small sizes: the text encoder is fixed)."""
    small, large = _sd1(128, 1), _sd1(256, 1)
    assert small.peak < large.peak
    assert 2.5 < large.activations / small.activations < 6


def test_checkpointing_lowers_the_estimate() -> None:
    """Checkpointed UNet layers keep a fraction of the activations, and the peak drops."""
    plain, checkpointed = _sd1(256, 2), _sd1(256, 2, checkpointing=True)
    assert checkpointed.peak < plain.peak
    assert checkpointed.activations < 0.4 * plain.activations
    assert checkpointed.saved < 0.4 * plain.saved


def test_the_issue_numbers_for_sd15() -> None:
    """SD1.5 at 512 px, batch 8: about 9 GB by default (issue 7), at most 6 GB in the low-memory mode (its target)."""
    estimate = training_estimator("sd1", 512, 8)
    default, low = estimate(False, 8), estimate(True, 1)
    assert 8e9 < default < 10e9, default / 1e9
    assert low <= 6 * GB, low / GB


def test_the_issue_target_for_sdxl() -> None:
    """SDXL at 1024 px, batch 8: at most 12 GB with checkpointing and micro-batch 1."""
    low = training_estimator("sdxl", 1024, 8)(True, 1)
    assert low <= 12 * GB, low / GB


def test_bad_inputs_are_refused() -> None:
    """An unknown family names the shipped ones; odd resolutions and empty micro-batches are errors."""
    with pytest.raises(ValueError, match="sd1"):
        estimate_training_memory("flux", 512, 1)
    with pytest.raises(ValueError, match="multiple of 8"):
        estimate_training_memory("sd1", 500, 1)
    with pytest.raises(ValueError, match="at least 1"):
        estimate_training_memory("sd1", 512, 0)


def test_training_estimator_is_cached() -> None:
    """The second estimate of the same setting comes from the cache."""
    estimate = training_estimator("sd1", 128, 4)
    first = estimate(True, 3)
    hits = estimate_training_memory.cache_info().hits
    assert estimate(True, 3) == first
    assert estimate_training_memory.cache_info().hits == hits + 1


# The mode chooser, on a made-up estimate: 1 GB of weights, 1 GB per sample, a quarter of that when checkpointed.


def _fake(calls: list | None = None):  # noqa: ANN202 - an ESTIMATE
    """peak = 1 GB + micro_batch x (1 GB, or 0.25 GB with checkpointing)."""

    def estimate(checkpointing: bool, micro_batch: int) -> int:
        if calls is not None:
            calls.append((checkpointing, micro_batch))
        return int(GB + micro_batch * (0.25 if checkpointing else 1.0) * GB)

    return estimate


def _free(usable_gb: float) -> int:
    """Free bytes whose usable share (HEADROOM) is usable_gb."""
    return math.ceil(usable_gb * GB / HEADROOM)


@pytest.mark.parametrize(
    ("usable_gb", "checkpointing", "micro_batch", "fits"),
    [
        (20.0, False, 8, True),  # 9 GB default fits
        (9.0, False, 8, True),  # exactly
        (8.9, True, 8, True),  # 3 GB with checkpointing
        (2.9, True, 4, True),  # 2 GB at 4 per pass
        (1.8, True, 3, True),  # 1.75 GB at 3 per pass
        (1.6, True, 2, True),
        (1.3, True, 1, True),
        (1.1, True, 1, False),  # not even micro-batch 1
    ],
)
def test_choose_memory_mode(usable_gb: float, checkpointing: bool, micro_batch: int, fits: bool) -> None:
    """Default if it fits, else checkpointing, else the largest micro-batch that fits, else 'does not fit'."""
    plan = choose_memory_mode(_fake(), _free(usable_gb), 8)
    assert (plan.checkpointing, plan.micro_batch, plan.fits) == (checkpointing, micro_batch, fits)
    assert plan.peak_bytes == _fake()(checkpointing, micro_batch)


def test_choose_memory_mode_matches_a_full_search_with_few_estimates() -> None:
    """The binary search over micro-batches picks what trying every one would, with a handful of estimates."""
    for batch in (1, 2, 5, 8, 16):
        for tenths in range(10, 200):
            calls: list = []
            free = _free(tenths / 10)
            plan = choose_memory_mode(_fake(calls), free, batch)
            fitting = [m for m in range(batch, 0, -1) if _fake()(True, m) <= free * HEADROOM]
            if _fake()(False, batch) <= free * HEADROOM:
                assert (plan.checkpointing, plan.micro_batch) == (False, batch)
            elif fitting:
                assert plan.checkpointing and plan.fits
                assert plan.micro_batches == math.ceil(batch / fitting[0])
            else:
                assert not plan.fits and plan.micro_batch == 1
            assert len(calls) <= 2 + math.ceil(math.log2(batch + 1)) + 1


def test_micro_batch_sizes_are_balanced() -> None:
    """One size per number of passes, largest first: 8 -> 4, 3, 2, 1 (3 means passes of 3, 3, 2)."""
    assert _micro_batch_sizes(8) == [4, 3, 2, 1]
    assert _micro_batch_sizes(10) == [5, 4, 3, 2, 1]
    assert _micro_batch_sizes(1) == []


def test_describe_lines() -> None:
    """One log line per plan, in GB of 2**30 bytes."""
    low = MemoryPlan(True, 2, 8, int(5.8 * GB), int(7.6 * GB))
    assert low.describe() == "estimated peak 5.8 GB with gradient checkpointing, micro-batch 2 of 8; 7.6 GB free"
    assert low.mode == "checkpointing + micro-batch" and low.micro_batches == 4
    default = MemoryPlan(False, 8, 8, int(8.3 * GB), None)
    assert default.describe() == "estimated peak 8.3 GB without gradient checkpointing; free memory unknown"
    assert default.mode == "default"
    too_big = choose_memory_mode(_fake(), int(1.0 * GB), 8)
    assert "does not fit" in too_big.describe() and "lower the resolution" in too_big.describe()


def test_unknown_free_memory_keeps_the_default() -> None:
    """Without a free-memory reading (an accelerator the pack cannot query) the plan is the default mode."""
    plan = choose_memory_mode(_fake(), None, 8)
    assert (plan.checkpointing, plan.micro_batch, plan.fits) == (False, 8, True)


def test_fixed_plan_reports_whether_a_chosen_mode_fits() -> None:
    """A mode the user picked gets its estimate and a fits flag; the micro-batch is capped at the batch."""
    plan = fixed_plan(_fake(), _free(2.0), 8, checkpointing=True, micro_batch=2)
    assert (plan.micro_batch, plan.fits, plan.peak_bytes) == (2, True, int(1.5 * GB))
    assert not fixed_plan(_fake(), _free(2.0), 8, checkpointing=False).fits
    assert fixed_plan(_fake(), None, 8, checkpointing=False, micro_batch=20).micro_batch == 8


def test_free_memory_counts_models_already_on_the_device() -> None:
    """Weights of the models the run will use count as available when they already sit on that device."""
    model = torch.nn.Linear(256, 256)
    alone = free_memory_bytes(torch.device("cpu"))
    if alone is None:
        pytest.skip("psutil is not installed")
    with_model = free_memory_bytes(torch.device("cpu"), [model])
    assert module_bytes([model]) == (256 * 256 + 256) * 4
    assert abs(with_model - alone - module_bytes([model])) < 64 * 2**20  # other processes move the reading a little
    assert free_memory_bytes(torch.device("meta")) is None
