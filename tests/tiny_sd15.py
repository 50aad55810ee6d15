"""Test helper: a random-weight SD1.5 checkpoint in the original LDM layout, small enough to build in seconds.

ComfyUI's CheckpointLoaderSimple detects it as SD15: the UNet keeps SD1.5's width (model_channels 320, context 768,
convolutional proj_in) but has one level with one res block and one transformer block, plus the middle block; the text
encoder is a full-size CLIP-L (ComfyUI's SD15 text-encoder config is fixed); the VAE is a TAESD (`taesd_encoder.*` /
`taesd_decoder.*` under `first_stage_model.`). Weights are N(0, 0.02) (N(0, 1/fan_in) in the VAE, so decoded images
are not flat), biases 0, every normalisation weight 1 (LDM names the ResBlock GroupNorms in_layers.0 / out_layers.0 /
out.0, without "norm"; zeroing them would make the UNet output exactly 0).
The key/shape table below is written from the public original-SD checkpoint format.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.comfyui_env import CACHE

VERSION = "1"  # bump when the layout or the weights change; the cache file name carries it
UNET = "model.diffusion_model."
CLIP = "cond_stage_model.transformer.text_model."
VAE = "first_stage_model."
CHANNELS = 320
TIME_DIM = 4 * CHANNELS
CONTEXT = 768
CLIP_WIDTH = 768
CLIP_LAYERS = 12
CLIP_VOCAB = 49408
CLIP_POSITIONS = 77
TAESD_WIDTH = 64
LATENT_CHANNELS = 4

Shapes = dict[str, tuple[int, ...]]


def default_path() -> Path:
    """Where the checkpoint is cached on this machine (the file name carries VERSION)."""
    return CACHE / "tiny_sd15" / f"tiny_sd15-v{VERSION}.safetensors"


def _linear(table: Shapes, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    """Add a Linear layer's weight (and bias)."""
    table[f"{name}.weight"] = (n_out, n_in)
    if bias:
        table[f"{name}.bias"] = (n_out,)


def _conv(table: Shapes, name: str, n_in: int, n_out: int, kernel: int, bias: bool = True) -> None:
    """Add a Conv2d layer's weight (and bias)."""
    table[f"{name}.weight"] = (n_out, n_in, kernel, kernel)
    if bias:
        table[f"{name}.bias"] = (n_out,)


def _norm(table: Shapes, name: str, channels: int) -> None:
    """Add a GroupNorm or LayerNorm (weight and bias of one size)."""
    table[f"{name}.weight"] = (channels,)
    table[f"{name}.bias"] = (channels,)


def _res_block(table: Shapes, name: str, n_in: int, n_out: int) -> None:
    """Add an LDM ResBlock: in_layers (GroupNorm, SiLU, conv), emb_layers, out_layers (GroupNorm, ..., conv), skip."""
    _norm(table, f"{name}.in_layers.0", n_in)
    _conv(table, f"{name}.in_layers.2", n_in, n_out, 3)
    _linear(table, f"{name}.emb_layers.1", TIME_DIM, n_out)
    _norm(table, f"{name}.out_layers.0", n_out)
    _conv(table, f"{name}.out_layers.3", n_out, n_out, 3)
    if n_in != n_out:
        _conv(table, f"{name}.skip_connection", n_in, n_out, 1)


def _attention(table: Shapes, name: str, width: int, context: int) -> None:
    """Add a CrossAttention block (bias-free q/k/v, projected output)."""
    _linear(table, f"{name}.to_q", width, width, bias=False)
    _linear(table, f"{name}.to_k", context, width, bias=False)
    _linear(table, f"{name}.to_v", context, width, bias=False)
    _linear(table, f"{name}.to_out.0", width, width)


def _spatial_transformer(table: Shapes, name: str, width: int) -> None:
    """Add an SD1-style SpatialTransformer of depth 1 with 1x1 convolutional proj_in/proj_out."""
    _norm(table, f"{name}.norm", width)
    _conv(table, f"{name}.proj_in", width, width, 1)
    block = f"{name}.transformer_blocks.0"
    _attention(table, f"{block}.attn1", width, width)
    _linear(table, f"{block}.ff.net.0.proj", width, 8 * width)  # GEGLU: two halves of 4 * width
    _linear(table, f"{block}.ff.net.2", 4 * width, width)
    _attention(table, f"{block}.attn2", width, CONTEXT)
    for norm in ("norm1", "norm2", "norm3"):
        _norm(table, f"{block}.{norm}", width)
    _conv(table, f"{name}.proj_out", width, width, 1)


def unet_shapes() -> Shapes:
    """The UNet: conv_in, one level of one res block + transformer, middle block, two output blocks, out."""
    table: Shapes = {}
    _linear(table, "time_embed.0", CHANNELS, TIME_DIM)
    _linear(table, "time_embed.2", TIME_DIM, TIME_DIM)
    _conv(table, "input_blocks.0.0", LATENT_CHANNELS, CHANNELS, 3)
    _res_block(table, "input_blocks.1.0", CHANNELS, CHANNELS)
    _spatial_transformer(table, "input_blocks.1.1", CHANNELS)
    _res_block(table, "middle_block.0", CHANNELS, CHANNELS)
    _spatial_transformer(table, "middle_block.1", CHANNELS)
    _res_block(table, "middle_block.2", CHANNELS, CHANNELS)
    for index in range(2):  # num_res_blocks + 1 output blocks, each taking one skip of CHANNELS
        _res_block(table, f"output_blocks.{index}.0", 2 * CHANNELS, CHANNELS)
        _spatial_transformer(table, f"output_blocks.{index}.1", CHANNELS)
    _norm(table, "out.0", CHANNELS)
    _conv(table, "out.2", CHANNELS, LATENT_CHANNELS, 3)
    return {UNET + key: shape for key, shape in table.items()}


