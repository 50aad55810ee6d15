"""Training images: find them, decode any common format to RGB, and stack them as a tensor."""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import struct
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
# Picture files a folder may hold that are not read (animations, formats Pillow lacks): named when skipped.
SKIPPED_PICTURE_EXTENSIONS = frozenset({".gif", ".heic", ".heif", ".avif", ".jxl", ".svg", ".apng", ".mp4", ".mov"})
MIN_SIDE = 64
SAMPLE_PHOTO_NAME = "astronaut.png"

_WHITE = (255, 255, 255)
_TRANSPARENT_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def is_image_path(path: Path) -> bool:
    """Whether the file name has one of the image extensions the loader takes (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _folder_images(folder: Path) -> list[Path]:
    """The visible image files directly inside a folder, sorted by name; skipped picture files are named in a note."""
    visible = sorted(
        (entry for entry in folder.iterdir() if not entry.name.startswith(".") and entry.is_file()),
        key=lambda entry: (entry.name.casefold(), entry.name),
    )
    skipped = [entry.name for entry in visible if entry.suffix.lower() in SKIPPED_PICTURE_EXTENSIONS]
    if skipped:
        log.warning(
            "images: skipped %s in %s (animations and these formats are not read); convert to PNG or JPEG to train "
            "on them", ", ".join(skipped), folder,
        )
    return [entry for entry in visible if is_image_path(entry)]


def list_image_paths(sources: Sequence[Path]) -> list[Path]:
    """Expand folders and files into the list of image paths to train on."""
    if isinstance(sources, (str, Path)):
        sources = [Path(sources)]
    if not sources:
        raise InputError(
            "images: no folder or image paths were given; pass a folder with .png/.jpg files or image paths"
        )
    paths: list[Path] = []
    seen: set[Path] = set()
    for source in (Path(s).expanduser() for s in sources):
        if not source.exists():
            raise InputError(f"images: {source} does not exist; check the folder or file path")
        found = _folder_images(source) if source.is_dir() else [source]
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(path)
    if not paths:
        names = ", ".join(str(Path(s)) for s in sources)
        raise InputError(f"images: found no images in {names}; pass a folder with .png/.jpg files or image paths")
    return paths


def _over_white(image: Image.Image) -> Image.Image:
    """Composite an image with an alpha channel over a white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray_array_to_rgb(values: np.ndarray) -> Image.Image:
    """Turn a 2-D array already scaled to 0..255 into an RGB image."""
    gray = np.clip(np.rint(np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 16-bit grayscale image (0..65535) to 8 bits."""
    values = np.asarray(image).astype(np.float64)
    return _gray_array_to_rgb(values / 257.0)


def _int32_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 32-bit integer image to 8 bits: 8-bit and 16-bit ranges kept, anything wider stretched."""
    values = np.asarray(image).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 255:
        return _gray_array_to_rgb(values)
    if low >= 0 and high <= 65535:
        return _gray_array_to_rgb(values / 257.0)
    low = min(low, 0.0)
    return _gray_array_to_rgb((values - low) * (255.0 / max(high - low, 1.0)))


def _float_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 32-bit float image to 8 bits: 0..1 and 0..255 ranges kept, anything else stretched."""
    values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return _gray_array_to_rgb(np.zeros_like(values))
    low, high = float(finite.min()), float(finite.max())
    if low >= 0 and high <= 1.0:
        return _gray_array_to_rgb(values * 255.0)
    if low >= 0 and high <= 255.0:
        return _gray_array_to_rgb(values)
    return _gray_array_to_rgb((values - low) * (255.0 / max(high - low, 1e-12)))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB (transparency becomes white)."""
    mode = image.mode
    if mode in _TRANSPARENT_MODES or (mode in {"P", "L", "RGB"} and "transparency" in image.info):
        return _over_white(image)
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if mode == "I":
        return _int32_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)
    return image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, KeyError, TypeError, IndexError, SyntaxError, struct.error):
        return image.copy()  # malformed EXIF must not make a good photo unreadable


