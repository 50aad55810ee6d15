"""Test helper: tiny diffusers components written as one single-file checkpoint in the original LDM / ComfyUI layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.tiny import tiny_components

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each family's text encoders live in an LDM checkpoint: (component, prefix, layout).
TEXT_ENCODERS = {
    "sd1": [("text_encoder", "cond_stage_model.transformer.", "hf")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [
        ("text_encoder", "conditioner.embedders.0.transformer.", "hf"),
        ("text_encoder_2", "conditioner.embedders.1.model.", "openclip"),
    ],
}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, renames: dict[str, str]) -> str:
    """Rename the leading module name of a key remainder ('norm1.weight' -> 'in_layers.0.weight')."""
    for old, new in renames.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unet_prefixes(config: object) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, inner renames) for every block of a diffusers UNet2DConditionModel."""
    per = int(config.layers_per_block) + 1
    levels = len(config.block_out_channels)
    rules = [("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
             ("add_embedding.linear_1.", "label_emb.0.0.", {}), ("add_embedding.linear_2.", "label_emb.0.2.", {}),
             ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
             ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", {}),
             ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)]
    for i in range(levels):
        for j in range(per - 1):
            rules.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * per + j}.0.", UNET_RESNET))
            rules.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * per + j}.1.", {}))
        rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per}.0.op.", {}))
        has_attention = "Attn" in config.up_block_types[i]
        for j in range(per):
            rules.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per + j}.0.", UNET_RESNET))
            rules.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * per + j}.1.", {}))
        upsample_slot = 2 if has_attention else 1
        rules.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * per + per - 1}.{upsample_slot}.conv.", {}))
    return rules


def _vae_prefixes(config: object) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, inner renames) for every block of a diffusers AutoencoderKL."""
    levels = len(config.block_out_channels)
    rules = [("encoder.conv_norm_out.", "encoder.norm_out.", {}), ("decoder.conv_norm_out.", "decoder.norm_out.", {})]
    for side in ("encoder", "decoder"):
        rules += [(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", {}),
                  (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", {}),
                  (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", VAE_ATTENTION)]
    for i in range(levels):
        rules += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", {}),
                  (f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}),
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.", {}),
                  (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{levels - 1 - i}.upsample.conv.", {})]
    return rules


def _convert(state: dict[str, torch.Tensor], rules: list, prefix: str) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching rule (keys without one keep their name) and add the prefix."""
    rules = sorted(rules, key=lambda rule: -len(rule[0]))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for old_prefix, new_prefix, renames in rules:
            if key.startswith(old_prefix):
                new = new_prefix + _rename_head(key[len(old_prefix):], renames)
                break
        assert prefix + new not in out, f"two keys map to {prefix + new}"
        out[prefix + new] = value
    return out


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under LDM names ('model.diffusion_model.input_blocks...')."""
    return _convert(unet.state_dict(), _unet_prefixes(unet.config), UNET_PREFIX)


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's weights under LDM names, mid-block attention as 1x1 convolutions."""
    converted = _convert(vae.state_dict(), _vae_prefixes(vae.config), VAE_PREFIX)
    out = {k.replace(".conv_shortcut.", ".nin_shortcut."): v for k, v in converted.items()}
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def clip_to_ldm(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in the LDM layout of CLIP-L ('...transformer.text_model.*'), with position_ids."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    out = {f"{prefix}text_model.{k}": v for k, v in state.items() if not k.startswith("text_projection")}
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return out


def openclip_to_ldm(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in OpenCLIP's layout (fused in_proj, resblocks, text_projection as (width, dim))."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    width = int(state["embeddings.token_embedding.weight"].shape[1])
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"]}
    projection = state.get("text_projection.weight", torch.eye(width))
    out[prefix + "text_projection"] = projection.T.contiguous()
    inner = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for layer in range(model.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            fused = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(fused, dim=0)
            for old, new in inner.items():
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
    return out


def components_to_ldm(family: str, parts: dict[str, object]) -> dict[str, torch.Tensor]:
    """All tiny components of a family as one LDM / ComfyUI state dict."""
    state = {**unet_to_ldm(parts["unet"]), **vae_to_ldm(parts["vae"])}
    for name, prefix, layout in TEXT_ENCODERS[family]:
        convert = clip_to_ldm if layout == "hf" else openclip_to_ldm
        state.update(convert(parts[name], prefix))
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_tiny_checkpoint(path: Path, family: str, seed: int = 0) -> dict[str, object]:
    """Write tiny_components(family, seed) as one .safetensors checkpoint in the LDM layout; return the components."""
    parts = tiny_components(family, seed)
    save_file(components_to_ldm(family, parts), str(path))
    return parts


def write_tiny_sd1_checkpoint(path: Path, seed: int = 0) -> dict[str, object]:
    """Write the tiny SD1 model as one .safetensors checkpoint in the LDM / ComfyUI layout; return the components."""
    return write_tiny_checkpoint(path, "sd1", seed)


def write_component_configs(parts: dict[str, object], folder: Path) -> Path:
    """Write the components' own configs as a diffusers-layout config folder (for load_single_file's config_dir)."""
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": "StableDiffusionPipeline"}
    for name, part in parts.items():
        if name.startswith("tokenizer"):
            continue
        if name.startswith("text_encoder"):
            part.config.save_pretrained(str(folder / name))
        else:
            part.save_config(str(folder / name))
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder
