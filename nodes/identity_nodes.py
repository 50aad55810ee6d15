"""The pack's ComfyUI nodes: thin wrappers that turn socket values into core calls and back."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..core import __version__
from ..core.cross_init import initial_rows
from ..core.errors import InputError
from ..core.formats import load_identity, save_identity
from ..core.heatmap import attention_picture
from ..core.identity import Identity, plain_export
from ..core.images import fit_photos, save_png_atomic
from ..core.memory import MEMORY_MODES
from ..core.models import native_resolution
from ..core.plot import loss_curve_png
from ..core.sefi import check_face_masks
from ..core.stages import DEFAULT_STAGES, check_stage_count
from ..core.trainer import OUT_OF_MEMORY, Trainer, preset_config
from .comfy_backend import comfy_model, encode_training_latents, load_models, trainable
from .conditioning import encode_stage_contexts, encode_with_identities
from .face_nodes import FACE_LOSS
from .stage_patch import staged_model

CATEGORY = "identity_tokens"
IDENTITY = "IDENTITY"  # payload: core.identity.Identity (rows per encoder key, (n, width) float32, plus metadata)
PRESETS = {"Cross-Init": "cross_init", "Cross-Init fast": "cross_init_fast", "Textual Inversion": "textual_inversion"}
INIT_METHODS = {"celebrity names": "celebrity", "init words": "words", "plain word": "word"}
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
IDENTITY_FILE_SUFFIXES = (".safetensors", ".pt", ".bin")
STAGED_SUFFIX = ".sefi"  # per-stage identities are saved as NAME.sefi.safetensors, so stock embedding:NAME never finds one


def first_value(value: object) -> object:
    """The single value of an input that arrives as a list (nodes with INPUT_IS_LIST)."""
    return value[0] if isinstance(value, list) and value else value


def _normal(identity: Identity) -> Identity:
    """The identity with ordinary tensors: rows made under ComfyUI's inference mode cannot be saved for backward."""
    stages = None if identity.stages is None else {k: v.detach().clone() for k, v in identity.stages.items()}
    return Identity({k: v.detach().clone() for k, v in identity.rows.items()}, dict(identity.metadata), stages)


def _image_tensor(picture: object) -> torch.Tensor:
    """A PIL image as a ComfyUI IMAGE batch of one, (1, H, W, 3) floats in [0, 1]."""
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).unsqueeze(0)


def _temp_picture(picture: object, prefix: str) -> dict[str, str]:
    """A PIL image saved in ComfyUI's temp folder, as the {filename, subfolder, type} a node's ui.images lists."""
    import uuid

    import folder_paths

    folder = Path(folder_paths.get_temp_directory())
    name = f"{prefix}_{uuid.uuid4().hex[:12]}.png"  # a fresh name: nothing is overwritten
    save_png_atomic(picture, folder / name)
    return {"filename": name, "subfolder": "", "type": "temp"}


class CrossInitEmbed:
    """An initial identity from the text encoder alone: Cross Initialization or a plain word."""

    DESCRIPTION = (
        "Makes a starting identity from the CLIP alone. 'celebrity names' is Cross Initialization (Pang et al. 2023): "
        "the text encoder's output for the mean celebrity-name embedding, which lets training converge in ~320 steps."
    )
    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = ("The starting identity: connect it to Train Identity Token's init (or Apply Identity as it is).",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Sockets and widgets."""
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP of the checkpoint you will train and generate with."}),
                "method": (list(INIT_METHODS), {"default": "celebrity names", "tooltip": (
                    "celebrity names: Cross Initialization, best for faces. init words: Cross Initialization of your "
                    "own words (e.g. 'woman with red hair'). plain word: Textual Inversion's start, the word's vectors."
                )}),
                "tokens": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip": (
                    "How many vectors the identity has. Each one uses a prompt token; 2 is the Cross-Init default."
                )}),
                "init_text": ("STRING", {"default": "person", "tooltip": (
                    "Words for 'init words' and 'plain word' (ignored for celebrity names)."
                )}),
            }
        }

    def make(self, clip: object, method: str, tokens: int, init_text: str) -> tuple[Identity]:
        """Compute the initial rows for every text encoder of the CLIP."""
        if method not in INIT_METHODS:
            raise InputError(f"method: unknown '{method}'; choose one of {', '.join(INIT_METHODS)}")
        model = comfy_model(None, clip)
        load_models([clip.patcher])
        rows = initial_rows(model, INIT_METHODS[method], int(tokens), init_text)
        meta = {"method": "init", "init": INIT_METHODS[method], "init_text": init_text, "base_family": model.family,
                "token": "<identity>", "created_by": f"identity-tokens {__version__}"}
        return (Identity({k: v.detach().float().cpu() for k, v in rows.items()}, meta),)


class CollectPhotos:
    """Gathers photos of any sizes into one IMAGE list for Train Identity Token, without resizing them."""

    DESCRIPTION = (
        "Collects up to five photos (each a Load Image, of any size) into one list for Train Identity Token, which "
        "resizes and crops each to the training resolution. Unlike Batch Images, nothing is stretched. Chain another "
        "Collect Photos into photo_5 for more."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("photos",)
    OUTPUT_TOOLTIPS = ("The photos as a list, each at its own size: connect to Train Identity Token's images.",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "collect"
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    SLOTS = 5

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """photo_1 required, photo_2..photo_5 optional."""
        tip = "A photo of the subject (any size), e.g. from Load Image; a batch counts as its photos."
        more = {f"photo_{n}": ("IMAGE", {"tooltip": f"Optional: another photo. {tip}"}) for n in range(2, cls.SLOTS + 1)}
        return {"required": {"photo_1": ("IMAGE", {"tooltip": tip})}, "optional": more}

    def collect(self, **photos: list) -> tuple[list[torch.Tensor]]:
        """The connected photos in slot order, each IMAGE batch kept at its own size."""
        order = sorted(photos, key=lambda name: int(name.rsplit("_", 1)[1]))
        return ([batch for name in order for batch in photos[name] or [] if batch is not None],)


class TrainIdentityToken:
    """Learns an identity from photos with the graph's MODEL, CLIP and VAE; only the identity rows change."""

    DESCRIPTION = (
        "Trains an identity (a few token vectors) from photos of one person or object with the checkpoint already "
        "loaded. The model is not changed. Cancel stops it within a step and returns nothing."
    )
    RETURN_TYPES = (IDENTITY, "IMAGE", "IMAGE")
    RETURN_NAMES = ("identity", "loss_curve", "attention")
    OUTPUT_TOOLTIPS = (
        "The learned identity: save it, or use it in Apply Identity.",
        "The loss per step.",
        "Where the identity token looks in each training photo at the start and at the end of training (bright = "
        "more attention); with a face mask, the share inside it. On the face is good; all over the photo means it "
        "learns the background too (try Face Attention Loss).",
    )
    FUNCTION = "train"
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Sockets and widgets; zero (or -1) means 'the preset's value'."""
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL of an SD1.x, SD2.x or SDXL checkpoint (from Load Checkpoint)."}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint."}),
                "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint; it encodes the photos once."}),
                "images": ("IMAGE", {"tooltip": (
                    "3-5 photos of the subject, of any sizes (connect Collect Photos, or one Load Image); each is "
                    "resized and centre-cropped to the training resolution."
                )}),
                "preset": (list(PRESETS), {"default": "Cross-Init", "presets": preset_widget_values(), "tooltip": (
                    "Cross-Init: 320 steps, 2 tokens, lr 0.005, batch 8. Cross-Init fast: the same in 25 steps. "
                    "Textual Inversion: 5000 steps, 1 token from 'person', lr 1e-4, batch 16. Choosing one fills "
                    "steps, learning_rate, batch_size and reg_weight with its values; change them after if you like."
                )}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Optimisation steps; choosing a preset fills in its value (0 also means the preset's)."}),
                "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001, "tooltip": (
                    "AdamW learning rate of the identity rows; choosing a preset fills in its value (0 also means the "
                    "preset's)."
                )}),
                "batch_size": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": (
                    "Images per step (with repeats and flips); choosing a preset fills in its value (0 also means the "
                    "preset's). Lower it if you run out of memory."
                )}),
                "reg_weight": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.00001, "tooltip": (
                    "Cross-Init's pull towards the initial vectors; choosing a preset fills in its value (-1 also means "
                    "the preset's); 0 turns it off."
                )}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": (
                    "Seed of every random draw in training: the same seed and inputs give the same identity."
                )}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8, "tooltip": (
                    "Photos are resized so the shorter side is this, then centre-cropped square. 0 uses the model's "
                    "native size: 512 for SD1.x and SD2.x-base, 768 for SD2.x-768 (v-prediction), 1024 for SDXL. "
                    "Lower it (e.g. 512 for SDXL) to save memory and time."
                )}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": (
                    "Optional: where the subject is (e.g. the face); the loss counts only there. One mask for all photos, "
                    "or one per photo in order, each the size of its photo (it is cropped with it)."
                )}),
                "init": (IDENTITY, {"tooltip": "Optional: start from this identity (e.g. from Cross-Init Embed) instead of the preset's."}),
                "memory": (list(MEMORY_MODES), {"default": "auto", "tooltip": (
                    "auto: estimate the peak on the GPU and turn on gradient checkpointing, then micro-batches, only "
                    "when needed (logged in the console). default: neither. checkpointing: always (about a third "
                    "slower, a fraction of the memory). low: checkpointing + one image per pass, the least memory. "
                    "The training step is the same in every mode."
                )}),
                "compile": ("BOOLEAN", {"default": False, "tooltip": (
                    "torch.compile the UNet: faster steps on a GPU after a one-time compile of tens of seconds (logged "
                    "apart). Falls back to the normal UNet with a warning if compiling fails. Off by default."
                )}),
                "face_loss": (FACE_LOSS, {"tooltip": (
                    "Optional: a Face Attention Loss, so the identity token attends to the face, not the background."
                )}),
                "per_stage": ("BOOLEAN", {"default": False, "tooltip": (
                    "SeFi-IDE-style per-stage tokens: one key and one value token per denoising stage. Sample with "
                    "Apply Identity's MODEL output; Export Plain Identity makes a (lossy) file for other tools."
                )}),
                "stages": ("INT", {"default": DEFAULT_STAGES, "min": 1, "max": 50, "tooltip": (
                    f"per_stage: how many stages split the timesteps (stage = floor(t*S/1000)); {DEFAULT_STAGES} is "
                    "SeFi-IDE's. It must not exceed the steps."
                )}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model: list, clip: list, vae: list, images: list, preset: list, steps: list,
              learning_rate: list, batch_size: list, reg_weight: list, seed: list, resolution: list,
              mask: list | None = None, init: list | None = None, memory: list | None = None,
              compile: list | None = None, face_loss: list | None = None, per_stage: list | None = None,
              stages: list | None = None, unique_id: list | None = None) -> tuple:
        """Run the core trainer on the graph's models; a Cancel raises ComfyUI's interrupt and returns nothing."""
        import comfy.model_management as mm

        name = first_value(preset)
        if name not in PRESETS:
            raise InputError(f"preset: unknown '{name}'; choose one of {', '.join(PRESETS)}")
        core_model = comfy_model(first_value(model), first_value(clip), first_value(vae))  # refuses other families before any copy
        size = int(first_value(resolution)) or native_resolution(core_model.family, core_model.denoiser.prediction_type)
        photos = [batch.movedim(-1, 1).float() * 2 - 1 for batch in images or []]
        pixels, masks = fit_photos(photos, size, mask)
        face = first_value(face_loss) if face_loss else None
        face_masks = masks
        if face is not None and face.masks:
            singles = [m for batch in face.masks for m in batch.reshape(-1, *batch.shape[-2:])]
            for number, single in enumerate(singles, start=1):
                if not float(single.float().max()) > 0:
                    raise InputError(
                        f"face_loss: Face Attention Loss's mask {number} is empty (all zero), so it shows no face; "
                        "connect Face Crop's masks or draw the face with the mask editor"
                    )
            try:
                face_masks = fit_photos(photos, size, list(face.masks))[1]
            except InputError as error:
                raise InputError(f"face_loss: Face Attention Loss's {error}") from None
        if face is not None and face.setting.mode == "mask":  # before the photos are encoded: no wasted work
            check_face_masks(face_masks, pixels.shape[0])
        reg = float(first_value(reg_weight))
        config = preset_config(
            PRESETS[name], steps=int(first_value(steps)) or None, learning_rate=float(first_value(learning_rate)) or None,
            batch_size=int(first_value(batch_size)) or None, reg_weight=None if reg < 0 else reg,
            seed=int(first_value(seed)), resolution=size, memory=first_value(memory) if memory else None,
            compile=bool(first_value(compile)) if compile else None, face_loss=None if face is None else face.setting,
            stages=int(first_value(stages)) if per_stage and bool(first_value(per_stage)) else None,
        )
        check_stage_count(config.stages, config.steps)  # before the photos are encoded
        start = _normal(first_value(init)) if init and first_value(init) is not None else None
        progress = _Progress(config.steps, first_value(unique_id))
        try:
            latents = encode_training_latents(core_model, pixels, config.flip_p > 0)  # VAE first: no UNet eviction
            with trainable(first_value(model), first_value(clip)):
                trainer = Trainer(core_model, pixels, config, init=start, masks=masks, latents=latents, face_masks=face_masks)
                progress.begin()
                result = trainer.run(on_step=progress, should_stop=mm.processing_interrupted)
        except mm.InterruptProcessingException:  # the server's progress hook raises it on Cancel
            progress.ended(*_ending("cancelled"))
            raise
        except Exception as error:
            progress.ended("stopped", f"{type(error).__name__}: {error}")
            raise
        progress.ended(*_ending(result.stopped))
        if result.stopped == "cancelled":
            raise mm.InterruptProcessingException()
        if result.stopped.startswith(OUT_OF_MEMORY):
            raise InputError(
                f"batch_size: training stopped, {result.stopped}; lower batch_size (e.g. {max(1, config.batch_size // 2)}) "
                "or resolution, or close other programs that use the GPU"
            )
        if result.stopped:
            raise RuntimeError(f"training stopped: {result.stopped}; lower learning_rate or check the photos and model")
        curve = loss_curve_png(result.losses, title=f"identity loss ({name}, {len(result.losses)} steps)")
        attention = attention_picture(pixels, result.attention)
        shown = {"images": [_temp_picture(attention, "identity_tokens_attention")]}  # drawn on the node when done
        return {"ui": shown, "result": (result.identity, _image_tensor(curve), _image_tensor(attention))}


