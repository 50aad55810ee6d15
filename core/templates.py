"""Training prompt templates: the project's own lists, in the style of the reference ImageNet-caption lists."""

from __future__ import annotations

# "{}" marks where the identity's tokens go. Object-style captions, as Textual Inversion trains with.
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a photo of the {}",
    "a close-up photo of a {}",
    "a close-up photo of the {}",
    "a cropped photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of a {}",
    "a bright photo of the {}",
    "a dark photo of a {}",
    "a dark photo of the {}",
    "a good photo of a {}",
    "a good photo of the {}",
    "a clean photo of a {}",
    "a nice photo of the {}",
    "a small photo of a {}",
    "a large photo of the {}",
    "a blurry photo of a {}",
    "a sharp photo of the {}",
    "a rendering of a {}",
    "a rendering of the {}",
    "an illustration of a {}",
    "an illustration of the {}",
    "a depiction of a {}",
    "a depiction of the {}",
    "a picture of a {}",
    "a snapshot of the {}",
    "a portrait of a {}",
    "a portrait of the {}",
    "an image of a {}",
    "an image of the {}",
)

# Cross Initialization puts the tokens inside a face phrase with the class word after them.
FACE_PHRASE = "face of {} person"


def fill(template: str, slot_text: str) -> str:
    """The template with its '{}' replaced by slot_text."""
    return template.replace("{}", slot_text, 1)


TEMPLATE_KINDS = ("object", "face", "lab")


def training_prompts(kind: str) -> tuple[str, ...]:
    """Prompt templates for a training style: 'object' (Textual Inversion), 'face' (Cross Initialization) or 'lab'
    (the lab world's own caption openings with the identity as the subject: "a photo of {}", ...)."""
    if kind == "object":
        return OBJECT_TEMPLATES
    if kind == "face":
        return tuple(fill(t, FACE_PHRASE) for t in OBJECT_TEMPLATES)
    if kind == "lab":
        from .lab.world import PREFIXES

        return tuple(f"{prefix} {{}}" for prefix in PREFIXES)
    raise ValueError(f"templates: unknown kind '{kind}'; use {', '.join(TEMPLATE_KINDS)}")
