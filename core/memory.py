"""Peak training memory of a model family at a resolution and micro-batch, simulated on the meta device; the mode that fits.

The estimate builds the real architectures from the shipped configs (core/configs/<family>) on torch.device("meta"),
where tensors have shapes and dtypes but no data, and runs one training micro-batch through them: the text encoders
with identity rows spliced in (on the step's prompts, as the trainer encodes them once per step), the UNet on one
micro-batch, an fp32 MSE loss and the backward to the rows, optionally with the UNet's layers checkpointed
(core.checkpointing). A dispatch mode follows every tensor storage the step creates and frees,
so the activation peak includes what autograd saves, the backward's own buffers and the checkpoints' recomputes.
Attention is counted as the fused SDPA kernels run on CUDA (query, key, value, output and log-sum-exp kept, never the
full probability matrix); the meta device would otherwise fall back to the math path. Peak = weights (UNet, text
encoders, VAE) + activation peak + a fixed overhead for CUDA workspaces, allocator slack, the rows and their AdamW
state. Sizes are in bytes; describe() prints GB as 2**30 bytes, the unit ComfyUI and nvidia-smi count VRAM in.
The architecture is diffusers'; ComfyUI's own UNet (same layers, its own attention code) lands within a few percent.
"""

from __future__ import annotations

import functools
import json
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .checkpointing import LAYERS, diffusers_unet_blocks, gradient_checkpointing

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"  # the shipped diffusers configs, as core.checkpoint reads them
GB = 2**30
OVERHEAD_BYTES = 512 * 2**20  # cuBLAS/cuDNN workspaces, allocator slack, rows + AdamW state (a few KB)
TOKENS = 77
HEADROOM = 0.9  # the share of free memory a plan may use; the rest absorbs fragmentation and other processes
ESTIMATE = Callable[[bool, int], int]  # (checkpointing, micro_batch) -> estimated peak bytes


@dataclass(frozen=True)
class Footprint:
    """One estimate, in bytes: what stays resident, the step's activation peak, and what autograd had saved."""

    weights: int  # UNet + text encoders (+ VAE) parameters and buffers
    activations: int  # the most bytes the step's own tensors held at once, forward and backward
    saved: int  # bytes autograd had saved when the forward ended (the count the issue quotes)
    overhead: int = OVERHEAD_BYTES

    @property
    def peak(self) -> int:
        """Estimated peak device memory of a training step."""
        return self.weights + self.activations + self.overhead


class LiveBytes(TorchDispatchMode):
    """Follows every storage created under it until it is freed; peak is the most bytes held at once."""

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        self._ignore = {t.untyped_storage()._cdata for t in ignore}

    def track(self, tensor: torch.Tensor) -> None:
        """Count tensor's storage once, until it is freed."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._refs or key in self._ignore:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed(_ref: weakref.ref, key: int = key, size: int = size) -> None:
            self.live -= size
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, freed)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Sums the bytes of the distinct storages autograd saves for the backward, parameters excluded."""

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        self.storages: dict[int, tuple[int, torch.Tensor]] = {}
        skip = {t.untyped_storage()._cdata for t in ignore}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage._cdata not in skip:
                self.storages[storage._cdata] = (storage.nbytes(), tensor)  # kept, so the key stays unique
            return tensor

        super().__init__(pack, lambda tensor: tensor)

    @property
    def total(self) -> int:
        """Bytes saved so far."""
        return sum(size for size, _ in self.storages.values())


def _fused_attention(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """SDPA that, on meta tensors, runs the memory-efficient kernel CUDA would pick (meta falls back to math)."""

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                  **kwargs: Any) -> torch.Tensor:
        if query.device.type != "meta":
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=query.dtype, device=bias.device)
        if bias is not None:
            bias = bias.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, True, dropout_p, is_causal, scale=scale
        )
        return out[0]

    return attention


@contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Within the block, scaled_dot_product_attention on meta tensors counts memory like CUDA's fused kernels."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention(original)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _config(family: str, part: str) -> dict[str, Any]:
    """A shipped diffusers/transformers config of one family's part."""
    folder = CONFIG_ROOT / family / part
    if not folder.is_dir():
        families = sorted(p.name for p in CONFIG_ROOT.iterdir() if (p / "unet").is_dir())
        raise ValueError(f"memory estimate: no shipped config for family '{family}'; use one of {', '.join(families)}")
    return json.loads((folder / "config.json").read_text())


