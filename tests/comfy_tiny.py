"""Test helper: the tiny random-weight models as CI's ComfyUI objects (MODEL, CLIP, VAE) and as the diffusers backend.

ComfyUI's checkpoint detection refuses UNet widths below 320, so the objects are put together here from ComfyUI's own
classes the way its checkpoint loader does, with the tiny sizes set where ComfyUI hard-codes the real ones: GroupNorm
groups, attention heads, CLIP configs, SDXL's size embedding and clip_g's projection. The SD2 CLIP gets one random
extra layer: SD2 conditions on the penultimate layer, and its diffusers text encoder is the real one minus the last
layer, as in real SD2 checkpoints. The weights come from core.tiny.tiny_components through tests/tiny_checkpoint.py's
LDM converters, so both backends hold the same values. Everything ComfyUI-side is built under torch.inference_mode(),
as CheckpointLoaderSimple runs in the executor, so its weights are inference tensors.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.comfyui_env import ensure_comfyui, import_comfy, import_pack
from tests.tiny_checkpoint import UNET_PREFIX, VAE_PREFIX, components_to_ldm

FAMILIES = ("sd1", "sd2", "sdxl")
BOS, EOS = 49406, 49407


@functools.lru_cache(maxsize=1)
def comfy_ready() -> Path:
    """CI's ComfyUI importable in this process on the CPU, and the pack imported as identity_tokens; its folder."""
    folder = ensure_comfyui()
    import_comfy(folder)
    import_pack()
    return folder


@dataclass
class TinyComfy:
    """One family's tiny weights as ComfyUI objects and as the pack's diffusers-backend Model."""

    family: str
    patcher: object  # comfy.model_patcher.ModelPatcher (MODEL)
    clip: object  # comfy.sd.CLIP
    vae: object  # comfy.sd.VAE
    model: object  # identity_tokens.core.protocols.Model over the diffusers components
    parts: dict[str, object]  # the diffusers components (tiny_components)
    embeddings: Path  # the folder the CLIP tokenizer reads embedding:NAME files from


def _clip_config(model: torch.nn.Module, folder: Path, name: str, extra_layers: int = 0) -> Path:
    """A ComfyUI text-model JSON config with the sizes of a transformers CLIP text model."""
    cfg = model.config
    config = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers + extra_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "projection_dim": getattr(cfg, "projection_dim", cfg.hidden_size),
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _clip_classes(family: str, configs: dict[str, Path]) -> tuple[type, type]:
    """(tokenizer, text model) classes: subclasses of ComfyUI's real ones that load the tiny configs."""
    from comfy import sd1_clip, sd2_clip, sdxl_clip

    def text_model(base: type, config: Path, special: dict[str, int], **options: object) -> torch.nn.Module:
        """An instance of ComfyUI's class base, built by SDClipModel.__init__ with the tiny config."""
        model = base.__new__(base)
        sd1_clip.SDClipModel.__init__(model, textmodel_json_config=str(config), special_tokens=special, **options)
        return model

    sd1_special = {"start": BOS, "end": EOS, "pad": EOS}
    open_special = {"start": BOS, "end": EOS, "pad": 0}

    if family == "sd1":

        class TinySD1ClipModel(sd1_clip.SD1ClipModel):
            """ComfyUI's SD1 CLIP (final layer, final LayerNorm) at the tiny width."""

            def __init__(self, device: str = "cpu", dtype: torch.dtype | None = None) -> None:
                torch.nn.Module.__init__(self)
                self.clip_name, self.clip = "l", "clip_l"
                self.clip_l = text_model(sd1_clip.SDClipModel, configs["clip_l"], sd1_special, device=device,
                                         dtype=dtype)

        return sd1_clip.SD1Tokenizer, TinySD1ClipModel

    if family == "sd2":

        class TinySD2ClipModel(sd2_clip.SD2ClipModel):
            """ComfyUI's SD2 CLIP-H options (penultimate layer with final LayerNorm, pad 0) at the tiny width."""

            def __init__(self, device: str = "cpu", dtype: torch.dtype | None = None) -> None:
                torch.nn.Module.__init__(self)
                self.clip_name, self.clip = "h", "clip_h"
                self.clip_h = text_model(sd2_clip.SD2ClipHModel, configs["clip_h"], open_special, device=device,
                                         dtype=dtype, layer="hidden", layer_idx=-2)

        return sd2_clip.SD2Tokenizer, TinySD2ClipModel

    class TinySDXLClipModel(sdxl_clip.SDXLClipModel):
        """ComfyUI's SDXL CLIP-L + CLIP-G options (penultimate layers without final LayerNorm) at the tiny widths."""

        def __init__(self, device: str = "cpu", dtype: torch.dtype | None = None) -> None:
            import comfy.ops

            torch.nn.Module.__init__(self)
            self.clip_l = text_model(sd1_clip.SDClipModel, configs["clip_l"], sd1_special, device=device, dtype=dtype,
                                     layer="hidden", layer_idx=-2, layer_norm_hidden_state=False)
            self.clip_g = text_model(sdxl_clip.SDXLClipG, configs["clip_g"], open_special, device=device, dtype=dtype,
                                     layer="hidden", layer_idx=-2, layer_norm_hidden_state=False)
            # ComfyUI's text_projection is square (bigG: 1280 -> 1280); the tiny clip_g projects 64 -> 32.
            config = json.loads(configs["clip_g"].read_text())
            self.clip_g.transformer.text_projection = comfy.ops.manual_cast.Linear(
                config["hidden_size"], config["projection_dim"], bias=False, dtype=dtype, device=device
            )

    return sdxl_clip.SDXLTokenizer, TinySDXLClipModel


