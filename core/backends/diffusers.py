"""The diffusers backend: transformers CLIP text encoders and a diffusers UNet/VAE/scheduler behind the core protocols."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ..acceleration import CompileTimer, compiled_forward
from ..attention import AttentionRecorder, AttentionSite, explicit_attention, fast_attention
from ..checkpointing import diffusers_unet_blocks, gradient_checkpointing, recomputing
from ..errors import InputError
from ..prompts import PromptCache, in_vocabulary
from ..protocols import Conditioning, EncodedText

# Conditioning layer per family (METHODS.md 0.2): the last layer after final LayerNorm, or the raw penultimate one.
LAYER_FINAL_LN = "final_ln"
LAYER_PENULTIMATE = "penultimate"


class _Stop(Exception):
    """Raised by a hook to end a text encoder's forward once the hidden state it needs has been seen."""


def _encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer layers of a transformers CLIP text model, with or without projection, in any layout."""
    inner = model
    while hasattr(inner, "text_model"):
        inner = inner.text_model
    return inner.encoder.layers


def _check_rows(rows: torch.Tensor | None, n_prompts: int, width: int) -> None:
    """Refuse identity rows that are neither (n, width) nor (n_prompts, n, width)."""
    if rows is None:
        return
    if rows.ndim == 2 and rows.shape[1] == width:
        return
    if rows.ndim == 3 and rows.shape[0] == n_prompts and rows.shape[2] == width:
        return
    raise InputError(
        f"identity rows: got shape {tuple(rows.shape)} for {n_prompts} prompts; give (n, {width}) rows for all "
        f"prompts or ({n_prompts}, n, {width}), one set per prompt"
    )


class DiffusersTextEncoder:
    """A transformers CLIP text model whose input embeddings get identity rows spliced in by a forward hook."""

    def __init__(self, key: str, tokenizer, model: torch.nn.Module, layer: str, projected_pooled: bool = False) -> None:
        self.key = key
        self.tokenizer = tokenizer
        self.model = model
        self.layer = layer
        self.projected_pooled = projected_pooled
        self.width = int(model.get_input_embeddings().weight.shape[1])
        self.prompts = PromptCache(self)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the encoder computes in."""
        return self.token_table().dtype

    def token_ids(self, text: str) -> list[int]:
        """BPE ids of text, without BOS/EOS."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []

    def in_vocabulary(self, word: str) -> bool:
        """Whether word is one vocabulary entry already (as a whole word or a word piece)."""
        return in_vocabulary(self.tokenizer.get_vocab(), word)

    def token_table(self) -> torch.Tensor:
        """The frozen input token-embedding table."""
        return self.model.get_input_embeddings().weight

    def special_ids(self) -> tuple[int, int, int]:
        """(BOS, EOS, PAD) ids."""
        tok = self.tokenizer
        return int(tok.bos_token_id), int(tok.eos_token_id), int(tok.pad_token_id)

    def _splice(self, slots: torch.Tensor, rows: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
        """A hook making the token-embedding output at each slot (index >= 0) the identity row of that index.

        rows (n, width) go into every prompt; rows (B, n, width) give prompt b the rows rows[b].
        """

        def replace(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            # Every position gathers a row (index -1 reads row 0, which torch.where then drops): one gather and
            # one select, no mask count read back. The cast to the compute dtype is differentiable, so the gradient
            # reaches the float32 rows.
            index = slots.clamp_min(0)
            if rows.ndim == 2:
                source = rows.to(output.dtype)[index]
            else:
                prompt = torch.arange(index.shape[0], device=index.device).unsqueeze(-1)
                source = rows.to(output.dtype)[prompt, index]
            return torch.where((slots >= 0).unsqueeze(-1), source, output)

        return self.model.get_input_embeddings().register_forward_hook(replace)

    def _penultimate(self, captured: list[torch.Tensor], stop: bool) -> torch.utils.hooks.RemovableHandle:
        """A hook keeping the last layer's input (the penultimate hidden state); with stop, the forward ends there."""

        def grab(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            if stop:
                raise _Stop

        return _encoder_layers(self.model)[-1].register_forward_pre_hook(grab, with_kwargs=True)

    def encode(self, prompts: Sequence[str], rows: torch.Tensor | None) -> EncodedText:
        """Encode prompts with rows spliced at SLOT, at the family's conditioning layer.

        rows: (n, width), the same rows in every prompt, or (B, n, width) with B = len(prompts), each prompt's own.
        """
        prompts = list(prompts)
        _check_rows(rows, len(prompts), self.width)
        n_rows = 0 if rows is None else int(rows.shape[-2])
        device = self.token_table().device
        input_ids, slots = self.prompts.spliced(prompts, n_rows, device)
        handles = []
        if rows is not None and self.prompts.has_rows(prompts, n_rows):
            handles.append(self._splice(slots, rows.to(device)))
        captured: list[torch.Tensor] = []
        if self.layer == LAYER_PENULTIMATE:  # only clip_g's pooled output needs the last layer and the final LayerNorm
            handles.append(self._penultimate(captured, stop=not self.projected_pooled))
        out = None
        try:
            out = self.model(input_ids)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        hidden = captured[0] if self.layer == LAYER_PENULTIMATE else out.last_hidden_state
        pooled = out.text_embeds if self.projected_pooled else None
        return EncodedText(hidden=hidden, pooled=pooled)


def _unet_blocks(unet: torch.nn.Module) -> list[tuple[str, str, int, torch.nn.Module]]:
    """(part, path, level, block) of a UNet2DConditionModel's down, mid and up blocks, in forward order."""
    deepest = len(unet.down_blocks) - 1
    blocks = [("down", f"down_blocks.{i}", i, block) for i, block in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        blocks.append(("mid", "mid_block", deepest, unet.mid_block))
    last_up = len(unet.up_blocks) - 1
    blocks += [("up", f"up_blocks.{j}", last_up - j, block) for j, block in enumerate(unet.up_blocks)]
    return blocks


def _is_cross_attention(name: str, module: torch.nn.Module) -> bool:
    """Whether module is a transformer block's cross-attention (attn2) layer."""
    return name.rsplit(".", 1)[-1] == "attn2" and bool(getattr(module, "is_cross_attention", False))


def cross_attention_layers(unet: torch.nn.Module) -> list[tuple[AttentionSite, torch.nn.Module]]:
    """Every attn2 layer of a diffusers UNet with its site, in forward order (a block's modules run in listed order)."""
    layers = []
    for part, path, level, block in _unet_blocks(unet):
        for name, module in block.named_modules():
            if _is_cross_attention(name, module):
                layers.append((AttentionSite(part=part, level=level, name=f"{path}.{name}"), module))
    return layers


def unet_attention_sites(unet: torch.nn.Module) -> list[AttentionSite]:
    """The AttentionSites of a diffusers UNet: every attn2 layer, named by its module path, in forward order."""
    return [site for site, _ in cross_attention_layers(unet)]


def _unsupported(attn: torch.nn.Module) -> str | None:
    """What of an attn2 layer the routed processor would not reproduce, or None for plain SD cross-attention."""
    head_dim = attn.to_q.out_features // attn.heads
    checks = {
        "a norm on the text context (norm_cross)": getattr(attn, "norm_cross", None) is not None,
        "a residual connection": bool(getattr(attn, "residual_connection", False)),
        "an output rescale factor": getattr(attn, "rescale_output_factor", 1.0) != 1.0,
        "a spatial norm": getattr(attn, "spatial_norm", None) is not None,
        "a group norm": getattr(attn, "group_norm", None) is not None,
        "query/key norms": getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None,
        "added key/value projections": getattr(attn, "added_kv_proj_dim", None) is not None,
        "a scale other than 1/sqrt(head dim)": not math.isclose(float(attn.scale), head_dim**-0.5),
        "an attention processor with weights of its own": isinstance(attn.processor, torch.nn.Module),
    }
    return next((what for what, present in checks.items() if present), None)


@dataclass(frozen=True)
class _Route:
    """How one UNet forward runs its cross-attention: the values' context, and which layers hand maps to whom."""

    values: torch.Tensor | None  # (B, L, D) in the UNet's dtype; None: values from the keys' context
    recorded: frozenset[str]  # the layers that compute softmax(QK^T/sqrt(d)) explicitly in this forward
    recorder: AttentionRecorder | None


class _Routing:
    """How the routed processors run: as the UNet forward running now says, or, in a checkpoint's recompute, as the
    forward being recomputed said (found by the very context tensor it passed down, which the recompute passes again).

    The running forward's route sits in plain attributes of this one object, so compiled code guards on values, not on
    a new object per forward.
    """

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None
        self.recorded: frozenset[str] = frozenset()
        self.recorder: AttentionRecorder | None = None
        self.running = False  # whether the forward running now is routed
        self.by_context = WeakTensorKeyDictionary()  # context tensor of a routed forward -> its _Route

    @contextmanager
    def forward(self, context: torch.Tensor, route: _Route) -> Iterator[None]:
        """While active, the UNet forward that gets context runs by route; a later recompute of it does too."""
        self.by_context[context] = route
        if route.recorded != self.recorded:
            self.recorded = route.recorded  # an equal set stays the same object
        self.values, self.recorder, self.running = route.values, route.recorder, True
        try:
            yield
        finally:
            self.values, self.recorder, self.running = None, None, False

    def find(self, context: torch.Tensor | None) -> _Route | None:
        """The route of the forward that passed context down, or None: that forward runs the original processors."""
        if context is None:
            return None
        if recomputing():
            return self.by_context.get(context)
        if not self.running:
            return None
        return _Route(values=self.values, recorded=self.recorded, recorder=self.recorder)


class _RoutedAttention:
    """An attn2 processor: routed forwards split keys from values and record maps; anything else runs the original.

    Only plain SD cross-attention is routed (_unsupported checks each layer before install): no norms, residual,
    rescale or mask, scale 1/sqrt(head dim), the output through to_out[0] (linear) and to_out[1] (dropout).
    """

    def __init__(self, name: str, routing: _Routing) -> None:
        self.name = name
        self.routing = routing
        self.original: object = None  # the layer's own processor while this one is installed

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """The layer's output: split or recorded when its forward says so, else the original processor's."""
        route = self.routing.find(encoder_hidden_states)
        if route is None or (route.values is None and self.name not in route.recorded):
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        if attention_mask is not None or hidden_states.ndim != 3:
            raise InputError(
                f"attention: layer {self.name} got a mask or image-shaped input, which capture cannot handle"
            )
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states if route.values is None else route.values)
        if self.name in route.recorded:
            out, probs = explicit_attention(query, key, value, attn.heads)
            route.recorder.add(self.name, probs)  # skipped in a checkpoint's recompute
        else:
            out = fast_attention(query, key, value, attn.heads)
        return attn.to_out[1](attn.to_out[0](out))


class DiffusersDenoiser:
    """A diffusers UNet with its VAE and DDPM-style noise schedule."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module, scheduler, family: str) -> None:
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.family = family
        self.prediction_type = str(scheduler.config.prediction_type)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self._schedule: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._time_ids: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
        self._routing = _Routing()
        self._layers: list[tuple[AttentionSite, torch.nn.Module]] | None = None  # the attn2 layers, found once
        self._routed: dict[str, _RoutedAttention] = {}  # made once per layer, so compiled code sees the same objects
        self._holders: set[object] = set()  # who needs the routed processors installed now
        self._recorder: AttentionRecorder | None = None
        self._checkpoint_holder: object | None = None  # set while checkpointing() is active

    @contextmanager
    def checkpointing(self) -> Iterator[None]:
        """While active, the UNet's layers recompute their activations in backward instead of keeping them.

        A routed forward (value split or recording) inside keeps the routed processors installed until the block ends,
        since its backward, after predict has returned, recomputes those layers and must run them the same way.
        """
        holder = object()
        with gradient_checkpointing(diffusers_unet_blocks(self.unet)):
            outer, self._checkpoint_holder = self._checkpoint_holder, holder
            try:
                yield
            finally:
                self._checkpoint_holder = outer
                self._release(holder)

    def attention_sites(self) -> list[AttentionSite]:
        """Every cross-attention (attn2) layer of the UNet, in forward order."""
        return [site for site, _ in self._cross_attention_layers()]

    def _cross_attention_layers(self) -> list[tuple[AttentionSite, torch.nn.Module]]:
        """The UNet's attn2 layers with their sites, walked once (a UNet's structure does not change)."""
        if self._layers is None:
            self._layers = cross_attention_layers(self.unet)
        return self._layers

    @contextmanager
    def recording(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        """While active, predict computes the layers recorder wants explicitly and hands their maps to recorder.add.

        The recorder itself says when it records (its own recording() block); the UNet's processors are restored, the
        very same objects, on exit.
        """
        holder = object()
        self._hold(holder)
        outer, self._recorder = self._recorder, recorder
        try:
            yield recorder
        finally:
            self._recorder = outer
            self._release(holder)

    def _hold(self, holder: object) -> None:
        """Install the routed processors on every attn2 layer if nobody held them yet, and count holder in."""
        if not self._holders:
            self._install()
        self._holders.add(holder)

    def _release(self, holder: object) -> None:
        """Count holder out; the last one out puts the layers' own processors back."""
        if holder not in self._holders:
            return
        self._holders.discard(holder)
        if not self._holders:
            for site, attn in self._cross_attention_layers():
                attn.processor = self._routed[site.name].original
                self._routed[site.name].original = None

    def _install(self) -> None:
        """Put a _RoutedAttention on every attn2 layer, keeping its own processor to run and to restore; all or none."""
        layers = self._cross_attention_layers()
        for site, attn in layers:
            problem = _unsupported(attn)
            if problem is not None:
                raise InputError(
                    f"attention: the UNet's layer {site.name} has {problem}, which the key/value split and attention "
                    "capture do not reproduce; use a standard SD1.x, SD2.x or SDXL UNet"
                )
        for site, attn in layers:
            routed = self._routed.setdefault(site.name, _RoutedAttention(site.name, self._routing))
            routed.original = attn.processor
            attn.processor = routed

    def _route(self, cond: Conditioning, dtype: torch.dtype) -> _Route | None:
        """This forward's route: values from cond.value_context, maps of the layers recorded now; None when neither."""
        recorder = self._recorder
        recorded = frozenset() if recorder is None else frozenset(n for n in recorder.names if recorder.wants(n))
        if cond.value_context is None and not recorded:
            return None
        values = None
        if cond.value_context is not None:
            if cond.value_context.shape != cond.context.shape:
                raise InputError(
                    f"value context: got shape {tuple(cond.value_context.shape)} for a context of "
                    f"{tuple(cond.context.shape)}; encode the value prompts like the key prompts"
                )
            values = cond.value_context.to(dtype)
        return _Route(values=values, recorded=recorded, recorder=recorder)

    def compiled(self, timer: CompileTimer) -> AbstractContextManager[None]:
        """While active, the UNet's forward is torch.compile'd (eager again on any failure)."""
        return compiled_forward(self.unet, timer)

    def memory_modules(self) -> list[torch.nn.Module]:
        """The modules whose weights the run keeps on the device (for the free-memory count)."""
        return [self.unet, self.vae]

    @property
    def device(self) -> torch.device:
        """Where the UNet lives."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet computes in."""
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latent mean and std of images in [-1, 1]."""
        vae_param = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(vae_param.device, vae_param.dtype)).latent_dist
        return (dist.mean.float() * self.scaling_factor, dist.std.float() * self.scaling_factor)

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t), shaped to broadcast over like; the float32 tables go to a device once."""
        if like.device not in self._schedule:
            abar = self.scheduler.alphas_cumprod.to(torch.float32)
            self._schedule[like.device] = (abar.sqrt().to(like.device), (1 - abar).sqrt().to(like.device))
        signal, noise = self._schedule[like.device]
        shape = (-1,) + (1,) * (like.ndim - 1)
        at = timesteps.to(like.device)
        return signal[at].view(shape), noise[at].view(shape)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, as diffusers' DDPMScheduler.add_noise."""
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise for epsilon models; velocity sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 for v-prediction models."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            signal, sigma = self._coefficients(timesteps, latents)
            return signal * noise - sigma * latents
        raise InputError(f"model: prediction type '{self.prediction_type}' is not supported; use an epsilon or v model")

    def _size_ids(self, noisy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's (original size, crop, target size) ids for uncropped images at this latent size, made once."""
        height, width = (int(s) * self.vae_scale for s in noisy.shape[-2:])
        key = (height, width, noisy.device, dtype)
        if key not in self._time_ids:
            self._time_ids[key] = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).to(noisy.device)
        return self._time_ids[key].expand(noisy.shape[0], -1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction in float32; SDXL also gets the pooled vector and size conditioning.

        With cond.value_context, every cross-attention takes its keys from cond.context and its values from it; while
        recording, the recorder's layers hand over their maps. Otherwise the UNet runs with its own processors.
        """
        dtype = self.dtype
        extra = None
        if self.family == "sdxl":
            extra = {"text_embeds": cond.pooled.to(dtype), "time_ids": self._size_ids(noisy, dtype)}
        context = cond.context.to(dtype)
        route = self._route(cond, dtype)
        if route is None:
            return self._unet(noisy.to(dtype), timesteps, context, extra)
        keys = context.view_as(context)  # a tensor of this forward's own, which its layers find the route by
        holder = object()
        self._hold(holder)
        try:
            with self._routing.forward(keys, route):
                out = self._unet(noisy.to(dtype), timesteps, keys, extra)
            if self._checkpoint_holder is not None and torch.is_grad_enabled():
                self._hold(self._checkpoint_holder)  # the backward's recompute needs the routed processors
        finally:
            self._release(holder)
        return out

    def _unet(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, extra: dict | None
    ) -> torch.Tensor:
        """One UNet call, its sample in float32."""
        out = self.unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=extra)
        return out.sample.float()


def place_components(parts: dict[str, object], device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """Freeze every module and put it in dtype on device, text encoders too; SDXL's VAE stays float32 under fp16."""
    for name, part in parts.items():
        if not isinstance(part, torch.nn.Module):
            continue
        part.eval().requires_grad_(False)
        target = dtype
        if name == "vae" and dtype == torch.float16 and getattr(part.config, "force_upcast", False):
            target = torch.float32  # the SDXL VAE overflows in float16
        if next(part.parameters()).dtype != target:
            part.to(dtype=target)
        part.to(device=device)
    return parts