@functools.lru_cache(maxsize=8)
def _meta_parts(family: str, dtype: torch.dtype, text_dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The family's UNet, VAE and CLIP text encoders on the meta device, frozen, in their compute dtypes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts: dict[str, torch.nn.Module] = {}
    with torch.device("meta"):
        parts["unet"] = UNet2DConditionModel.from_config(_config(family, "unet"))
        parts["vae"] = AutoencoderKL.from_config(_config(family, "vae"))
        for name in ("text_encoder", "text_encoder_2"):
            if (CONFIG_ROOT / family / name).is_dir():
                config = CLIPTextConfig.from_dict(_config(family, name))
                projected = "CLIPTextModelWithProjection" in (config.architectures or [])
                parts[name] = (CLIPTextModelWithProjection if projected else CLIPTextModel)(config)
    for name, module in parts.items():
        module.requires_grad_(False).eval()
        # nn.Module.to, not diffusers' override: that logs an empty "keep in float32" warning on every cast
        torch.nn.Module.to(module, dtype=text_dtype if name.startswith("text_encoder") else dtype)
    return parts


def module_bytes(modules: Iterable[torch.nn.Module], device_type: str | None = None) -> int:
    """Bytes of the distinct storages of the modules' parameters and buffers (on one device type, if given)."""
    sizes: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if device_type is None or tensor.device.type == device_type:
                storage = tensor.untyped_storage()
                sizes[storage._cdata] = storage.nbytes()
    return sum(sizes.values())


def _encode(encoder: torch.nn.Module, rows: torch.Tensor, batch: int, penultimate: bool) -> tuple[torch.Tensor, Any]:
    """One encoder's conditioning for a batch of 77-token prompts with rows spliced after BOS, and its output."""
    table = encoder.get_input_embeddings()

    def splice(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        spliced = rows.to(output.dtype).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], spliced, output[:, 1 + rows.shape[1]:]], dim=1)

    handle = table.register_forward_hook(splice)
    try:
        ids = torch.zeros(batch, TOKENS, dtype=torch.long, device="meta")
        out = encoder(ids, output_hidden_states=penultimate)
    finally:
        handle.remove()
    return (out.hidden_states[-2] if penultimate else out.last_hidden_state), out


def _training_loss(
    parts: dict[str, torch.nn.Module], family: str, resolution: int, batch: int, n_rows: int, prompts: int
) -> torch.Tensor:
    """The forward of one micro-batch on meta tensors: rows spliced into the text encoders, the UNet, an fp32 MSE.

    The text encoders run on the step's prompts (the trainer encodes each distinct prompt once per step and keeps
    that graph until the step's last micro-batch), the UNet on one micro-batch of batch samples.
    """
    unet = parts["unet"]
    dtype = next(unet.parameters()).dtype
    penultimate = family == "sdxl"
    contexts, pooled = [], None
    for name in ("text_encoder", "text_encoder_2"):
        if name not in parts:
            continue
        encoder = parts[name]
        width = encoder.get_input_embeddings().weight.shape[1]
        rows = torch.zeros(1, n_rows, width, device="meta", requires_grad=True)  # fp32 identity rows
        hidden, out = _encode(encoder, rows, prompts, penultimate)
        contexts.append(hidden.to(dtype))
        if name == "text_encoder_2":
            pooled = out.text_embeds.to(dtype)
    side = resolution // 8
    noisy = torch.zeros(batch, unet.config.in_channels, side, side, device="meta", dtype=dtype)
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    pick = torch.arange(batch, device="meta") % prompts  # the micro-batch's prompts among the step's
    context = torch.cat(contexts, dim=-1).index_select(0, pick)
    extra = None
    if unet.config.addition_embed_type == "text_time":
        time_ids = torch.zeros(batch, 6, device="meta", dtype=dtype)
        extra = {"text_embeds": pooled.index_select(0, pick), "time_ids": time_ids}
    pred = unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=extra).sample
    target = torch.zeros(pred.shape, device="meta", dtype=torch.float32)
    return F.mse_loss(pred.float(), target)


