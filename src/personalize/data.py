"""Image folder -> validated training tensors.

Every odd file a user may drop in a folder gets a defined outcome: EXIF rotation applied; grayscale, palette,
CMYK, 16-bit and float images converted to 8-bit RGB; transparency composited on white; captions read from
`NAME.txt`; masks (`NAME.mask.png`) and hidden or non-image files skipped; a corrupt image stops the run with
its name; an image smaller than the training resolution is upscaled with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PersonalizeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
_log = logging.getLogger("personalize.data")


@dataclass
class TrainImage:
    path: Path
    pixels: torch.Tensor  # float32 [3, R, R] in [-1, 1]
    caption: str | None  # text of NAME.txt beside the image, if any


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit integer and 32-bit float images into 0..255 (Pillow's convert('RGB') would clip them)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        data = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or data.max() > 255 else 255.0
        return Image.fromarray(np.clip(np.round(data / top * 255.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        data = np.asarray(image, dtype=np.float64)
        top = 1.0 if data.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.round(data / top * 255.0), 0, 255).astype(np.uint8), "L")
    return image


def load_rgb(path: Path) -> Image.Image:
    """Open one image as 8-bit RGB, decoding it fully so a truncated file fails here, naming itself."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PersonalizeError(f"{path}: not a readable image ({exc}); remove or replace it") from exc
    image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent areas become white
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, RGB...


def to_training_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution`, centre-crop a square, scale to [-1, 1]: float32 [3, R, R]."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _is_training_image(path: Path) -> bool:
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.name.lower().endswith(".mask.png"):  # masks of a later feature, not training images
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS


def load_image_folder(folder: str | Path, resolution: int, *, log: logging.Logger = _log) -> list[TrainImage]:
    """Load every image of a folder (not recursive), sorted by name so runs are reproducible."""
    folder = Path(folder)
    if not folder.exists():
        raise PersonalizeError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise PersonalizeError(f"{folder} is not a folder; --images takes a folder of images")
    images = []
    for path in sorted(folder.iterdir()):
        if not _is_training_image(path):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() != ".txt" and not path.name.lower().endswith(".mask.png"):
                log.info("skipping %s: not an image file", path)
            continue
        image = load_rgb(path)
        if min(image.size) < resolution:
            log.warning("%s is %dx%d, smaller than the training resolution %d: it will be upscaled", path, *image.size, resolution)
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
        images.append(TrainImage(path, to_training_tensor(image, resolution), caption))
    if not images:
        raise PersonalizeError(f"{folder} holds no images (accepted: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images
