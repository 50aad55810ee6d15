"""The ComfyUI backend: core's TextEncoder and Denoiser protocols over the graph's CLIP, MODEL (ModelPatcher) and VAE."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..core.acceleration import CompileTimer, compiled_forward
from ..core.attention import AttentionRecorder, AttentionSite, attention_probabilities, explicit_attention
from ..core.checkpointing import comfy_unet_blocks, gradient_checkpointing
from ..core.errors import InputError
from ..core.prompts import PromptCache, in_vocabulary
from ..core.protocols import Conditioning, EncodedText, Model
from ..core.trainer import encode_latents

ENCODER_ORDER = ("clip_l", "clip_h", "clip_g")  # SDXL's context is clip_l then clip_g, as core.condition joins it
FAMILY_BY_MODEL = {("BaseModel", ("clip_l",)): "sd1", ("BaseModel", ("clip_h",)): "sd2", ("SDXL", ("clip_l", "clip_g")): "sdxl"}
COND = 0  # comfy.samplers' index of the positive prompt in transformer_options["cond_or_uncond"]
# The ComfyUI node behind each model-sampling class a refusal can meet (first match in the class's MRO names it).
SAMPLING_NODES = (
    ("ModelSamplingDiscreteDistilled", "ModelSamplingDiscrete (sampling lcm)"),
    ("LCM", "ModelSamplingDiscrete (sampling lcm)"),
    ("IMG_TO_IMG", "ModelSamplingDiscrete (sampling img_to_img)"),
    ("X0", "ModelSamplingDiscrete (sampling x0)"),
    ("ModelSamplingContinuousV", "ModelSamplingContinuousV"),
    ("ModelSamplingContinuousEDM", "ModelSamplingContinuousEDM"),
    ("ModelSamplingDiscreteFlow", "ModelSamplingSD3 (or ModelSamplingAuraFlow)"),
    ("ModelSamplingFlux", "ModelSamplingFlux"),
    ("StableCascadeSampling", "ModelSamplingStableCascade"),
)
log = logging.getLogger("identity_tokens")


def clip_encoders(clip: object) -> dict[str, tuple[torch.nn.Module, object]]:
    """{key: (ComfyUI SDClipModel, its SDTokenizer)} for each CLIP text encoder of a ComfyUI CLIP object."""
    found = {}
    for key in ENCODER_ORDER:
        module = getattr(clip.cond_stage_model, key, None)
        tokenizer = getattr(clip.tokenizer, key, None)
        if isinstance(module, torch.nn.Module) and hasattr(module, "transformer") and tokenizer is not None:
            found[key] = (module, tokenizer)
    return found


def clip_widths(clip: object) -> dict[str, int]:
    """{key: token-embedding width} of each CLIP text encoder of a ComfyUI CLIP object (clip_l: 768, ...)."""
    return {key: int(module.transformer.get_input_embeddings().weight.shape[1])
            for key, (module, _) in clip_encoders(clip).items()}


def detect_family(model_patcher: object | None, clip: object) -> str:
    """sd1, sd2 or sdxl from the CLIP's encoders and, when given, the MODEL's class; anything else is an InputError."""
    keys = tuple(clip_encoders(clip))
    family_by_keys = {encoder_keys: family for (_, encoder_keys), family in FAMILY_BY_MODEL.items()}
    if keys not in family_by_keys:
        raise InputError(
            f"clip: its text encoders ({', '.join(keys) or 'none the pack knows'}) are not those of SD1.x, SD2.x or "
            "SDXL; Identity Tokens supports only those families, so load one of their checkpoints"
        )
    family = family_by_keys[keys]
    if model_patcher is None:
        return family
    model_class = type(model_patcher.model).__name__
    if (model_class, keys) not in FAMILY_BY_MODEL:
        raise InputError(
            f"model: a {model_class} model is not supported with a {family} CLIP; Identity Tokens trains SD1.x, "
            "SD2.x and SDXL checkpoints: connect the MODEL and CLIP of one such checkpoint"
        )
    return family


def model_object(model_patcher: object, name: str) -> object:
    """An attribute of the MODEL as its object patches set it for sampling (ModelPatcher.get_model_object, on any core)."""
    getter = getattr(model_patcher, "get_model_object", None)
    if getter is not None:
        return getter(name)
    if name in model_patcher.object_patches:  # the 2024 core has no get_model_object; the same lookup
        return model_patcher.object_patches[name]
    if name in model_patcher.object_patches_backup:
        return model_patcher.object_patches_backup[name]
    return functools.reduce(getattr, name.split("."), model_patcher.model)


def _unsupported_sampling(sampling: object) -> str:
    """Why the trainer cannot use a model_sampling object, in a few words; '' when it can."""
    import comfy.model_sampling as ms

    kind = type(sampling)
    names = [cls.__name__ for cls in kind.__mro__]
    if not isinstance(sampling, ms.ModelSamplingDiscrete):
        return "a flow-matching schedule" if "CONST" in names else "a continuous noise schedule"
    if kind.calculate_denoised not in (ms.EPS.calculate_denoised, ms.V_PREDICTION.calculate_denoised):
        owner = next(cls.__name__ for cls in kind.__mro__ if "calculate_denoised" in vars(cls))
        return f"{'boundary-scaled LCM' if owner == 'LCM' else owner} outputs instead of epsilon or v-prediction"
    if kind.timestep is not ms.ModelSamplingDiscrete.timestep or kind.sigma is not ms.ModelSamplingDiscrete.sigma:
        return "a distilled or remapped timestep schedule"
    if getattr(kind, "calculate_input", None) is not ms.EPS.calculate_input or float(sampling.sigma_data) != 1.0:
        return "a non-standard input scaling"
    return ""


def _sampling_node(sampling: object) -> str:
    """The ComfyUI node that made this model_sampling object, as users see it in the graph."""
    names = [cls.__name__ for cls in type(sampling).__mro__]
    for marker, node in SAMPLING_NODES:
        if marker in names:
            return node
    return f"the node that set its model sampling ({', '.join(cls.__name__ for cls in type(sampling).__bases__)})"


def sampling_of(model_patcher: object) -> tuple[str, object]:
    """(prediction type, model_sampling) of the MODEL as the sampler runs it; patches training cannot honour are refused."""
    import comfy.model_sampling as ms

    sampling = model_object(model_patcher, "model_sampling")
    why = _unsupported_sampling(sampling)
    if why:
        if "model_sampling" in model_patcher.object_patches:
            raise InputError(
                f"model: its sampling is patched by {_sampling_node(sampling)}, which gives {why}; Train Identity "
                "Token trains only with a discrete epsilon or v-prediction schedule, so remove that node before Train "
                "Identity Token (it can stay between the MODEL and your sampler)"
            )
        model_type = getattr(getattr(model_patcher.model, "model_type", None), "name", type(sampling).__name__)
        raise InputError(
            f"model: this checkpoint samples with {why} ({model_type}), which Train Identity Token cannot train with; "
            "use an epsilon or v-prediction SD1.x, SD2.x or SDXL checkpoint"
        )
    prediction = "epsilon" if type(sampling).calculate_denoised is ms.EPS.calculate_denoised else "v_prediction"
    return prediction, sampling


def _layer_options(module: torch.nn.Module, clip: object) -> tuple[str, int | None, bool]:
    """(layer, layer_idx, final LN on hidden) as ComfyUI's own encode would use them, CLIPSetLastLayer included."""
    module.reset_clip_options()
    if getattr(clip, "layer_idx", None) is not None:
        module.set_clip_options({"layer": clip.layer_idx})
    options = (module.layer, module.layer_idx, bool(module.layer_norm_hidden_state))
    module.reset_clip_options()
    return options


