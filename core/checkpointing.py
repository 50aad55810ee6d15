"""Gradient checkpointing of a UNet's blocks: their forward is patched for a with-block and put back exactly after.

Each chosen module's ``forward`` runs under non-reentrant ``torch.utils.checkpoint`` while gradients are enabled, so its
inner activations are recomputed in the backward instead of being kept. The patch is an instance attribute set on
entry and removed (or the previous instance attribute put back) in ``finally``, so a model shared with later nodes,
such as a ComfyUI MODEL, is left exactly as it was. Nothing here imports ComfyUI; the modules are passed in.

Dict arguments (ComfyUI's ``transformer_options``, which the UNet mutates as it walks its blocks) are copied when a
checkpointed forward starts, and the recompute sees that copy: patches that read ``block`` or ``transformer_index``
get the values of the original call, not the ones left at the end of the forward. Code with side effects inside a
checkpointed module (an attention capture that appends to a list) runs again during the recompute: skip the side
effect while ``recomputing()`` is true. ComfyUI cores whose transformer blocks add residuals in place (``x += n``, the
2024 core CI runs) need ``inplace_safe=True``: without it the recompute silently changes the gradient (2.5% on the
tiny test UNet).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils.checkpoint

BLOCKS = "blocks"  # diffusers only: whole down/mid/up blocks (fewest saved boundaries, the largest recompute)
LAYERS = "layers"  # resnets, resamplers and attention transformers, one by one: the lower peak (core.memory measures)
LEVELS = (BLOCKS, LAYERS)
SPLIT_ABOVE = 1  # an attention transformer with more transformer blocks than this is checkpointed block by block
_MARK = "_identity_tokens_checkpointed"  # set on our wrappers, so a module is never wrapped twice
_state = threading.local()


def recomputing() -> bool:
    """Whether the current code runs inside a checkpoint's recompute during the backward."""
    return getattr(_state, "depth", 0) > 0