def preset_widget_values() -> dict[str, dict[str, float]]:
    """Each preset's steps, learning_rate, batch_size and reg_weight: the front-end fills the widgets with them."""
    values = {}
    for label, name in PRESETS.items():
        config = preset_config(name)
        values[label] = {"steps": config.steps, "learning_rate": config.learning_rate,
                         "batch_size": config.batch_size, "reg_weight": config.reg_weight}
    return values


def _ending(stopped: str) -> tuple[str, str]:
    """(state, reason) for the front-end from a TrainResult.stopped: finished, cancelled or stopped."""
    if not stopped:
        return "finished", ""
    if stopped == "cancelled":
        return "cancelled", "Cancel pressed"
    return "stopped", stopped


class _Progress:
    """Step callback: ComfyUI's progress bar plus websocket events for the pack's live view (progress with the
    loss and elapsed time; a status when training starts and ends)."""

    def __init__(self, total: int, node_id: str | None) -> None:
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.node_id = node_id
        self.total = total
        self.server = _prompt_server()
        self.step = 0
        self.started = time.monotonic()
        self._send("identity_tokens.status", {"state": "running", "step": 0, "total": total})

    def begin(self) -> None:
        """Training proper starts now (the photos are encoded): elapsed time and time left count from here."""
        self.started = time.monotonic()

    def _send(self, event: str, detail: dict) -> None:
        """One event to the client that queued the prompt (nothing outside a server)."""
        if self.server is not None:
            self.server.send_sync(event, {"node": self.node_id, **detail}, getattr(self.server, "client_id", None))

    def __call__(self, step: int, total: int, loss: float) -> None:
        """Report one finished step."""
        self.bar.update_absolute(step, total)
        self.step = step
        elapsed = round(time.monotonic() - self.started, 2)
        self._send("identity_tokens.progress", {"step": step, "total": total, "loss": loss, "elapsed": elapsed})

    def ended(self, state: str, reason: str) -> None:
        """Report how training ended: finished, cancelled or stopped (with the reason)."""
        elapsed = round(time.monotonic() - self.started, 2)
        self._send("identity_tokens.status", {"state": state, "reason": reason, "step": self.step,
                                              "total": self.total, "elapsed": elapsed})