@functools.lru_cache(maxsize=128)
def estimate_training_memory(
    family: str,
    resolution: int,
    micro_batch: int,
    dtype: torch.dtype = torch.float16,
    checkpointing: bool = False,
    text_dtype: torch.dtype | None = None,
    level: str = LAYERS,
    n_rows: int = 2,
    with_vae: bool = True,
    prompts: int | None = None,
) -> Footprint:
    """The memory of one training micro-batch of family at resolution px, simulated on the meta device (cached).

    prompts: how many prompts the text encoders take per step (the step's distinct ones; default micro_batch).
    """
    if resolution % 8 or resolution < 64:
        raise ValueError(f"memory estimate: resolution {resolution} must be a multiple of 8, at least 64")
    if micro_batch < 1:
        raise ValueError(f"memory estimate: micro-batch {micro_batch} must be at least 1")
    parts = _meta_parts(family, dtype, text_dtype or dtype)
    weights = [module for name, module in parts.items() if with_vae or name != "vae"]
    resident = [t for module in parts.values() for t in [*module.parameters(), *module.buffers()]]
    live, saved = LiveBytes(ignore=resident), SavedBytes(ignore=resident)
    chosen = diffusers_unet_blocks(parts["unet"], level) if checkpointing else []
    with fused_attention_on_meta(), gradient_checkpointing(chosen), live:
        with saved:
            loss = _training_loss(parts, family, resolution, micro_batch, n_rows, prompts or micro_batch)
        saved_bytes = saved.total
        saved.storages.clear()  # let the backward free what it has used
        loss.backward()
        del loss
    return Footprint(weights=module_bytes(weights), activations=live.peak, saved=saved_bytes)


def training_estimator(
    family: str, resolution: int, batch: int, dtype: torch.dtype = torch.float16, text_dtype: torch.dtype | None = None,
    n_rows: int = 2, with_vae: bool = True,
) -> ESTIMATE:
    """estimate(checkpointing, micro_batch) -> peak bytes for one family, resolution, batch and dtype (cached).

    The text encoders are counted on batch prompts per step (an upper bound: the trainer encodes the distinct ones).
    """

    def estimate(checkpointing: bool, micro_batch: int) -> int:
        footprint = estimate_training_memory(
            family, resolution, micro_batch, dtype, checkpointing, text_dtype, LAYERS, n_rows, with_vae, batch
        )
        return footprint.peak

    return estimate


@dataclass(frozen=True)
class MemoryPlan:
    """How a run trains within the memory it has: checkpointing or not, the micro-batch, and the estimated peak."""

    checkpointing: bool
    micro_batch: int  # samples per forward/backward; the step accumulates ceil(batch / micro_batch) of them
    batch: int
    peak_bytes: int
    free_bytes: int | None  # None: unknown, the plan is the default one
    fits: bool = True

    @property
    def mode(self) -> str:
        """default, checkpointing, or checkpointing + micro-batch."""
        if self.micro_batch < self.batch:
            return "checkpointing + micro-batch" if self.checkpointing else "micro-batch"
        return "checkpointing" if self.checkpointing else "default"

    @property
    def micro_batches(self) -> int:
        """Forward/backward passes per optimiser step."""
        return math.ceil(self.batch / self.micro_batch)

    def describe(self) -> str:
        """One line for the log, e.g. 'estimated peak 5.8 GB with gradient checkpointing, micro-batch 2 of 8; 7.6 GB free'."""
        how = "with gradient checkpointing" if self.checkpointing else "without gradient checkpointing"
        if self.micro_batch < self.batch:
            how += f", micro-batch {self.micro_batch} of {self.batch}"
        if self.peak_bytes == 0 and self.free_bytes is None:  # nothing estimated (no CUDA device, or a test model)
            return f"no estimate (estimated on CUDA with a real model only), {how}"
        free = "free memory unknown" if self.free_bytes is None else f"{self.free_bytes / GB:.1f} GB free"
        line = f"estimated peak {self.peak_bytes / GB:.1f} GB {how}; {free}"
        if not self.fits:
            line = f"{line}: it does not fit even so; lower the resolution, or close what else holds GPU memory"
        return line


