"""Mixed precision for training identity rows: compute dtypes, fp16 loss scaling, guarded steps, TF32 while training.

The identity rows and their AdamW state are always float32; the UNet and text encoders compute in the model's dtype.
bfloat16 has float32's range, so its gradients need no scaling. float16 does: the diffusion loss is a mean over
B x 4 x h x w elements (131k for SD1.5 at 512 px, batch 8), so dL/dcontext sits near 1e-6, below float16's smallest
normal (6.1e-5), and an unscaled backward loses most of its bits there. LossScaler multiplies the loss by a power of two
before backward and divides the row gradients after it, as torch.amp.GradScaler does, but for a few float32 parameters
and with every decision (overflow, skip, new scale) taken on the device, so a step needs no host sync.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .protocols import Model

INIT_SCALE = 2.0**16  # torch.amp.GradScaler's default start
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 100  # good steps before the scale doubles (GradScaler: 2000; identity runs are 25-320 steps)


def part_dtype(part: object) -> torch.dtype:
    """The dtype a backend's text encoder or denoiser computes in: its `dtype` attribute, float32 when it has none."""
    dtype = getattr(part, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def compute_dtype(model: Model) -> torch.dtype:
    """The narrowest dtype among the model's text encoders and denoiser: float16 if any part uses it, then bfloat16."""
    dtypes = {part_dtype(part) for part in [*model.encoders, model.denoiser]}
    for dtype in (torch.float16, torch.bfloat16):
        if dtype in dtypes:
            return dtype
    return torch.float32


class LossScaler:
    """Dynamic loss scaling like torch.amp.GradScaler, for float32 parameters fed through a float16 model.

    scale(loss) before backward; unscale_(params) after it divides the gradients and says, as a device bool, whether
    they are finite; update(ok) halves the scale after an overflow and doubles it after GROWTH_INTERVAL good steps.
    Disabled (float32 and bfloat16 models) it only checks finiteness.
    """

    def __init__(self, device: torch.device, enabled: bool, init_scale: float = INIT_SCALE) -> None:
        self.enabled = enabled and init_scale > 0
        self.value = torch.tensor(init_scale if self.enabled else 1.0, dtype=torch.float32, device=device)
        self.good_steps = torch.zeros((), dtype=torch.int64, device=device)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on."""
        return loss * self.value if self.enabled else loss

    def unscale_(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """Divide the gradients by the scale in place; a device bool: True when every gradient is finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.enabled:
            inverse = self.value.reciprocal()  # a power of two, so the division is exact in float32
            for grad in grads:
                grad.mul_(inverse)
        return all_finite(grads, self.value.device)

    def update(self, ok: torch.Tensor) -> None:
        """After a step: halve the scale if it overflowed, double it after GROWTH_INTERVAL good steps in a row."""
        if not self.enabled:
            return
        good = torch.where(ok, self.good_steps + 1, torch.zeros_like(self.good_steps))
        grow = good >= GROWTH_INTERVAL
        factor = torch.where(ok, torch.where(grow, GROWTH_FACTOR, 1.0), BACKOFF_FACTOR)
        self.value.mul_(factor)
        self.good_steps.copy_(torch.where(grow, torch.zeros_like(good), good))


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A device bool: whether every element of every tensor is finite (no host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)


@torch.no_grad()
def guarded_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> torch.Tensor:
    """optimizer.step(), undone on the device unless ok and the new parameters are finite; returns that device bool.

    Undone means the parameters and the optimiser state are as they were (never inf); a state entry that did not
    exist before the first step goes back to zeros, which is how AdamW starts.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [(p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}) for p in params]
    optimizer.step()
    ok = ok & all_finite(params, ok.device)
    for param, (old, old_state) in zip(params, saved):
        param.copy_(torch.where(ok, param, old))
        for key, value in optimizer.state[param].items():
            if torch.is_tensor(value):
                before = old_state.get(key, torch.zeros_like(value))
                value.copy_(torch.where(ok.to(value.device), value, before))
    return ok


def optimizer_options(device: torch.device) -> dict[str, object]:
    """AdamW options that keep its step count on the device (CUDA, XPU), so that guarded_step needs no host sync."""
    return {"capturable": True} if device.type in ("cuda", "xpu") else {}


@contextmanager
def fast_float32_matmuls(device: torch.device) -> Iterator[None]:
    """While training on CUDA, float32 matmuls and convolutions may use TF32; the previous settings come back after."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high")  # the same as torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