def _prompt_server() -> object | None:
    """ComfyUI's running PromptServer, or None outside a server (tests, scripts): the progress bar is then enough."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


class ApplyIdentity:
    """A text prompt with up to three identities, each at its trigger word, as CONDITIONING for any sampler."""

    DESCRIPTION = (
        "Encodes a prompt like CLIP Text Encode, with each identity's vectors where its trigger word is. "
        "Prompt weights such as (alice:1.2) work; the result equals stock 'embedding:NAME' for a saved identity. "
        "A per-stage identity also needs the MODEL: sample with the MODEL output, which swaps its key and value "
        "tokens by denoising stage."
    )
    RETURN_TYPES = ("CONDITIONING", "MODEL")
    OUTPUT_TOOLTIPS = (
        "The prompt for a sampler's positive input.",
        "The MODEL to sample with: patched for per-stage identities (keys and values by stage, positive prompt only); "
        "the MODEL you connected, unchanged, when no identity is per-stage.",
    )
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Sockets and widgets."""
        trigger_tip = "The word in the prompt that stands for this identity; empty uses the identity's own name (its file name when loaded)."
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP of the checkpoint you sample with (same family as the identity)."}),
                "text": ("STRING", {"multiline": True, "default": "a photo of <identity>", "tooltip": (
                    "The prompt; write each trigger word where its subject should appear."
                )}),
                "identity": (IDENTITY, {"tooltip": "The identity to place at the trigger word."}),
                "trigger": ("STRING", {"default": "", "tooltip": trigger_tip}),
            },
            "optional": {
                "identity_2": (IDENTITY, {"tooltip": "A second identity for the same prompt."}),
                "trigger_2": ("STRING", {"default": "", "tooltip": trigger_tip}),
                "identity_3": (IDENTITY, {"tooltip": "A third identity for the same prompt."}),
                "trigger_3": ("STRING", {"default": "", "tooltip": trigger_tip}),
                "model": ("MODEL", {"tooltip": (
                    "The MODEL you sample with. Needed for per-stage identities (trained with per_stage on); then "
                    "sample with this node's MODEL output."
                )}),
            },
        }

    def apply(self, clip: object, text: str, identity: Identity, trigger: str, identity_2: Identity | None = None,
              trigger_2: str = "", identity_3: Identity | None = None, trigger_3: str = "",
              model: object | None = None) -> tuple[list, object]:
        """Encode the prompt with the identities spliced in at their trigger words; patch the MODEL for stages."""
        pairs = []
        for ident, word, label in ((identity, trigger, "identity"), (identity_2, trigger_2, "identity_2"),
                                   (identity_3, trigger_3, "identity_3")):
            if ident is None:
                if word.strip():
                    raise InputError(f"{label}: its trigger '{word.strip()}' is set but no {label} is connected")
                continue
            pairs.append((ident, word.strip() or ident.metadata.get("token", "<identity>"), label))
        conditioning = encode_with_identities(clip, text, pairs)
        staged = [(ident, label) for ident, _, label in pairs if ident.is_staged]
        if not staged:
            return (conditioning, model)
        if model is None:
            raise InputError(
                f"{staged[0][1]}: it is a per-stage identity, whose key and value tokens work only through Apply "
                "Identity's MODEL patch; connect your MODEL to Apply Identity's model input and sample with its MODEL "
                "output (or make a plain, lossy identity with Export Plain Identity)"
            )
        schedule = staged[0][0].schedule
        for ident, label in staged[1:]:
            if ident.schedule != schedule:
                raise InputError(
                    f"{label}: its stages ({ident.schedule.text()}) differ from {staged[0][1]}'s ({schedule.text()}); "
                    "one prompt can only follow one stage schedule, so use identities trained with the same stages"
                )
        contexts = encode_stage_contexts(clip, text, pairs, [ident.stages for ident, _, _ in pairs])
        return (conditioning, staged_model(model, conditioning[0][0], contexts, schedule))