def load_image(path: Path) -> Image.Image:
    """Read one image file fully, upright (EXIF) and as 8-bit RGB; bad or tiny files raise InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"images: {path} does not exist; check the file path")
    unreadable = f"images: cannot read {path} (truncated or not an image); re-export it as PNG or JPEG"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                _refuse_blank_alpha(opened, path)
                image = to_rgb(_upright(opened))
                image.load()
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"images: {path} has too many pixels to load safely; resize it to a few thousand px a side"
        ) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib/struct errors on bad data
        raise InputError(unreadable) from exc
    width, height = image.size
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        log.warning(
            "images: %s is very large (%dx%d px, %.0f megapixels); it is loaded anyway and resized for training",
            path, width, height, width * height / 1e6,
        )
    if min(width, height) < MIN_SIDE:
        raise InputError(
            f"images: {path} is {width}x{height} px; the shorter side must be at least {MIN_SIDE} px, "
            "use a larger photo"
        )
    return image


def _refuse_blank_alpha(image: Image.Image, path: Path) -> None:
    """A fully transparent picture would train on a blank white square: refuse it and say why."""
    has_alpha = image.mode in _TRANSPARENT_MODES or "transparency" in image.info
    if not has_alpha:
        return
    alpha = image.convert("RGBA").getchannel("A")
    if alpha.getextrema()[1] == 0:
        raise InputError(
            f"images: {path} is fully transparent (every pixel has alpha 0), so it would train on a blank white "
            "square; export it again with its alpha channel kept, or remove it"
        )


def check_resolution(resolution: int) -> int:
    """Return the training resolution if it is a positive multiple of 8, else raise InputError."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise InputError(f"resolution: {resolution!r} is not a whole number; use a multiple of 8 such as 512 or 1024")
    if resolution <= 0 or resolution % 8 != 0:
        raise InputError(f"resolution: {resolution} is not a positive multiple of 8; use e.g. 512 or 1024")
    return int(resolution)


def resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is `resolution` (bicubic), then center-crop to a square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_width = max(resolution, round(width * scale))
    new_height = max(resolution, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left = (new_width - resolution) // 2
    top = (new_height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def images_to_tensor(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """Stack images as a float32 (N, 3, R, R) tensor in [-1, 1], each resized and center-cropped."""
    resolution = check_resolution(resolution)
    if len(images) == 0:
        raise InputError("images: the image list is empty; pass at least one photo")
    arrays = [np.asarray(resize_and_crop(to_rgb(image), resolution), dtype=np.uint8) for image in images]
    batch = np.stack(arrays).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def join_batches(batches: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    """Concatenate image or mask batches of one size; different sizes raise InputError naming both."""
    if len(batches) == 0:
        raise InputError(f"{what}: got no {what}; connect at least one")
    first = batches[0]
    for batch in batches[1:]:
        if tuple(batch.shape[1:]) != tuple(first.shape[1:]):
            raise InputError(
                f"{what}: got {what} of different sizes ({_size(first)} and {_size(batch)}) in one batch; "
                "resize them to one size first (e.g. with ImageScale / 'Upscale Image')"
            )
    return torch.cat(list(batches)) if len(batches) > 1 else first


def _size(batch: torch.Tensor) -> str:
    """WIDTHxHEIGHT of a (N, H, W[, C]) batch."""
    return f"{batch.shape[2]}x{batch.shape[1]}"


def fit_tensor(batch: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize an (N, C, H, W) batch so the shorter side is `resolution`, then center-crop it square (0 keeps it)."""
    if resolution == 0:
        return batch
    resolution = check_resolution(resolution)
    height, width = batch.shape[-2:]
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    if size != (height, width):
        batch = torch.nn.functional.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return batch[..., top : top + resolution, left : left + resolution]


def check_masks(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Validate (M, H, W) masks against (N, 3, H, W) images: one mask or one per image, same size, not empty."""
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim != 3:
        raise InputError(f"mask: expected a (count, height, width) mask, got shape {tuple(masks.shape)}")
    if tuple(masks.shape[-2:]) != tuple(images.shape[-2:]):
        raise InputError(
            f"mask: it is {masks.shape[-1]}x{masks.shape[-2]} but the images are {images.shape[-1]}x{images.shape[-2]}; "
            "make the mask from the same images (same size) or resize it to match"
        )
    if masks.shape[0] not in (1, images.shape[0]):
        raise InputError(
            f"mask: got {masks.shape[0]} masks for {images.shape[0]} images; give one mask, or one per image"
        )
    if not bool((masks.flatten(1).amax(dim=1) > 0).all()):
        raise InputError("mask: a mask is empty (all zero), so no pixel would be learned; mark the face or subject")
    return masks.expand(images.shape[0], -1, -1).clamp(0, 1).unsqueeze(1).float()


def _photo_batch(batch: torch.Tensor, number: int) -> torch.Tensor:
    """One (N, 3, H, W) batch of photos checked for shape; number counts the batches from 1 for messages."""
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[0] == 0 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise InputError(
            f"images: input {number} is not a batch of RGB photos (got {shape}); connect an IMAGE such as Load Image's"
        )
    return batch


def _mask_list(masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every mask of the (M, H, W) or (H, W) batches as its own (H, W) tensor, in order."""
    singles: list[torch.Tensor] = []
    for number, batch in enumerate(masks, start=1):
        if not isinstance(batch, torch.Tensor) or batch.ndim not in (2, 3):
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise InputError(f"mask: input {number} is not a (count, height, width) mask (got {shape}); connect a MASK")
        singles += list(batch.unsqueeze(0) if batch.ndim == 2 else batch)
    return singles


def pair_masks(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """For each (N, 3, H, W) photo batch, its (N, H, W) masks: one mask for every photo, or one per photo in order."""
    singles = _mask_list(masks)
    sizes = [tuple(batch.shape[-2:]) for batch in images for _ in range(batch.shape[0])]
    one = len(singles) == 1
    if one:
        singles = singles * len(sizes)
    elif len(singles) != len(sizes):
        raise InputError(
            f"mask: got {len(singles)} masks for {len(sizes)} photos; give one mask for all, or one per photo in order"
        )
    for number, (mask, size) in enumerate(zip(singles, sizes), start=1):
        if tuple(mask.shape) != size:
            which = "the one mask" if one else f"mask {number}"
            raise InputError(
                f"mask: {which} is {mask.shape[-1]}x{mask.shape[-2]} but photo {number} is {size[1]}x{size[0]}; "
                "make each mask from its own photo (same size), one per photo"
            )
    starts = np.cumsum([0] + [batch.shape[0] for batch in images]).tolist()
    return [torch.stack(singles[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def fit_photos(
    images: Sequence[torch.Tensor], resolution: int, masks: Sequence[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Photo batches of any sizes as one (N, 3, R, R) tensor, masks as (N, 1, R, R), each with the same centre crop."""
    if len(images) == 0:
        raise InputError("images: got no photos; connect at least one")
    resolution = check_resolution(resolution)
    batches = [_photo_batch(batch, number) for number, batch in enumerate(images, start=1)]
    pixels = torch.cat([fit_tensor(batch.float(), resolution) for batch in batches])
    if not masks:
        return pixels, None
    paired = pair_masks(batches, masks)
    weights = torch.cat([fit_tensor(check_masks(m, b), resolution) for m, b in zip(paired, batches)])
    return pixels, weights


def load_training_images(sources: Sequence[Path], resolution: int) -> torch.Tensor:
    """Load every image in the given folders/files as one (N, 3, R, R) tensor in [-1, 1]."""
    resolution = check_resolution(resolution)
    return images_to_tensor([load_image(path) for path in list_image_paths(sources)], resolution)


def save_png_atomic(image: Image.Image, path: Path) -> Path:
    """Write a PNG via a temp file in the same folder and os.replace, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp's 0600
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def _local_sample_photo(data_module: object) -> Path | None:
    """The astronaut PNG already on disk: inside the installed scikit-image, or in its data cache."""
    folders = [Path(str(getattr(data_module, "__file__", ""))).parent, Path(str(getattr(data_module, "data_dir", "")))]
    for folder in folders:
        candidate = folder / SAMPLE_PHOTO_NAME
        if str(folder) not in ("", ".") and candidate.is_file():
            return candidate
    return None


def _can_download() -> bool:
    """Whether scikit-image could reach the network for missing data (it does so only through pooch)."""
    return importlib.util.find_spec("pooch") is not None


def sample_photo_path(cache_dir: Path | None = None) -> Path:
    """Path of scikit-image's public-domain NASA astronaut portrait (Eileen Collins), found offline, never downloaded."""
    try:
        import skimage.data
    except ImportError as exc:
        raise InputError("sample photo: scikit-image is not installed; run `pip install scikit-image`") from exc
    bundled = _local_sample_photo(skimage.data)
    if bundled is not None:
        return bundled
    folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "identity_tokens"
    cached = folder / SAMPLE_PHOTO_NAME
    if cached.is_file():
        return cached
    if _can_download():
        raise InputError(
            "sample photo: this scikit-image does not ship the astronaut image and would download it; "
            "pass your own photo instead"
        )
    try:
        pixels = np.asarray(skimage.data.astronaut(), dtype=np.uint8)
    except Exception as exc:  # no bundled file and no downloader: skimage raises ModuleNotFoundError/OSError
        raise InputError(
            "sample photo: scikit-image has no astronaut image on disk; pass your own photo instead"
        ) from exc
    return save_png_atomic(Image.fromarray(pixels), cached)


LAB_SAMPLE = "lab-sample"  # --images value: the lab world's sample subject
LAB_SAMPLE_SCALE = 2  # its 32 px pictures are written 2x (unsmoothed), since photos under MIN_SIDE are refused


def lab_sample_paths(cache_dir: Path | None = None) -> list[Path]:
    """The lab world's sample subject's reference pictures as PNGs in a cache folder (rendered from a seed)."""
    from .lab.evaluation import reference_pictures
    from .lab.world import sample_subject

    folder = (Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "identity_tokens") / LAB_SAMPLE
    paths = []
    for i, picture in enumerate(reference_pictures(sample_subject())):
        path = folder / f"reference_{i + 1}.png"
        side = picture.shape[0] * LAB_SAMPLE_SCALE
        image = Image.fromarray(picture).resize((side, side), Image.NEAREST)
        if not (path.is_file() and np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))):
            save_png_atomic(image, path)
        paths.append(path)
    return paths
