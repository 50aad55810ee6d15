"""Encoder nodes: Load Identity Encoder (models/identity_encoders) and Encoder Customize (photos -> IDENTITY in one
forward pass of a trained identity encoder, no fine-tuning)."""

from __future__ import annotations

import os

import torch

from ..core import __version__
from ..core.encoders.files import EncoderFileError, check_text_widths, load_encoder
from ..core.encoders.mapper import IdentityEncoder, encode_photos
from ..core.errors import InputError
from ..core.identity import Identity
from ..core.prompts import check_trigger
from .comfy_backend import clip_widths
from .comfy_vision import vision_tower
from .face_nodes import image_arrays
from .identity_nodes import CATEGORY, IDENTITY, first_value, model_file, modified_time

IDENTITY_ENCODER = "IDENTITY_ENCODER"  # payload: core.encoders.mapper.IdentityEncoder, in eval mode on the CPU
FOLDER = "identity_encoders"  # models/identity_encoders: encoders written by `python -m core train-encoder`
SUFFIXES = {".safetensors"}  # encoders are never pickles; other files are not listed


def register_folder() -> None:
    """models/identity_encoders as a folder_paths folder listing .safetensors only (kept: paths a user's
    extra_model_paths.yaml added before the pack loaded)."""
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI (the installed package, the command line): nothing to register
        return
    default = os.path.join(folder_paths.models_dir, FOLDER)
    known = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0]
    folder_paths.folder_names_and_paths[FOLDER] = ([default, *[p for p in known if p != default]], set(SUFFIXES))


register_folder()


class EncoderLoader:
    """Loads an identity encoder (a trained mapper and the vision tower it reads) from models/identity_encoders."""

    DESCRIPTION = (
        "Loads an identity encoder from models/identity_encoders (.safetensors written by `python -m core "
        "train-encoder`). The encoder turns photos into an identity in one pass (Encoder Customize); it was trained "
        "for one vision tower and one checkpoint family, both named in its file."
    )
    RETURN_TYPES = (IDENTITY_ENCODER,)
    RETURN_NAMES = ("encoder",)
    OUTPUT_TOOLTIPS = ("The encoder: connect it to Encoder Customize.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """A dropdown of models/identity_encoders."""
        import folder_paths

        return {"required": {"encoder_name": (folder_paths.get_filename_list(FOLDER), {"tooltip": (
            "An encoder file in models/identity_encoders. None ships for real checkpoints: train one with "
            "`python -m core train-encoder` and put it there (R in ComfyUI refreshes the list)."
        )})}}

    @classmethod
    def IS_CHANGED(cls, encoder_name: str) -> float:
        """Reload when the file changes."""
        return modified_time(FOLDER, encoder_name)

    def load(self, encoder_name: str) -> tuple[IdentityEncoder]:
        """Read the file safely (safetensors; a pickle is refused, never run); file problems name this input."""
        path = model_file(FOLDER, encoder_name, "encoder_name")
        try:
            return (load_encoder(path),)
        except EncoderFileError as error:
            raise InputError(f"encoder_name: {error}") from None


def _pictures(images: list) -> list[torch.Tensor]:
    """Every photo of the IMAGE batches as a (1, 3, H, W) picture in [0, 1]."""
    photos = image_arrays(images, "images", "Load Image or Collect Photos")
    return [torch.from_numpy(photo).permute(2, 0, 1)[None] for photo in photos]


class EncoderCustomize:
    """An identity from photos in one forward pass of an identity encoder: no training."""

    DESCRIPTION = (
        "Makes an identity from one or more photos of one subject with an identity encoder, in one forward pass (no "
        "training, seconds). The encoder reads the photos with the vision tower it was trained for (Load CLIP Vision); "
        "the identity works like a trained one: Apply Identity, Save Identity, or Train Identity Token's init to "
        "refine it."
    )
    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = (
        "The identity (the mean over the photos): connect it to Apply Identity, Save Identity, or Train Identity "
        "Token's init.",
    )
    FUNCTION = "customize"
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True  # Collect Photos' list (photos of different sizes) arrives whole: one identity, not one each

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Sockets and widgets."""
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": (
                    "Photos of one subject: a Load Image, or Collect Photos for several of different sizes; each is "
                    "resized and centre-cropped to the vision tower's input size."
                )}),
                "encoder": (IDENTITY_ENCODER, {"tooltip": "The identity encoder, from Load Identity Encoder."}),
                "token": ("STRING", {"default": "<identity>", "tooltip": (
                    "The identity's trigger word: Apply Identity uses it when its own trigger is empty. One word, "
                    "without spaces."
                )}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {"tooltip": (
                    "The vision tower the encoder was trained for, from Load CLIP Vision (e.g. CLIP ViT-L/14 in "
                    "models/clip_vision). Leave it empty only for encoders of the pack's lab tower ('lab-vit')."
                )}),
                "clip": ("CLIP", {"tooltip": (
                    "Optional: the CLIP you will sample with; checks now that the encoder was trained for its "
                    "family (SD1.x, SD2.x or SDXL)."
                )}),
            },
        }

    def customize(self, images: list, encoder: list, token: list, clip_vision: list | None = None,
                  clip: list | None = None) -> tuple[Identity]:
        """Check the encoder against the CLIP and the tower, then encode the photos."""
        model = first_value(encoder)
        if not isinstance(model, IdentityEncoder):
            raise InputError("encoder: connect Load Identity Encoder's output")
        trigger = check_trigger(str(first_value(token)).strip(), "token")
        if clip and first_value(clip) is not None:
            check_text_widths(model.spec, clip_widths(first_value(clip)), "clip")
        tower = vision_tower(model.spec, first_value(clip_vision) if clip_vision else None)
        identity = encode_photos(model, tower, _pictures(images), trigger)
        return (Identity(identity.rows, {**identity.metadata, "created_by": f"identity-tokens {__version__}"}),)


NODE_CLASSES = {
    "IdentityTokens_EncoderLoader": (EncoderLoader, "Load Identity Encoder"),
    "IdentityTokens_EncoderCustomize": (EncoderCustomize, "Encoder Customize"),
}