def check_save_name(name: str) -> str:
    """A plain file name for the embeddings folder: letters, digits, '-', '_' and '.', no path parts."""
    stem = name.strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not NAME_RULE.fullmatch(stem) or ".." in stem or stem.endswith("."):
        raise InputError(
            f"name: '{name}' is not a usable file name; use letters, digits, '-', '_' or '.' (no folders, no '..'), "
            "e.g. my-identity"
        )
    return stem


class SaveIdentity:
    """Writes an identity into models/embeddings as a standard file that stock ComfyUI loads as embedding:NAME."""

    DESCRIPTION = (
        "Saves the identity as models/embeddings/NAME.safetensors. Stock CLIP Text Encode then uses it with "
        "'embedding:NAME', and A1111 and diffusers load the same file. Never overwrites unless asked."
    )
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Sockets and widgets."""
        return {
            "required": {
                "identity": (IDENTITY, {"tooltip": "The identity to save."}),
                "name": ("STRING", {"default": "my-identity", "tooltip": (
                    "File name without extension; also the word for 'embedding:NAME' and Load Identity."
                )}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
            }
        }

    def save(self, identity: Identity, name: str, overwrite: bool) -> dict:
        """Write the file atomically; an existing name without overwrite is an error and the file is kept."""
        import folder_paths

        stem = check_save_name(name).removesuffix(STAGED_SUFFIX)
        folder = Path(folder_paths.get_folder_paths("embeddings")[0])
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}{STAGED_SUFFIX if identity.is_staged else ''}.safetensors"
        if path.exists() and not overwrite:
            raise InputError(
                f"name: {path.name} already exists in {folder}; choose another name or turn on overwrite"
            )
        save_identity(identity, path, token=stem, overwrite=bool(overwrite))
        if identity.is_staged:
            note = (f"{path} (per-stage: use it through Load Identity and Apply Identity's MODEL; Export Plain "
                    "Identity makes an embedding:NAME file, lossy)")
            return {"ui": {"text": [note]}}
        return {"ui": {"text": [str(path)]}}


class ExportPlainIdentity:
    """A plain identity (one vector per token) from a per-stage one, for stock loaders: lossy, and labelled so."""

    DESCRIPTION = (
        "Turns a per-stage (SeFi-IDE-style) identity into a plain one that stock CLIP Text Encode (embedding:NAME), "
        "A1111 and diffusers load. Lossy: only the middle stage's value token is kept, with no key/value split and no "
        "stages; the file's metadata says lossy = true."
    )
    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = ("A plain identity (one set of rows) that Save Identity writes for embedding:NAME, A1111 and diffusers.",)
    FUNCTION = "export"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """One socket."""
        return {"required": {"identity": (IDENTITY, {"tooltip": "A per-stage identity (trained with per_stage on)."})}}

    def export(self, identity: Identity) -> tuple[Identity]:
        """The middle stage's value rows as a plain identity."""
        return (plain_export(identity),)