def _snapshot(value: Any) -> Any:
    """A copy of every dict in value, and of the lists and tuples that hold them; tensors and other objects shared."""
    if isinstance(value, dict):
        return {key: _snapshot(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_snapshot(item) for item in value)
    return value


def _holds_dict(value: Any) -> bool:
    """Whether value is a dict, or a list/tuple with a dict somewhere inside."""
    if isinstance(value, dict):
        return True
    return type(value) in (list, tuple) and any(_holds_dict(item) for item in value)


def _recompute_arguments(args: tuple, kwargs: dict, frozen_args: tuple, frozen_kwargs: dict) -> tuple[tuple, dict]:
    """The recompute's arguments: checkpoint's own (its saved tensors), with dict arguments as they were at the call."""
    merged_args = tuple(f if _holds_dict(f) else a for a, f in zip(args, frozen_args))
    merged_kwargs = {k: (frozen_kwargs[k] if _holds_dict(frozen_kwargs.get(k)) else v) for k, v in kwargs.items()}
    return merged_args, merged_kwargs


def _fresh(value: Any) -> Any:
    """value with its tensors cloned (those in dicts excepted), so in-place edits inside cannot reach the caller's."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if type(value) in (list, tuple):
        return type(value)(_fresh(item) for item in value)
    return value


def _keep_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of an activation autograd saves (weights and inputs without a graph pass as they are)."""
    return tensor.clone() if tensor.grad_fn is not None else tensor


@contextmanager
def _copies_saved() -> Iterator[None]:
    """Within the block, activations are copied when autograd saves them, then handed to the hooks already active."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    pack, unpack = top if top is not None else (lambda t: t, lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: pack(_keep_copy(t)), unpack):
        yield


def checkpointed(
    forward: Callable[..., Any], preserve_rng_state: bool = True, inplace_safe: bool = False
) -> Callable[..., Any]:
    """forward wrapped in non-reentrant checkpointing when gradients are on; a plain call otherwise.

    inplace_safe: for modules that add residuals in place (ComfyUI's 2024 core: `x += n`), which would otherwise
    change what the recompute saved; graph inputs and saved activations are copied inside, at some speed cost.
    """

    def call(call_args: tuple, call_kwargs: dict) -> Any:
        if not inplace_safe:
            return forward(*call_args, **call_kwargs)
        with _copies_saved():
            return forward(*_fresh(call_args), **{k: _fresh(v) for k, v in call_kwargs.items()})

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        frozen_args = tuple(_snapshot(a) if _holds_dict(a) else None for a in args)  # no tensor kept alive here
        frozen_kwargs = {k: _snapshot(v) for k, v in kwargs.items() if _holds_dict(v)}
        calls = [0]

        def body(*call_args: Any, **call_kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:  # the forward itself: the caller's own objects, mutations and all
                return call(call_args, call_kwargs)
            _state.depth = getattr(_state, "depth", 0) + 1
            try:
                return call(*_recompute_arguments(call_args, call_kwargs, frozen_args, frozen_kwargs))
            finally:
                _state.depth -= 1

        return torch.utils.checkpoint.checkpoint(
            body, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, **kwargs
        )

    setattr(run, _MARK, True)
    run.__wrapped__ = forward  # type: ignore[attr-defined]
    return run


def is_checkpointed(module: torch.nn.Module) -> bool:
    """Whether module's forward is one of this module's checkpointing wrappers."""
    return bool(getattr(module.__dict__.get("forward"), _MARK, False))


@contextmanager
def gradient_checkpointing(
    modules: Iterable[torch.nn.Module], preserve_rng_state: bool = True, inplace_safe: bool = False
) -> Iterator[list[torch.nn.Module]]:
    """Within the block, each module's forward is checkpointed; yields the modules patched (not those already were)."""
    chosen = list(modules)
    for module in chosen:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"gradient checkpointing: got a {type(module).__name__}; pass torch.nn.Module objects")
    patched: list[tuple[torch.nn.Module, bool, Any]] = []
    seen: set[int] = set()
    try:
        for module in chosen:
            if id(module) in seen or is_checkpointed(module):
                continue
            seen.add(id(module))
            had_own = "forward" in module.__dict__
            previous = module.__dict__.get("forward")
            patched.append((module, had_own, previous))
            module.forward = checkpointed(module.forward, preserve_rng_state, inplace_safe)
        yield [module for module, _, _ in patched]
    finally:
        for module, had_own, previous in reversed(patched):
            if had_own:
                module.forward = previous
            else:
                module.__dict__.pop("forward", None)


def _attention_parts(attention: torch.nn.Module) -> list[torch.nn.Module]:
    """An attention transformer whole, or its transformer blocks one by one when it has several (SDXL's 2 and 10)."""
    blocks = getattr(attention, "transformer_blocks", None)
    if blocks is not None and len(blocks) > SPLIT_ABOVE:
        return list(blocks)
    return [attention]


def diffusers_unet_blocks(unet: torch.nn.Module, level: str = LAYERS) -> list[torch.nn.Module]:
    """The modules of a diffusers UNet2DConditionModel to checkpoint: its blocks, or the layers inside them."""
    if level not in LEVELS:
        raise ValueError(f"checkpointing level: got '{level}'; use one of {', '.join(LEVELS)}")
    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    if level == BLOCKS:
        return blocks
    chosen: list[torch.nn.Module] = []
    for block in blocks:
        chosen.extend(getattr(block, "resnets", None) or [])
        for attention in getattr(block, "attentions", None) or []:
            chosen.extend(_attention_parts(attention))
        chosen.extend(getattr(block, "downsamplers", None) or [])
        chosen.extend(getattr(block, "upsamplers", None) or [])
    return chosen


def comfy_unet_blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of ComfyUI's UNetModel (MODEL.model.diffusion_model) to checkpoint, in its input/middle/output blocks.

    ComfyUI's UNet calls forward_timestep_embed on each TimestepEmbedSequential block directly, never the block's own
    forward, so patching a whole block would do nothing: the layers inside (ResBlock, SpatialTransformer or its
    transformer blocks, Downsample, Upsample) are the units, as in ComfyUI's TrainLoraNode. They take
    transformer_options and other extra arguments, which the wrapper passes through. Single layers without
    sub-modules (the input convolution) are left out: checkpointing them saves nothing.
    """
    blocks = [*diffusion_model.input_blocks]
    if getattr(diffusion_model, "middle_block", None) is not None:
        blocks.append(diffusion_model.middle_block)
    blocks.extend(diffusion_model.output_blocks)
    chosen: list[torch.nn.Module] = []
    for block in blocks:
        for layer in block:
            if hasattr(layer, "transformer_blocks"):
                chosen.extend(_attention_parts(layer))
            elif any(True for _ in layer.children()):
                chosen.append(layer)
    return chosen