def choose_memory_mode(
    estimate_fn: ESTIMATE, free_bytes: int | None, batch: int, headroom: float = HEADROOM
) -> MemoryPlan:
    """The cheapest mode whose estimate fits headroom x free: default, checkpointing, then the largest micro-batch."""
    if batch < 1:
        raise ValueError(f"batch: got {batch}; it must be at least 1")

    def plan(checkpointing: bool, micro_batch: int, fits: bool = True) -> MemoryPlan:
        return MemoryPlan(checkpointing, micro_batch, batch, estimate_fn(checkpointing, micro_batch), free_bytes, fits)

    if free_bytes is None:
        return plan(False, batch)
    budget = free_bytes * headroom
    for candidate in (plan(False, batch), plan(True, batch)):
        if candidate.peak_bytes <= budget:
            return candidate
    sizes = _micro_batch_sizes(batch)  # largest first, each the balanced size for its number of passes
    low, high, best = 0, len(sizes) - 1, None
    while low <= high:  # the estimate grows with the micro-batch: binary search for the largest that fits
        middle = (low + high) // 2
        candidate = plan(True, sizes[middle])
        if candidate.peak_bytes <= budget:
            best, high = candidate, middle - 1
        else:
            low = middle + 1
    return best if best is not None else plan(True, 1, fits=False)


def _micro_batch_sizes(batch: int) -> list[int]:
    """Distinct micro-batch sizes below batch, largest first: ceil(batch / n) for n = 2 .. batch passes."""
    sizes: list[int] = []
    for passes in range(2, batch + 1):
        size = math.ceil(batch / passes)
        if not sizes or size < sizes[-1]:
            sizes.append(size)
    return sizes


def fixed_plan(estimate_fn: ESTIMATE, free_bytes: int | None, batch: int, checkpointing: bool,
               micro_batch: int | None = None, headroom: float = HEADROOM) -> MemoryPlan:
    """The plan for a mode the user chose, with its estimate and whether it fits."""
    size = min(batch, micro_batch or batch)
    if size < 1:
        raise ValueError(f"micro-batch: got {micro_batch}; it must be at least 1")
    peak = estimate_fn(checkpointing, size)
    fits = free_bytes is None or peak <= free_bytes * headroom
    return MemoryPlan(checkpointing, size, batch, peak, free_bytes, fits)


def free_memory_bytes(device: torch.device, resident: Iterable[torch.nn.Module] = ()) -> int | None:
    """Memory a run could use on device: free, plus torch's unused cache, plus the given models' weights already there.

    None where it cannot be read (an accelerator other than CUDA, or host memory without psutil).
    """
    device = torch.device(device)
    here = module_bytes(resident, device.type)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached + here)
    if device.type == "cpu":
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.virtual_memory().available + here)
    return None


MEMORY_MODES = ("auto", "default", "checkpointing", "low")  # low: checkpointing + micro-batch 1


def select_memory_plan(
    mode: str, batch: int, micro_batch: int | None, estimate_fn: ESTIMATE | None, free_bytes: int | None
) -> MemoryPlan:
    """The plan for a memory mode; auto estimates (when it can) and picks the cheapest that fits free memory.

    A micro_batch the user chose is kept: auto then only adds checkpointing when that does not fit. Without an
    estimate (no CUDA device, or a test model that is not a real architecture) auto is the default mode.
    """
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory: unknown mode '{mode}'; choose one of {', '.join(MEMORY_MODES)}")
    chosen = min(batch, micro_batch or batch)
    peak = estimate_fn if estimate_fn is not None else (lambda _checkpointing, _micro: 0)
    if mode == "default" or (mode == "auto" and (estimate_fn is None or free_bytes is None)):
        return fixed_plan(peak, free_bytes if estimate_fn else None, batch, False, chosen)
    if mode == "checkpointing":
        return fixed_plan(peak, free_bytes if estimate_fn else None, batch, True, chosen)
    if mode == "low":
        return fixed_plan(peak, free_bytes if estimate_fn else None, batch, True, 1)
    if micro_batch:
        plain = fixed_plan(peak, free_bytes, batch, False, chosen)
        return plain if plain.fits else fixed_plan(peak, free_bytes, batch, True, chosen)
    return choose_memory_mode(peak, free_bytes, batch)