def model_file(folder: str, name: str, input_name: str) -> Path:
    """The path of a file picked from a models folder's dropdown; an InputError naming the input when it is gone."""
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise InputError(f"{input_name}: '{name}' is not in models/{folder}; pick a file from the list (R refreshes it)")
    return Path(path)


def modified_time(folder: str, name: str) -> float:
    """IS_CHANGED of a file picked from a models folder: its modification time (0 when it is gone)."""
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    return os.path.getmtime(path) if path else 0.0


class LoadIdentity:
    """Reads an identity from models/embeddings: files of this pack, A1111, diffusers or Cross-Init."""

    DESCRIPTION = "Loads an identity (or any textual-inversion embedding) from models/embeddings."
    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = ("The identity from the file: connect to Apply Identity, or to Train Identity Token's init to go on training.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """A dropdown of the embeddings folder."""
        import folder_paths

        names = [n for n in folder_paths.get_filename_list("embeddings") if n.lower().endswith(IDENTITY_FILE_SUFFIXES)]
        return {"required": {"name": (sorted(names), {"tooltip": (
            "A file in models/embeddings; its trigger word is the file name unless you set one in Apply Identity. "
            "Press R in ComfyUI to refresh the list after saving."
        )})}}

    @classmethod
    def IS_CHANGED(cls, name: str) -> float:
        """Reload when the file changes."""
        return modified_time("embeddings", name)

    def load(self, name: str) -> tuple[Identity]:
        """Read the file safely (no pickled code) and name the identity after it."""
        identity = load_identity(model_file("embeddings", name, "name"))
        stem = Path(name).name.rsplit(".", 1)[0]
        return (Identity(identity.rows, {**identity.metadata, "token": stem.removesuffix(STAGED_SUFFIX)}, identity.stages),)


NODE_CLASSES = {
    "IdentityTokens_CrossInitEmbed": (CrossInitEmbed, "Cross-Init Embed"),
    "IdentityTokens_CollectPhotos": (CollectPhotos, "Collect Photos"),
    "IdentityTokens_TrainIdentityToken": (TrainIdentityToken, "Train Identity Token"),
    "IdentityTokens_ApplyIdentity": (ApplyIdentity, "Apply Identity"),
    "IdentityTokens_SaveIdentity": (SaveIdentity, "Save Identity"),
    "IdentityTokens_LoadIdentity": (LoadIdentity, "Load Identity"),
    "IdentityTokens_ExportPlainIdentity": (ExportPlainIdentity, "Export Plain Identity (lossy)"),
}