class ComfyTextEncoder:
    """One ComfyUI CLIP text encoder run by the pack's own out-of-place forward, so gradients reach spliced rows."""

    def __init__(self, key: str, module: torch.nn.Module, tokenizer: object, clip: object, pooled: bool) -> None:
        self.key = key
        self.module = module
        self.tokenizer = tokenizer
        self.transformer = module.transformer
        self.text_model = module.transformer.text_model
        self.width = int(self.transformer.get_input_embeddings().weight.shape[1])
        self.layer, self.layer_idx, self.final_ln_on_hidden = _layer_options(module, clip)
        self.use_pooled = pooled
        self.prompts = PromptCache(self)

    def token_ids(self, text: str) -> list[int]:
        """BPE ids of text, without BOS/EOS."""
        return list(self.tokenizer.tokenizer(text)["input_ids"][1:-1]) if text.strip() else []

    def in_vocabulary(self, word: str) -> bool:
        """Whether word is one vocabulary entry already."""
        return in_vocabulary(self.tokenizer.tokenizer.get_vocab(), word)

    def token_table(self) -> torch.Tensor:
        """The frozen input token-embedding table."""
        return self.transformer.get_input_embeddings().weight

    def special_ids(self) -> tuple[int, int, int]:
        """(BOS, EOS, PAD) ids as ComfyUI pads this encoder."""
        tokens = self.module.special_tokens
        return int(tokens["start"]), int(tokens["end"]), int(tokens["pad"])

    def _attention(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Causal multi-head self-attention of one CLIP layer, computed with the layer's own projections."""
        attn = layer.self_attn
        batch, length, _ = x.shape
        heads = int(attn.heads)
        q, k, v = (proj(x).view(batch, length, heads, -1).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attn.out_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _embedded(self, prompts: list[str], rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 77) ids and their float32 token embeddings with rows at SLOT: (n, width) shared or (B, n, width) each."""
        per_prompt = rows is not None and rows.dim() == 3
        if per_prompt and rows.shape[0] != len(prompts):
            raise ValueError(f"encode: {rows.shape[0]} row sets for {len(prompts)} prompts; give one per prompt")
        n_rows = 0 if rows is None else int(rows.shape[-2])
        device = self.token_table().device
        input_ids, slots = self.prompts.spliced(prompts, n_rows, device)
        x = self.text_model.embeddings.token_embedding(input_ids).float()
        if rows is None or not self.prompts.has_rows(prompts, n_rows):
            return input_ids, x
        rows = rows.to(device, torch.float32)
        mask = slots >= 0
        if not per_prompt:
            return input_ids, x.masked_scatter(mask.unsqueeze(-1), rows.repeat(x.shape[0], 1))
        prompt = torch.arange(len(prompts), device=device).unsqueeze(1)
        return input_ids, torch.where(mask.unsqueeze(-1), rows[prompt, slots.clamp_min(0)], x)

    def encode(self, prompts: Sequence[str], rows: torch.Tensor | None) -> EncodedText:
        """Encode prompts with rows spliced at SLOT, at the layer ComfyUI's CLIPTextEncode would use.

        rows: (n, width), the same rows in every prompt, or (B, n, width), each prompt its own (B = len(prompts)).
        """
        input_ids, x = self._embedded(list(prompts), rows)
        device = x.device
        embeddings = self.text_model.embeddings
        x = x + embeddings.position_embedding.weight[: x.shape[1]].to(device, torch.float32)
        layers = self.text_model.encoder.layers
        wanted = None
        if self.layer != "last":
            wanted = self.layer_idx if self.layer_idx >= 0 else len(layers) + self.layer_idx
        last = len(layers) - 1 if (self.use_pooled or wanted is None) else wanted
        hidden = None
        for index, layer in enumerate(layers[: last + 1]):
            x = x + self._attention(layer, layer.layer_norm1(x))
            x = x + layer.mlp(layer.layer_norm2(x))
            if index == wanted:
                hidden = self.text_model.final_layer_norm(x) if self.final_ln_on_hidden else x
        final = self.text_model.final_layer_norm(x) if (hidden is None or self.use_pooled) else None
        if hidden is None:
            hidden = final
        pooled = None
        if self.use_pooled:
            eos = self.special_ids()[1]
            first_eos = (input_ids == eos).int().argmax(dim=-1)
            pooled = final[torch.arange(final.shape[0], device=device), first_eos]
            if self.module.return_projected_pooled:
                pooled = self.transformer.text_projection(pooled)
            pooled = pooled.float()
        return EncodedText(hidden=hidden.float(), pooled=pooled)


class _MomentsCapture(torch.nn.Module):
    """Stands in for a KL VAE's Gaussian regulariser: records every call's mean and std, and returns the mean (or std)."""

    def __init__(self, give_std: bool = False) -> None:
        super().__init__()
        self.give_std = give_std
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Split z into mean and log-variance, keep both moments, pass one on in place of a sample."""
        mean, logvar = z.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))  # DiagonalGaussianDistribution's clamp
        self.calls.append((mean, std))
        return (std.to(mean.dtype) if self.give_std else mean), {}


