"""The ComfyUI and diffusers backends give the same face-wise attention loss, gradient and maps on the same weights.

In-process on CI's ComfyUI with the tiny models of tests/comfy_tiny.py, which hold the same weights as the diffusers
components. For each backend a Trainer is built with the same config (a SeFi-IDE-style face loss in mask or reference
mode, optionally per-stage tokens), the same initial rows and the same face masks; one batch, sampled from the
diffusers trainer, goes through Trainer.loss on both, inside the backend's recording() block (and, for ComfyUI,
inside trainable(), under the executor's inference mode, as tests/test_comfy_backend.py's step test does).

Tolerances (as the diffusion-loss parity test, test_comfy_backend.py::test_one_training_step_equals_diffusers):
loss rtol 1e-4, atol 0; row gradients rtol 1e-4, atol 1e-4 x the largest gradient entry; recorded maps rtol 1e-4,
atol 1e-5 (as test_attention_comfy.py's map test; the maps' entries are about 1/77). Measured on CPU: the losses
agree within 4e-7 relative, the gradients within 1.5e-6 of their peak, the maps within 2e-8 absolute; the attention
term is 0.69 to 1.0 of the gradient's peak at WEIGHT (the test asks for more than 0.1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from tests.comfy_tiny import TinyComfy, comfy_ready
from tests.conftest_comfy_tiny import TinyFactory

comfy_ready()  # 'identity_tokens' and 'comfy' importable from here on
from identity_tokens.core.identity import Identity  # noqa: E402
from identity_tokens.core.sefi import FaceLoss  # noqa: E402
from identity_tokens.core.trainer import Batch, TrainConfig, Trainer, preset_config  # noqa: E402
from identity_tokens.nodes import comfy_backend as backend  # noqa: E402
from identity_tokens.nodes.comfy_backend import comfy_model  # noqa: E402

MODES = ("mask", "reference")
LOSS_TOL = {"rtol": 1e-4, "atol": 0.0}
MAP_TOL = {"rtol": 1e-4, "atol": 1e-5}
TIMESTEPS = torch.tensor([137, 811])  # with 2 stages (bounds 0, 500, 1000): one sample in each stage
WEIGHT = 5.0  # large enough that the attention term moves the row gradient by a good share (checked below)


@dataclasses.dataclass
class Run:
    """What one backend's Trainer.loss gave on the batch: the loss, the row gradients, and every map recorded."""

    trainer: Trainer
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    maps: list[list[torch.Tensor]]  # one list per recorder.take(): reference mode takes the class word's maps first


def _init(tiny: TinyComfy) -> Identity:
    """The same random initial rows for both backends, at the scale of CLIP token embeddings."""
    gen = torch.Generator().manual_seed(9)
    rows = {enc.key: torch.randn(2, enc.width, generator=gen) * 0.5 for enc in tiny.model.encoders}
    return Identity(rows, {"token": "<tester>"})


def _images_and_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 64 px photos in [-1, 1] and a face mask each (different squares, so the per-sample masks matter)."""
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, 8:40, 16:48] = 1.0
    masks[1, :, 24:56, 4:36] = 1.0
    return images, masks


def _config(mode: str | None, stages: int | None = None) -> TrainConfig:
    """A Cross-Init config on 64 px photos without flips; mode None: no face loss."""
    face = None if mode is None else FaceLoss(mode, weight=WEIGHT)
    return preset_config("cross_init", steps=2, batch_size=2, resolution=64, token="<tester>", flip_p=0.0,
                         face_loss=face, stages=stages)


def _perturb_stages(trainer: Trainer) -> None:
    """Give every stage's key and value rows their own values (the same on both backends): a per-stage start has
    keys = values in every stage, where a backend that took values from the keys would go unnoticed in the loss."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for key in sorted(trainer.rows):
            rows = trainer.rows[key]
            rows.add_(torch.randn(rows.shape, generator=gen).to(rows.device) * 0.3)


def _loss_and_grads(trainer: Trainer, batch: Batch, prepare: Callable[[Trainer], None] | None) -> Run:
    """trainer.loss(batch) inside its backend's recording(), backward; the maps every recorder.take() handed out."""
    if prepare is not None:
        prepare(trainer)
    recorder = trainer.recorder
    taken: list[list[torch.Tensor]] = []
    original = recorder.take

    def take() -> list[torch.Tensor]:
        maps = original()
        taken.append([m.detach().clone() for m in maps])
        return maps

    recorder.take = take  # an instance attribute: this trainer's recorder only
    try:
        with trainer.model.denoiser.recording(recorder):
            loss = trainer.loss(batch)
            loss.backward()
    finally:
        del recorder.take
    grads = {key: rows.grad.detach().clone() for key, rows in trainer.rows.items()}
    return Run(trainer, loss.detach(), grads, taken)


def _both(tiny: TinyComfy, config: TrainConfig, prepare: Callable[[Trainer], None] | None = None,
          batch: Batch | None = None) -> tuple[Run, Run, Batch]:
    """(diffusers run, ComfyUI run, the batch): the same config, init, photos, masks and batch on both backends."""
    images, masks = _images_and_masks()
    init = _init(tiny)
    reference = Trainer(tiny.model, images, config, init=init, face_masks=masks)
    if batch is None:
        batch = dataclasses.replace(reference.sample_batch(), timesteps=TIMESTEPS.clone())
    expected = _loss_and_grads(reference, batch, prepare)
    with torch.inference_mode():  # the executor's mode around every node body
        with backend.trainable(tiny.patcher, tiny.clip):
            trainer = Trainer(comfy_model(tiny.patcher, tiny.clip, tiny.vae), images, config, init=init,
                              face_masks=masks)
            got = _loss_and_grads(trainer, batch, prepare)
    return expected, got, batch


def _assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Row gradients equal within rtol 1e-4 and atol 1e-4 of the largest entry, and not vacuously zero."""
    assert got.keys() == expected.keys()
    for key, grad in expected.items():
        peak = float(grad.abs().max())
        assert peak > 0, key
        torch.testing.assert_close(got[key], grad, rtol=1e-4, atol=1e-4 * peak)


def _assert_same_maps(got: Run, expected: Run) -> None:
    """The same number of takes and maps per take, of the same shapes and values, at the same default sites."""
    sites = [(s.part, s.level) for s in expected.trainer.recorder.sites]
    assert [(s.part, s.level) for s in got.trainer.recorder.sites] == sites
    assert sites and all(part != "mid" for part, _ in sites)  # the default choice: the deepest level outside mid
    assert len(got.maps) == len(expected.maps) > 0
    for got_take, expected_take in zip(got.maps, expected.maps):
        assert len(got_take) == len(expected_take) == len(sites)
        for got_map, expected_map in zip(got_take, expected_take):
            assert got_map.shape == expected_map.shape == (2, 64, 77)  # (B, 8x8 query pixels, 77 tokens)
            assert float(expected_map.std()) > 1e-4  # a map that varies, not a constant
            torch.testing.assert_close(got_map, expected_map, **MAP_TOL)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("mode", MODES)
def test_attention_loss_gradient_and_maps_equal_across_backends(comfy_tiny: TinyFactory, family: str,
                                                                mode: str) -> None:
    tiny = comfy_tiny(family)
    expected, got, batch = _both(tiny, _config(mode))
    assert batch.face_masks is not None and tuple(batch.face_masks.shape) == (2, 1, 8, 8)
    torch.testing.assert_close(got.loss, expected.loss, **LOSS_TOL)
    _assert_same_gradients(got.grads, expected.grads)
    _assert_same_maps(got, expected)
    assert len(expected.maps) == (2 if mode == "reference" else 1)  # reference: the class word's maps, then ours

    # The attention term is really in what was compared: without it the loss and gradient are clearly different,
    # and the attention term's own share of the gradient agrees across backends too.
    plain_expected, plain_got, _ = _both(tiny, _config(None), batch=batch)
    torch.testing.assert_close(plain_got.loss, plain_expected.loss, **LOSS_TOL)
    assert float(expected.loss - plain_expected.loss) > 1e-3
    for key, grad in expected.grads.items():
        attention_expected = grad - plain_expected.grads[key]
        attention_got = got.grads[key] - plain_got.grads[key]
        share = float(attention_expected.abs().max()) / float(grad.abs().max())
        assert share > 0.1, (key, share)
        torch.testing.assert_close(attention_got, attention_expected, rtol=1e-4,
                                   atol=1e-4 * float(attention_expected.abs().max()))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("mode", MODES)
def test_per_stage_attention_loss_and_gradient_equal_across_backends(comfy_tiny: TinyFactory, family: str,
                                                                     mode: str) -> None:
    """stages=2: keys from each sample's stage key rows, values from its value rows, on both backends alike."""
    tiny = comfy_tiny(family)
    expected, got, _ = _both(tiny, _config(mode, stages=2), prepare=_perturb_stages)
    for key, rows in expected.trainer.rows.items():
        assert tuple(rows.shape[:2]) == (2, 2), key  # (keys/values, stages, n, width)
        assert got.trainer.staged is not None and tuple(got.trainer.rows[key].shape) == tuple(rows.shape)
    torch.testing.assert_close(got.loss, expected.loss, **LOSS_TOL)
    _assert_same_gradients(got.grads, expected.grads)
    _assert_same_maps(got, expected)
    # Sample 0 is in stage 0 and sample 1 in stage 1: both stages' key rows and value rows got a gradient.
    for key, grad in expected.grads.items():
        for kind in (0, 1):
            for stage in (0, 1):
                assert float(grad[kind, stage].abs().max()) > 0, (key, kind, stage)