def _set_tokenizer_widths(tokenizer: object, widths: dict[str, int]) -> None:
    """Give each of ComfyUI's SDTokenizers the tiny embedding width of its encoder (clip_l / clip_h / clip_g)."""
    for key, width in widths.items():
        getattr(tokenizer, key).embedding_size = width


def _extra_openclip_layer(state: dict[str, torch.Tensor], prefix: str, layer: int, seed: int) -> None:
    """Add a random resblock after the last one: SD2 conditions on the penultimate layer of a deeper model."""
    gen = torch.Generator().manual_seed(seed)
    src = f"{prefix}transformer.resblocks.{layer - 1}."
    for key in [k for k in state if k.startswith(src)]:
        value = state[key]
        if ".ln_" in key:
            new = torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value)
        else:
            new = torch.randn(value.shape, generator=gen) * 0.05
        state[key.replace(src, f"{prefix}transformer.resblocks.{layer}.")] = new


def build_clip(family: str, parts: dict[str, object], ldm: dict[str, torch.Tensor], model_config: object,
               embeddings: Path, dtype: torch.dtype = torch.float32) -> object:
    """A comfy.sd.CLIP with ComfyUI's tokenizer and text model classes, loaded from the LDM state dict.

    model_config (ComfyUI's SD15 / SD20 / SDXL) renames the checkpoint's text-encoder keys as its loader does.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    folder = Path(tempfile.mkdtemp(prefix=f"tiny-{family}-clip-"))
    if family == "sdxl":
        models = {"clip_l": parts["text_encoder"], "clip_g": parts["text_encoder_2"]}
    else:
        models = {"clip_l" if family == "sd1" else "clip_h": parts["text_encoder"]}
    extra = 1 if family == "sd2" else 0
    configs = {key: _clip_config(model, folder, key, extra) for key, model in models.items()}
    tokenizer_class, clip_class = _clip_classes(family, configs)

    state = dict(ldm)
    if family == "sd2":
        _extra_openclip_layer(state, "cond_stage_model.model.", parts["text_encoder"].config.num_hidden_layers, 1)
    clip_state = model_config.process_clip_state_dict(state)

    clip = comfy.sd.CLIP(no_init=True)
    load_device = comfy.model_management.text_encoder_device()
    offload_device = comfy.model_management.text_encoder_offload_device()
    clip.cond_stage_model = clip_class(device=offload_device, dtype=dtype)
    clip.tokenizer = tokenizer_class(embedding_directory=str(embeddings))
    _set_tokenizer_widths(clip.tokenizer, {k: int(m.config.hidden_size) for k, m in models.items()})
    clip.patcher = comfy.model_patcher.ModelPatcher(clip.cond_stage_model, load_device=load_device,
                                                    offload_device=offload_device)
    clip.layer_idx = None
    missing, _unexpected = clip.load_sd(clip_state, full_model=True)
    missing = [k for k in missing if not k.endswith("logit_scale") and "text_projection" not in k]
    assert not missing, f"tiny {family} CLIP: weights missing for {missing}"
    return clip


def build_model_patcher(family: str, parts: dict[str, object], ldm: dict[str, torch.Tensor]) -> object:
    """A ModelPatcher over ComfyUI's SD15 / SD20 (v-prediction) / SDXL model classes with the tiny UNet."""
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

    unet = parts["unet"]
    unet_config = comfy.model_detection.detect_unet_config(ldm, UNET_PREFIX)
    config = {"sd1": sm.SD15, "sd2": sm.SD20, "sdxl": sm.SDXL}[family](unet_config)
    heads = unet.config.attention_head_dim  # diffusers reads this legacy name as the number of heads
    config.unet_config.update(num_heads=int(heads), num_head_channels=-1)
    config.set_inference_dtype(torch.float32, None)
    if family == "sd2":
        model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    else:
        model = config.get_model(ldm, UNET_PREFIX)
    groups = int(unet.config.norm_num_groups)
    for module in model.diffusion_model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.num_groups = groups  # ComfyUI hard-codes 32, the real models' count
    if family == "sdxl":
        model.embedder = Timestep(int(unet.config.addition_time_embed_dim))
    missing, unexpected = model.diffusion_model.load_state_dict(
        {k[len(UNET_PREFIX):]: v for k, v in ldm.items() if k.startswith(UNET_PREFIX)}, strict=False
    )
    assert not missing and not unexpected, f"tiny {family} UNet: missing {missing}, unexpected {unexpected}"
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def build_vae(parts: dict[str, object], ldm: dict[str, torch.Tensor]) -> object:
    """A comfy.sd.VAE over ComfyUI's AutoencoderKL at the tiny VAE's sizes."""
    import comfy.ldm.modules.diffusionmodules.model as ldm_model
    import comfy.sd

    cfg = parts["vae"].config
    ddconfig = {
        "double_z": True,
        "z_channels": int(cfg.latent_channels),
        "resolution": int(cfg.sample_size),
        "in_channels": int(cfg.in_channels),
        "out_ch": int(cfg.out_channels),
        "ch": int(cfg.block_out_channels[0]),
        "ch_mult": [c // int(cfg.block_out_channels[0]) for c in cfg.block_out_channels],
        "num_res_blocks": int(cfg.layers_per_block),
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    state = {k[len(VAE_PREFIX):]: v for k, v in ldm.items() if k.startswith(VAE_PREFIX)}
    original = ldm_model.Normalize
    ldm_model.Normalize = functools.partial(original, num_groups=int(cfg.norm_num_groups))  # ComfyUI: 32 groups
    try:
        vae = comfy.sd.VAE(sd=state, config={"params": {"ddconfig": ddconfig, "embed_dim": int(cfg.latent_channels)}})
    finally:
        ldm_model.Normalize = original
    missing, unexpected = vae.first_stage_model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, f"tiny VAE: missing {missing}, unexpected {unexpected}"
    return vae


def unet_output(tiny: TinyComfy, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The model output (noise or velocity) for x_t through ComfyUI's BaseModel.apply_model at sigma(t), in inference mode."""
    model = tiny.patcher.model
    sigma = model.model_sampling.sigmas[t]
    s = sigma.view(-1, 1, 1, 1)
    x = x_t * (s**2 + 1).sqrt()  # ComfyUI samples x = x_0 + sigma * noise; apply_model scales it back to x_t
    extra = {}
    if tiny.family == "sdxl":
        side = x_t.shape[-1] * 8
        extra["y"] = model.encode_adm(pooled_output=pooled, width=side, height=side)
    with torch.inference_mode():
        denoised = model.apply_model(x, sigma, c_crossattn=context, **extra)
    if model.model_type.name == "V_PREDICTION":
        return (x / (s**2 + 1) - denoised) * (s**2 + 1).sqrt() / s
    return (x - denoised) / s


def build(family: str, embeddings: Path, seed: int = 0, clip_dtype: torch.dtype = torch.float32) -> TinyComfy:
    """The tiny model of one family as ComfyUI MODEL / CLIP / VAE (built in inference mode) and as a diffusers Model."""
    comfy_ready()
    from identity_tokens.core.tiny import model_from_components, tiny_components

    parts = tiny_components(family, seed)
    ldm = components_to_ldm(family, parts)
    with torch.inference_mode():
        patcher = build_model_patcher(family, parts, ldm)
        clip = build_clip(family, parts, ldm, patcher.model.model_config, embeddings, clip_dtype)
        vae = build_vae(parts, ldm)
    model = model_from_components(family, parts, name=f"tiny-{family}")
    return TinyComfy(family, patcher, clip, vae, model, parts, embeddings)
