"""The ComfyUI backend: core's TextEncoder and Denoiser protocols over the graph's CLIP, MODEL (ModelPatcher) and VAE."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..core.errors import InputError
from ..core.prompts import PromptCache, in_vocabulary
from ..core.protocols import Conditioning, EncodedText, Model

ENCODER_ORDER = ("clip_l", "clip_h", "clip_g")  # SDXL's context is clip_l then clip_g, as core.condition joins it
FAMILY_BY_MODEL = {("BaseModel", ("clip_l",)): "sd1", ("BaseModel", ("clip_h",)): "sd2", ("SDXL", ("clip_l", "clip_g")): "sdxl"}
PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}


def clip_encoders(clip: object) -> dict[str, tuple[torch.nn.Module, object]]:
    """{key: (ComfyUI SDClipModel, its SDTokenizer)} for each CLIP text encoder of a ComfyUI CLIP object."""
    found = {}
    for key in ENCODER_ORDER:
        module = getattr(clip.cond_stage_model, key, None)
        tokenizer = getattr(clip.tokenizer, key, None)
        if isinstance(module, torch.nn.Module) and hasattr(module, "transformer") and tokenizer is not None:
            found[key] = (module, tokenizer)
    return found


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
    model_type = model_patcher.model.model_type.name
    if model_type not in PREDICTION_TYPES:
        raise InputError(
            f"model: prediction type {model_type} is not supported; use an epsilon or v-prediction SD checkpoint"
        )
    return family


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

    def encode(self, prompts: Sequence[str], rows: torch.Tensor | None) -> EncodedText:
        """Encode prompts with rows spliced at SLOT, at the layer ComfyUI's CLIPTextEncode would use."""
        n_rows = 0 if rows is None else int(rows.shape[0])
        device = self.token_table().device
        input_ids, mask = self.prompts.batch(list(prompts), n_rows, device)
        embeddings = self.text_model.embeddings
        x = embeddings.token_embedding(input_ids).float()
        if rows is not None and bool(mask.any()):
            x = x.masked_scatter(mask.unsqueeze(-1), rows.to(device, torch.float32).repeat(x.shape[0], 1))
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
    """Stands in for a VAE's Gaussian regulariser: keeps the moments it is given and returns their mean."""

    def __init__(self) -> None:
        super().__init__()
        self.moments: torch.Tensor | None = None

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Record z (mean and log-variance) and pass the mean on, as the mode of the distribution."""
        self.moments = z
        return z.chunk(2, dim=1)[0], {}


@contextmanager
def _captured_moments(vae: object) -> Iterator[_MomentsCapture | None]:
    """While active, a KL VAE's encode returns the latent mean and leaves the moments in the capture."""
    first_stage = vae.first_stage_model
    original = getattr(first_stage, "regularization", None)
    if original is None or not hasattr(original, "sample"):  # TAESD and other deterministic encoders
        yield None
        return
    capture = _MomentsCapture()
    first_stage.regularization = capture
    try:
        yield capture
    finally:
        first_stage.regularization = original


class ComfyDenoiser:
    """A ComfyUI MODEL: apply_model under its own noise schedule, with the sigma/timestep mapping it samples with."""

    def __init__(self, model_patcher: object, vae: object | None, family: str) -> None:
        self.patcher = model_patcher
        self.model = model_patcher.model
        self.vae = vae
        self.family = family
        self.prediction_type = PREDICTION_TYPES[self.model.model_type.name]
        with torch.inference_mode(False):  # normal tensors: they take part in the training graph
            self.sigmas = self.model.model_sampling.sigmas.detach().float().clone()
            self.alphas_cumprod = 1.0 / (1.0 + self.sigmas**2)
        self.num_train_timesteps = int(self.sigmas.shape[0])
        self.transformer_options = dict(model_patcher.model_options.get("transformer_options", {}))

    @property
    def device(self) -> torch.device:
        """The device ComfyUI runs this model on."""
        return torch.device(self.patcher.load_device)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and std (scaled for the model) of images in [-1, 1], through ComfyUI's VAE.encode."""
        if self.vae is None:
            raise InputError("vae: no VAE connected; connect the checkpoint's VAE so the photos can be encoded")
        images = ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)  # ComfyUI IMAGE layout (N, H, W, 3)
        with _captured_moments(self.vae) as capture:
            mean = self.vae.encode(images).float()
        if capture is None or capture.moments is None:
            std = torch.zeros_like(mean)
        else:
            _, logvar = capture.moments.float().chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0)).to(mean.device)
        scaled_mean = self.model.process_latent_in(mean)
        scaled_std = self.model.process_latent_in(mean + std) - scaled_mean
        return scaled_mean.to(self.device), scaled_std.to(self.device)

    def _abar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha-bar at integer timesteps, shaped to broadcast over latents."""
        return self.alphas_cumprod.to(like.device)[timesteps.long().to(like.device)].view(-1, 1, 1, 1).to(like.dtype)

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

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model output (noise or velocity) for x_t, recovered from apply_model's denoised x_0."""
        sigma = self.sigmas.to(noisy.device)[timesteps.long().to(noisy.device)]
        s = sigma.view(-1, 1, 1, 1)
        scale = (s**2 + 1).sqrt()
        model_input = noisy * scale  # ComfyUI's x = x_0 + sigma * noise; apply_model divides by sqrt(sigma^2 + 1)
        extra = {}
        if self.family == "sdxl":
            extra["y"] = self._size_conditioning(cond.pooled, noisy)
        denoised = self.model.apply_model(
            model_input, sigma, c_crossattn=cond.context, transformer_options=self.transformer_options, **extra
        ).float()
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
    """Load models onto ComfyUI's device through its memory management, fully where this core can be asked to."""
    import comfy.model_management as mm

    if "force_full_load" in inspect.signature(mm.load_models_gpu).parameters:
        mm.load_models_gpu(patchers, force_full_load=True)
    else:
        mm.load_models_gpu(patchers)


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
    """Inside: inference mode off, grad on, models loaded, weights decloned (values unchanged for later nodes)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        patchers = ([model_patcher] if model_patcher is not None else []) + [clip.patcher]
        load_models(patchers)
        if model_patcher is not None:
            _declone(model_patcher.model)
        _declone(clip.cond_stage_model)
        if model_patcher is not None and _residuals_in_place():  # older cores only; costs one copy of activations
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_keep_saved_activation, lambda t: t))
        yield