def clip_shapes() -> Shapes:
    """A full-size CLIP-L text transformer in the transformers layout (without position_ids)."""
    table: Shapes = {
        "embeddings.token_embedding.weight": (CLIP_VOCAB, CLIP_WIDTH),
        "embeddings.position_embedding.weight": (CLIP_POSITIONS, CLIP_WIDTH),
    }
    for layer in range(CLIP_LAYERS):
        name = f"encoder.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(table, f"{name}.self_attn.{proj}", CLIP_WIDTH, CLIP_WIDTH)
        _norm(table, f"{name}.layer_norm1", CLIP_WIDTH)
        _linear(table, f"{name}.mlp.fc1", CLIP_WIDTH, 4 * CLIP_WIDTH)
        _linear(table, f"{name}.mlp.fc2", 4 * CLIP_WIDTH, CLIP_WIDTH)
        _norm(table, f"{name}.layer_norm2", CLIP_WIDTH)
    _norm(table, "final_layer_norm", CLIP_WIDTH)
    return {CLIP + key: shape for key, shape in table.items()}


def _taesd_block(table: Shapes, name: str) -> None:
    """A TAESD Block of equal width: three 3x3 convolutions in a Sequential (slots 0, 2, 4), no skip conv."""
    for slot in (0, 2, 4):
        _conv(table, f"{name}.conv.{slot}", TAESD_WIDTH, TAESD_WIDTH, 3)


def taesd_shapes() -> Shapes:
    """TAESD's encoder and decoder Sequentials (public madebyollin/taesd layout)."""
    table: Shapes = {}
    w = TAESD_WIDTH
    encoder = "taesd_encoder"
    _conv(table, f"{encoder}.0", 3, w, 3)
    _taesd_block(table, f"{encoder}.1")
    slot = 2
    for _ in range(3):  # stride-2 conv (no bias) then three blocks, three times
        _conv(table, f"{encoder}.{slot}", w, w, 3, bias=False)
        for offset in (1, 2, 3):
            _taesd_block(table, f"{encoder}.{slot + offset}")
        slot += 4
    _conv(table, f"{encoder}.{slot}", w, LATENT_CHANNELS, 3)
    decoder = "taesd_decoder"  # 0 Clamp, 1 conv, 2 ReLU, then (3 blocks, Upsample, conv) x3, block, conv
    _conv(table, f"{decoder}.1", LATENT_CHANNELS, w, 3)
    slot = 3
    for _ in range(3):
        for offset in (0, 1, 2):
            _taesd_block(table, f"{decoder}.{slot + offset}")
        _conv(table, f"{decoder}.{slot + 4}", w, w, 3, bias=False)
        slot += 5
    _taesd_block(table, f"{decoder}.{slot}")
    _conv(table, f"{decoder}.{slot + 1}", w, 3, 3)
    return {VAE + key: shape for key, shape in table.items()}


def checkpoint_shapes() -> Shapes:
    """Every tensor of the checkpoint except the integer position_ids."""
    return {**unet_shapes(), **clip_shapes(), **taesd_shapes()}


def is_norm(key: str) -> bool:
    """Whether a key belongs to a normalisation layer (GroupNorm/LayerNorm; LDM names some without 'norm')."""
    module = key.rsplit(".", 1)[0]
    ldm_group_norms = (".in_layers.0", ".out_layers.0", f"{UNET}out.0")
    return "norm" in module.rsplit(".", 1)[-1] or module.endswith(ldm_group_norms)


def tiny_sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (fp16): N(0, 0.02) weights (N(0, 1/fan_in) in the VAE), zero biases, norms at 1."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in checkpoint_shapes().items():
        if is_norm(key):
            value = torch.ones(shape) if key.endswith(".weight") else torch.zeros(shape)
        elif key.endswith(".bias"):
            value = torch.zeros(shape)
        elif key.startswith(VAE):  # N(0, 1/fan_in): N(0, 0.02) shrinks TAESD's conv stack to a flat grey image
            value = torch.randn(shape, generator=generator) / math.prod(shape[1:]) ** 0.5
        else:
            value = torch.randn(shape, generator=generator) * 0.02
        state[key] = value.to(torch.float16)
    state[CLIP + "embeddings.position_ids"] = torch.arange(CLIP_POSITIONS, dtype=torch.int64)[None]
    state[VAE + "vae_scale"] = torch.ones((), dtype=torch.float16)
    return state


def write_tiny_sd15(path: Path | None = None, seed: int = 0) -> Path:
    """Write the checkpoint to `path` (default: the per-machine cache) unless it is already there; return the path."""
    metadata = {"format": "pt", "tiny_sd15_version": VERSION}
    return save_once(Path(path) if path is not None else default_path(), lambda: tiny_sd15_state_dict(seed), metadata)


def save_once(path: Path, state: Callable[[], dict[str, torch.Tensor]], metadata: dict[str, str]) -> Path:
    """Write state() to path as safetensors (atomically) unless the file is already there; return the path."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state(), str(temp), metadata=metadata)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