@contextmanager
def _regulariser(first_stage: torch.nn.Module, capture: _MomentsCapture) -> Iterator[_MomentsCapture]:
    """While active, the VAE's encode goes through capture instead of its Gaussian regulariser."""
    original = first_stage.regularization
    first_stage.regularization = capture
    try:
        yield capture
    finally:
        first_stage.regularization = original


def _assembled(calls: list[tuple[torch.Tensor, torch.Tensor]], mean: torch.Tensor) -> torch.Tensor | None:
    """The std of the batch when the calls were whole images in order (one call or sub-batches); None for tiles."""
    if not calls or any(m.shape[1:] != mean.shape[1:] for m, _ in calls) or sum(m.shape[0] for m, _ in calls) != mean.shape[0]:
        return None
    if not torch.equal(torch.cat([m for m, _ in calls]).float().to(mean.device), mean):
        return None
    return torch.cat([s for _, s in calls]).to(mean.device)


def vae_moments(vae: object, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of IMAGEs (N, H, W, 3) through ComfyUI's VAE.encode, however it split or tiled the batch.

    One call or memory-sized sub-batches: each call's moments are kept and put together in order (checked against
    what encode returned). Tiles (ComfyUI's fallback on out-of-memory): encode runs again with the std in place of the
    mean, so ComfyUI's tiler blends the std exactly as it blended the mean. Deterministic encoders (TAESD) have std 0.
    """
    first_stage = vae.first_stage_model
    if not hasattr(getattr(first_stage, "regularization", None), "sample"):  # TAESD and other deterministic encoders
        mean = vae.encode(images).float()
        return mean, torch.zeros_like(mean)
    with _regulariser(first_stage, _MomentsCapture()) as capture:
        mean = vae.encode(images).float()
    if not capture.calls:  # an encode path that skips the regulariser gives no moments
        return mean, torch.zeros_like(mean)
    std = _assembled(capture.calls, mean)
    if std is None:
        with _regulariser(first_stage, _MomentsCapture(give_std=True)):
            std = vae.encode(images).float()
    return mean, std


def encode_training_latents(model: Model, pixels: torch.Tensor, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The photos' latent moments for Trainer(latents=...), through ComfyUI's VAE, as tensors autograd may use.

    Call it before trainable(): loading the VAE then cannot evict the UNet that training is about to load.
    """
    mean, std = encode_latents(model.denoiser, pixels, flip)
    with torch.inference_mode(False):  # ComfyUI's executor made them inference tensors
        return mean.clone(), std.clone()


def partially_loaded(model_patcher: object) -> bool:
    """Whether ComfyUI loaded the MODEL only in part (--lowvram, --novram, or too little free VRAM)."""
    return getattr(model_patcher, "model_lowvram", False) is True or bool(getattr(model_patcher.model, "model_lowvram", False))


BLOCK_PARTS = (("input", "down"), ("middle", "mid"), ("output", "up"))  # ComfyUI's UNet block names, core's parts
AttentionPatch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
AttentionReplace = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _resolution_step(layer: torch.nn.Module) -> int:
    """+1 for a layer that halves the resolution (Downsample, or a ResBlock with one), -1 for one that doubles it."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    modules = list(layer.modules())
    return int(any(isinstance(m, Downsample) for m in modules)) - int(any(isinstance(m, Upsample) for m in modules))


def unet_attention_sites(diffusion_model: torch.nn.Module) -> list[AttentionSite]:
    """Every attn2 of ComfyUI's UNetModel in forward order, named 'input.{block}.{index}' as its attn2 replace keys."""
    middle = getattr(diffusion_model, "middle_block", None)
    groups = {"input": diffusion_model.input_blocks, "middle": [] if middle is None else [middle],
              "output": diffusion_model.output_blocks}
    sites, level = [], 0
    for block_name, part in BLOCK_PARTS:
        for block_id, block in enumerate(groups[block_name]):
            for layer in block:
                for index, transformer in enumerate(getattr(layer, "transformer_blocks", None) or []):
                    if getattr(transformer, "attn2", None) is not None:
                        sites.append(AttentionSite(part, level, f"{block_name}.{block_id}.{index}"))
                level += _resolution_step(layer)
    return sites


def replace_key(name: str) -> tuple[str, int, int]:
    """The (block name, block id, transformer index) key of ComfyUI's attn2 replace patches for a site name."""
    block_name, block_id, index = name.split(".")
    return block_name, int(block_id), int(index)


def user_replace(attn2: dict, name: str) -> AttentionReplace | None:
    """The attn2 replace a MODEL patch set on this layer (by its full key or by its block), as ComfyUI would find it."""
    key = replace_key(name)
    return attn2.get(key, attn2.get(key[:2]))


def with_attn2_patch(options: dict, patch: AttentionPatch) -> dict:
    """options with patch appended to its attn2_patch list; the lists and dicts it came with are not changed."""
    patches = dict(options.get("patches", {}))
    patches["attn2_patch"] = [*patches.get("attn2_patch", []), patch]
    return {**options, "patches": patches}


def value_patch(value_context: torch.Tensor) -> AttentionPatch:
    """An attn2_patch taking cross-attention values from value_context, keys (and queries) as they come."""

    def patch(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict) -> tuple:
        return n, context, value_context.to(device=context.device, dtype=context.dtype)

    return patch


def recorded_attention(recorder: AttentionRecorder, name: str, theirs: AttentionReplace | None) -> AttentionReplace:
    """An attn2 replace computing the layer's map explicitly and handing it to recorder.add(name, map).

    Without a replace of the user's, the output comes from the same probabilities (explicit_attention); with one, the
    output is theirs and the map is softmax(QK^T/sqrt(d)) of the q and k their replace gets. The explicit path runs
    whether or not the recorder is active, so a checkpoint's recompute repeats the forward exactly.
    """

    def replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        heads = int(extra["n_heads"])
        if theirs is None:
            out, probs = explicit_attention(q, k, v, heads)
        else:
            out, probs = theirs(q, k, v, extra), attention_probabilities(q, k, heads).mean(dim=1)
        recorder.add(name, probs)
        return out

    return replace


def with_recording(options: dict, recorder: AttentionRecorder) -> dict:
    """options with an attn2 replace on each of the recorder's layers (wrapping the user's where one is set)."""
    patches_replace = dict(options.get("patches_replace", {}))
    attn2 = dict(patches_replace.get("attn2", {}))
    for site in recorder.sites:
        attn2[replace_key(site.name)] = recorded_attention(recorder, site.name, user_replace(attn2, site.name))
    patches_replace["attn2"] = attn2
    return {**options, "patches_replace": patches_replace}


class ComfyDenoiser:
    """A ComfyUI MODEL as its patches leave it: the sampler's model_sampling, transformer_options and model wrapper."""

    def __init__(self, model_patcher: object, vae: object | None, family: str) -> None:
        self.patcher = model_patcher
        self.model = model_patcher.model
        self.vae = vae
        self.family = family
        self.prediction_type, self.model_sampling = sampling_of(model_patcher)
        self.latent_format = model_object(model_patcher, "latent_format")
        with torch.inference_mode(False):  # normal tensors: they take part in the training graph
            self.sigmas = self.model_sampling.sigmas.detach().float().clone()
        self.num_train_timesteps = int(self.sigmas.shape[0])
        self.model_options = model_patcher.model_options
        self.transformer_options = dict(self.model_options.get("transformer_options", {}))
        self.cond_uuid = uuid.uuid4()  # comfy.samplers gives each cond a uuid ("uuids"); training has one cond
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._recorder: AttentionRecorder | None = None

    @property
    def device(self) -> torch.device:
        """The device ComfyUI runs this model on."""
        return torch.device(self.patcher.load_device)

    def checkpointing(self) -> contextlib.AbstractContextManager[None]:
        """While active, the UNet's layers recompute activations in backward (safe on cores with in-place residuals)."""
        return gradient_checkpointing(comfy_unet_blocks(self.model.diffusion_model), inplace_safe=_residuals_in_place())

    def attention_sites(self) -> list[AttentionSite]:
        """Every cross-attention layer of the UNet in forward order, named as ComfyUI's attn2 replace patches key them."""
        return unet_attention_sites(self.model.diffusion_model)

    @contextmanager
    def recording(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        """While active, predict computes the recorder's layers explicitly and hands their maps to recorder.add."""
        attn2 = self.transformer_options.get("patches_replace", {}).get("attn2", {})
        for site in recorder.sites:
            if user_replace(attn2, site.name) is not None:
                log.warning(
                    "Identity Tokens: another node replaces the cross-attention of layer %s; its output is kept and "
                    "the layer's map is recorded as softmax(QK^T/sqrt(d)) of the queries and keys that node gets",
                    site.name,
                )
        previous, self._recorder = self._recorder, recorder
        try:
            yield recorder
        finally:
            self._recorder = previous

    def compiled(self, timer: CompileTimer) -> contextlib.AbstractContextManager[None]:
        """While active, the diffusion model's forward is torch.compile'd (eager again on any failure)."""
        return compiled_forward(self.model.diffusion_model, timer)

    def memory_modules(self) -> list[torch.nn.Module]:
        """The modules whose weights the run keeps on the device (for the free-memory count)."""
        return [self.model.diffusion_model]

    @property
    def dtype(self) -> torch.dtype:
        """What apply_model computes in: ComfyUI's manual-cast dtype where it casts stored weights, else theirs."""
        cast = getattr(self.model, "manual_cast_dtype", None)
        return cast if isinstance(cast, torch.dtype) else self.model.get_dtype()

    def _schedule(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigmas, alpha-bar, the sampler-style descending sigmas ending in 0) on device, copied there once."""
        if device not in self._tables:
            with torch.inference_mode(False):
                sigmas = self.sigmas.to(device)
                descending = torch.cat([sigmas.flip(0), sigmas.new_zeros(1)])
                self._tables[device] = (sigmas, 1.0 / (1.0 + sigmas**2), descending)
        return self._tables[device]

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and std (scaled for the model) of images in [-1, 1], through ComfyUI's VAE.encode."""
        if self.vae is None:
            raise InputError("vae: no VAE connected; connect the checkpoint's VAE so the photos can be encoded")
        images = ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)  # ComfyUI IMAGE layout (N, H, W, 3)
        mean, std = vae_moments(self.vae, images)
        scaled_mean = self.latent_format.process_in(mean)
        scaled_std = self.latent_format.process_in(std) - self.latent_format.process_in(torch.zeros_like(std))  # affine
        return scaled_mean.to(self.device), scaled_std.to(self.device)

    def _abar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha-bar at integer timesteps, shaped to broadcast over latents."""
        abar = self._schedule(like.device)[1]
        return abar[timesteps.long().to(like.device)].view(-1, 1, 1, 1).to(like.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar) x_0 + sqrt(1 - abar) noise, the variance-preserving form of ComfyUI's x_0 + sigma noise."""
        abar = self._abar(timesteps, latents)
        return abar.sqrt() * latents + (1 - abar).sqrt() * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise for epsilon models, velocity for v-prediction models."""
        if self.prediction_type == "epsilon":
            return noise
        abar = self._abar(timesteps, latents)
        return abar.sqrt() * noise - (1 - abar).sqrt() * latents

    def _size_conditioning(self, pooled: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """SDXL's vector input: pooled text plus original/crop/target size embeddings for an uncropped image."""
        height, width = (int(s) * 8 for s in noisy.shape[-2:])
        adm = self.model.encode_adm(
            pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
            target_width=width, target_height=height,
        )
        return adm.to(noisy.device)

    def sampling_options(self, sigma: torch.Tensor) -> dict:
        """transformer_options as comfy.samplers builds them for one all-positive batch at these sigmas."""
        options = dict(self.transformer_options)  # a new dict per call: the UNet writes block, original_shape, ...
        options.setdefault("sample_sigmas", self._schedule(sigma.device)[2])  # a sampler's schedule: high to 0
        options.update(cond_or_uncond=[COND], uuids=[self.cond_uuid], sigmas=sigma)
        return options

    def _call_options(self, sigma: torch.Tensor, cond: Conditioning) -> dict:
        """sampling_options plus this call's patches: values from cond.value_context, the recorder's explicit layers."""
        options = self.sampling_options(sigma)
        if cond.value_context is not None:
            options = with_attn2_patch(options, value_patch(cond.value_context))
        if self._recorder is not None:
            options = with_recording(options, self._recorder)
        return options

    def _apply_model(self, model_input: torch.Tensor, sigma: torch.Tensor, c: dict) -> torch.Tensor:
        """BaseModel.apply_model, through the MODEL's model_function_wrapper when a node set one, as the sampler calls it."""
        if self.model.model_sampling is not self.model_sampling:
            raise RuntimeError(
                "model: ComfyUI has not applied this MODEL's sampling patch (the MODEL is not loaded); call the "
                "denoiser inside trainable(), which loads it"
            )
        wrapper = self.model_options.get("model_function_wrapper")
        if wrapper is None:
            return self.model.apply_model(model_input, sigma, **c)
        args = {"input": model_input, "timestep": sigma, "c": c, "cond_or_uncond": [COND]}
        return wrapper(self.model.apply_model, args)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model output (noise or velocity) for x_t, recovered from apply_model's denoised x_0."""
        sigma = self._schedule(noisy.device)[0][timesteps.long().to(noisy.device)]
        s = sigma.view(-1, 1, 1, 1)
        scale = (s**2 + 1).sqrt()
        model_input = noisy * scale  # ComfyUI's x = x_0 + sigma * noise; apply_model divides by sqrt(sigma^2 + 1)
        c = {"c_crossattn": cond.context, "transformer_options": self._call_options(sigma, cond)}
        if self.family == "sdxl":
            c["y"] = self._size_conditioning(cond.pooled, noisy)
        denoised = self._apply_model(model_input, sigma, c).float()
        if cond.context.requires_grad and not denoised.requires_grad:
            raise InputError(
                "model: a patch on this MODEL (a model wrapper or attention replacement) computes without gradients, "
                "so the identity cannot learn; remove the node that added it before Train Identity Token"
            )
        if self.prediction_type == "epsilon":
            return (model_input - denoised) / s
        return (model_input / scale**2 - denoised) * scale / s


def comfy_model(model_patcher: object | None, clip: object, vae: object | None = None, name: str = "") -> Model:
    """A core Model over ComfyUI's MODEL, CLIP and VAE; with no MODEL only the text encoders are usable."""
    family = detect_family(model_patcher, clip)
    encoders = [
        ComfyTextEncoder(key, module, tokenizer, clip, pooled=(family == "sdxl" and key == "clip_g"))
        for key, (module, tokenizer) in clip_encoders(clip).items()
    ]
    denoiser = ComfyDenoiser(model_patcher, vae, family) if model_patcher is not None else None
    return Model(family=family, encoders=encoders, denoiser=denoiser, name=name or family)


def _declone(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer with a new, normal tensor of the same value (ComfyUI made them inference tensors)."""
    for sub in module.modules():
        for key, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[key] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
        for key, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[key] = buffer.detach().clone()


def load_models(patchers: list[object]) -> None:
    """Load models through ComfyUI's memory management, which honours --lowvram / --novram and loads in part if needed."""
    import comfy.model_management as mm

    mm.load_models_gpu(patchers)


def _log_load(model_patcher: object) -> None:
    """Say how ComfyUI loaded the MODEL for training: fully, or in part with the rest streamed in each step."""
    if partially_loaded(model_patcher):
        log.warning(
            "Identity Tokens: the MODEL is loaded only in part (--lowvram, --novram or too little free VRAM); training "
            "streams the rest of its weights in every step (slower), and the backward pass keeps the streamed copies, "
            "so this saves little memory. Lower batch_size or resolution if training runs out of memory."
        )
    else:
        log.info("Identity Tokens: the MODEL is fully loaded on %s for training", model_patcher.load_device)


def _residuals_in_place() -> bool:
    """Whether this ComfyUI's transformer blocks add residuals in place (the 2024 core: `x += n`), which backward refuses."""
    try:
        import comfy.ldm.modules.attention as attention

        return "x += n" in inspect.getsource(attention.BasicTransformerBlock)
    except (ImportError, OSError, TypeError, AttributeError):
        return False


def _keep_saved_activation(tensor: torch.Tensor) -> torch.Tensor:
    """Copy an activation autograd saves, so a later in-place residual add cannot change it; weights pass as they are."""
    return tensor.clone() if tensor.grad_fn is not None else tensor


@contextmanager
def trainable(model_patcher: object | None, clip: object) -> Iterator[None]:
    """Inside: inference mode off, grad on, models loaded (in part where ComfyUI chose so), weights decloned.

    Weight values are unchanged for later nodes. Encode the training latents before entering (encode_training_latents):
    nothing inside loads another model, so the UNet stays where ComfyUI put it for every step.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        patchers = ([model_patcher] if model_patcher is not None else []) + [clip.patcher]
        load_models(patchers)
        if model_patcher is not None:
            _log_load(model_patcher)
            _declone(model_patcher.model)
        _declone(clip.cond_stage_model)
        if model_patcher is not None and _residuals_in_place():  # older cores only; costs one copy of activations
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_keep_saved_activation, lambda t: t))
        yield
