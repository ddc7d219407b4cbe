"""Image folder -> validated training tensors.

Personalisation trains on a handful (3-20) of user photos, so every one of them matters and every odd file a user
may drop in the folder gets a defined outcome instead of a silent surprise:

* EXIF orientation is applied, so phone photos are upright as the user sees them;
* grayscale, bilevel, palette, CMYK, 16-bit and float images become 8-bit RGB, with high bit depths *scaled*
  (Pillow's own ``convert`` clips them, which turns a 16-bit photo almost entirely white);
* transparency is composited onto white (the usual look of a cut-out product shot);
* ``NAME.txt`` beside ``NAME.jpg`` is that image's caption;
* masks (``NAME.mask.png``), hidden files and non-image files are skipped;
* a corrupt or truncated image stops the run, naming the file (training on half a photo is worse than stopping);
* an image smaller than the training resolution is upscaled, with a warning.

ICC colour profiles are not applied: pixel values are taken as sRGB, which is what nearly all photos are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import PersonalizeError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
CAPTION_EXTENSION = ".txt"
MASK_SUFFIX = ".mask"  # `NAME.mask.png`: an image stem ending in this is a mask, not a training image

_WHITE = (255, 255, 255, 255)
_LOG = logging.getLogger("personalize.data")


@dataclass
class TrainImage:
    """One training image, ready to encode."""

    path: Path
    pixels: torch.Tensor  # float32 [3, R, R] in [-1, 1]
    caption: str | None  # text of NAME.txt beside the image, stripped; None when there is none or it is blank
    mask: torch.Tensor | None = None  # float32 [1, R, R] of 0/1 (foreground = 1), when masks were asked for
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the file: SDXL's size conditioning
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) of the crop in the resized image: SDXL's crop conditioning
    resized_size: tuple[int, int] = (0, 0)  # (height, width) of the resized image the crop was taken from


# --------------------------------------------------------------------------------------------- one image


def _array_to_l(values: np.ndarray, top: float) -> Image.Image:
    """Map 0..top linearly onto 0..255 and round (not truncate), so that mid-grey stays mid-grey."""
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # 2-D uint8 -> mode "L"


def _stretch_to_l(values: np.ndarray) -> Image.Image:
    """Last resort for data with no known range (negative or > 16-bit integers, HDR floats): min..max -> 0..255."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return _array_to_l(np.zeros_like(values), 1.0)
    return _array_to_l(values - low, high - low)


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit integer and 32-bit int/float grayscale into 8-bit "L"; other modes pass through unchanged.

    Pillow's ``convert("L"/"RGB")`` clips these modes at 255 instead of scaling, so a 16-bit PNG would come out
    nearly all white. The file format fixes the range of "I;16*" (0..65535); for "I" and "F" it does not, so the
    range is inferred from the values: "I" within 0..255 is 8-bit data widened, within 0..65535 is 16-bit data
    (what older Pillow made of 16-bit PNGs); "F" within 0..1 is normalised, within 0..255 is 8-bit scale. Anything
    else is stretched from its minimum to its maximum.
    """
    if image.mode.startswith("I;16"):  # I;16, I;16L, I;16B: numpy honours the byte order
        return _array_to_l(np.asarray(image, dtype=np.float64), 65535.0)
    if image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if values.min() >= 0 and values.max() <= 255:
            return _array_to_l(values, 255.0)
        if values.min() >= 0 and values.max() <= 65535:
            return _array_to_l(values, 65535.0)
        return _stretch_to_l(values)
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.min() >= 0 and values.max() <= 1.0:
            return _array_to_l(values, 1.0)
        if values.min() >= 0 and values.max() <= 255.0:
            return _array_to_l(values, 255.0)
        return _stretch_to_l(values)
    return image


def _flatten_alpha_on_white(image: Image.Image) -> Image.Image:
    """Composite any transparency (alpha channel, or a palette/tRNS transparent colour) onto a white background.

    White, not black: transparent areas of user images are mostly cut-out backgrounds, and a white studio
    background is what such product shots are meant to look like.
    """
    if not image.has_transparency_data:
        return image
    if image.mode == "La":  # premultiplied LA: Pillow converts it only to LA
        image = image.convert("LA")
    rgba = image.convert("RGBA")  # also applies P/L/RGB "transparency" info
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)


def _decode(path: Path) -> Image.Image:
    """Open and fully decode one file, upright, or raise PersonalizeError naming it."""
    try:
        with Image.open(path) as image:
            # Image.open only reads the header; decoding everything here makes a truncated file fail now,
            # with its name, rather than later inside training. LOAD_TRUNCATED_IMAGES stays as the user left it.
            image.load()
            return ImageOps.exif_transpose(image)  # a new image, so it survives the file being closed
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise PersonalizeError(f"{path}: {exc}; downscale this image (a few megapixels is plenty)") from exc
    except Exception as exc:  # Pillow's plugins raise many types for damaged data (OSError, SyntaxError, ...)
        raise PersonalizeError(
            f"{path}: cannot be read as an image ({type(exc).__name__}: {exc}); "
            "it may be truncated or corrupt: re-export or re-download it, or remove it from the folder"
        ) from exc


def load_rgb(path: Path) -> Image.Image:
    """Open one image file as an upright 8-bit RGB image.

    * EXIF orientation is applied (``ImageOps.exif_transpose``), so the result looks as it does in a photo viewer;
    * grayscale ("L", "LA", "1"), palette ("P", with or without transparency), CMYK, YCbCr etc. are converted;
    * 16-bit ("I;16", "I;16B", "I") and 32-bit float ("F") images are scaled to 8 bit, not clipped
      (see ``_high_depth_to_8bit`` for how the range of "I" and "F" is chosen);
    * transparency ("RGBA", "LA", "PA", transparent palette entries) is composited onto a WHITE background.

    The whole file is decoded, so a corrupt or truncated file raises PersonalizeError naming it.
    """
    path = Path(path)
    image = _high_depth_to_8bit(_decode(path))
    image = _flatten_alpha_on_white(image)
    try:
        return image.convert("RGB")
    except ValueError as exc:  # an exotic mode Pillow cannot turn into RGB
        raise PersonalizeError(
            f"{path}: colour mode {image.mode!r} cannot be converted to RGB; save it as an 8-bit RGB PNG or JPEG"
        ) from exc


def crop_top_left(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(top, left) of `to_training_tensor`'s centre crop, in the image resized to short side `resolution`."""
    width, height = size
    scale = resolution / min(width, height)
    return round((height * scale - resolution) / 2), round((width * scale - resolution) / 2)


def to_bucket_tensor(image: Image.Image, bucket: tuple[int, int]) -> torch.Tensor:
    """Resize to cover `bucket` (width, height) and centre-crop it: float32 [3, H, W] in [-1, 1] (one Pillow call,
    as `to_training_tensor`)."""
    _, box = cover_crop(image.size, bucket)
    fitted = image.resize(bucket, Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    array = np.asarray(fitted.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_training_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize so the shorter side equals `resolution`, centre-crop a square; return float32 [3, R, R] in [-1, 1].

    The resize and the crop are one Pillow call (a source `box` of the central square): identical to resizing
    then cropping, but with the crop placed to sub-pixel precision. Bicubic resampling in Pillow is antialiased
    when shrinking; `reducing_gap` first box-reduces big photos by an integer factor, which is much faster and
    visually the same.
    """
    if image.mode != "RGB":
        raise ValueError(f"to_training_tensor needs an RGB image, got mode {image.mode!r}; open files with load_rgb")
    if resolution < 1:
        raise PersonalizeError(f"the training resolution must be a positive number of pixels, got {resolution}")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    square = image.resize(
        (resolution, resolution),
        Image.Resampling.BICUBIC,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0  # 0 -> -1, 255 -> 1 exactly
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------- aspect-ratio buckets


@dataclass(frozen=True)
class Buckets:
    """Aspect-ratio buckets (kohya's and OneTrainer's idea): sizes (width, height), multiples of `step`, with an area
    between 3/4 of `resolution`² and `resolution`², from 1:`max_ratio` to `max_ratio`:1. Each image goes to the
    bucket of the nearest aspect ratio (the larger one on a tie), resized to cover it and centre-cropped by what
    the aspect ratios differ — instead of losing its long sides to a square crop (a 2:1 image fits a 2:1 bucket
    exactly: at 512 px, 640×320). An image is never upscaled by more than `max_upscale` (1.0 = never, kohya's
    bucket_no_upscale): a smaller image gets a smaller bucket of its own aspect ratio."""

    resolution: int
    step: int
    max_ratio: float = 2.0
    max_upscale: float = 1.0

    def sizes(self) -> list[tuple[int, int]]:
        area, step = self.resolution ** 2, self.step
        sides = range(step, int(self.resolution * self.max_ratio) + 1, step)
        return [(w, h) for w in sides for h in sides
                if 0.75 * area <= w * h <= area and max(w / h, h / w) <= self.max_ratio]

    def fit(self, size: tuple[int, int]) -> tuple[int, int]:
        """The bucket (width, height) of an image of `size` (width, height)."""
        width, height = size
        aspect = math.log(width / height)
        bucket = min(self.sizes(), key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))
        upscale = max(bucket[0] / width, bucket[1] / height)
        if upscale > self.max_upscale:  # too small an image: a bucket of its own size (times the allowed upscale)
            scale = self.max_upscale
            bucket = (max(self.step, int(width * scale) // self.step * self.step),
                      max(self.step, int(height * scale) // self.step * self.step))
        return bucket


def cover_crop(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """(resized (width, height), source box) of resizing `size` to cover `target` and cropping its centre."""
    width, height = size
    scale = max(target[0] / width, target[1] / height)
    box_w, box_h = target[0] / scale, target[1] / scale
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return (round(width * scale), round(height * scale)), (left, top, left + box_w, top + box_h)


# --------------------------------------------------------------------------------------------- masks

MASK_THRESHOLD = 128  # a mask pixel is foreground when its 8-bit gray value is at least this (i.e. ≥ 50 %)


def find_mask(image_path: Path, masks_dir: str | Path | None = None) -> Path:
    """`NAME.mask.<ext>` beside `NAME.<ext>`, or `NAME.<ext>` (same stem) in `masks_dir`."""
    candidates = [image_path.with_name(f"{image_path.stem}{MASK_SUFFIX}{ext}") for ext in (".png", *sorted(IMAGE_EXTENSIONS))]
    if masks_dir is not None:
        candidates = [Path(masks_dir) / f"{image_path.stem}{ext}" for ext in (".png", *sorted(IMAGE_EXTENSIONS))]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f"{masks_dir}/{image_path.stem}.png" if masks_dir is not None else f"{candidates[0]}"
    raise PersonalizeError(
        f"{image_path} has no foreground mask: expected {where} (white = the concept), "
        "or make one with `personalize mask`"
    )


def load_mask(path: Path, image_size: tuple[int, int], resolution: int, log=_LOG,
              bucket: tuple[int, int] | None = None) -> torch.Tensor:
    """A mask file -> float32 [1, R, R] of 0/1, cropped exactly like its image.

    Any mode is read as gray (alpha-only masks: their alpha), binarised at MASK_THRESHOLD. A mask of another size
    than its image is resized to it (nearest) with a warning. A mask with no foreground, or nothing else, is refused.
    """
    image = _high_depth_to_8bit(_decode(path))
    gray = image.convert("L")
    if image.mode in ("RGBA", "LA") and gray.getextrema()[0] == gray.getextrema()[1]:
        gray = image.getchannel("A")  # a cut-out saved as transparency: the alpha channel is the mask
    binary = gray.point(lambda v: 255 if v >= MASK_THRESHOLD else 0)
    if binary.size != image_size:
        log.warning("%s is %dx%d but its image is %dx%d: resized to the image (nearest)", path, *binary.size, *image_size)
        binary = binary.resize(image_size, Image.Resampling.NEAREST)
    pixels = to_bucket_tensor(binary.convert("RGB"), bucket) if bucket else to_training_tensor(binary.convert("RGB"), resolution)
    mask = (pixels[:1] > 0).float()
    if mask.sum() == 0:
        raise PersonalizeError(f"{path}: the mask has no foreground (white) pixels at {resolution}px: nothing to learn")
    if mask.sum() == mask.numel():
        raise PersonalizeError(f"{path}: the mask covers the whole image: nothing to separate from the background")
    return mask


# --------------------------------------------------------------------------------------------- a folder


def _is_mask(path: Path) -> bool:
    """`NAME.mask.png` (any image extension) is a mask for a later feature, never a training image."""
    return Path(path.stem).suffix.lower() == MASK_SUFFIX


def _read_caption(image_path: Path) -> str | None:
    """The stripped text of NAME.txt beside NAME.<ext>; None when absent or blank (a blank caption says nothing)."""
    caption_path = image_path.with_suffix(CAPTION_EXTENSION)
    if not caption_path.is_file():
        return None
    try:
        text = caption_path.read_text(encoding="utf-8-sig")  # -sig: drop the BOM Windows editors write
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonalizeError(f"{caption_path}: cannot read this caption ({exc}); save it as UTF-8 text") from exc
    return text.strip() or None


def _image_files(folder: Path, log: logging.Logger | logging.LoggerAdapter) -> list[Path]:
    """The training images of `folder`, sorted by file name; says (log.info) what else it skips and why.

    Sorting by name (a plain, case-sensitive string sort) gives the same order on every OS and file system.
    """
    images = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        name = path.name
        if name.startswith("."):  # .DS_Store, ._foo.jpg (macOS resource forks), editor swap files
            continue
        if path.is_dir():
            log.info("skipping %s: subfolders are not read", path)
        elif path.suffix.lower() == CAPTION_EXTENSION:
            continue  # a caption, read with its image
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            log.info("skipping %s: not an image file (accepted: %s)", path, _accepted())
        elif _is_mask(path):
            continue  # a mask, for a later feature
        else:
            images.append(path)
    return images


def _accepted() -> str:
    return " ".join(sorted(IMAGE_EXTENSIONS))


def image_paths(folder: str | Path, log: logging.Logger | logging.LoggerAdapter = _LOG) -> list[Path]:
    """The image files directly inside `folder`, sorted by name; PersonalizeError when there are none."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise PersonalizeError(f"image folder {folder} does not exist; pass the folder that holds your photos")
    if not folder.is_dir():
        raise PersonalizeError(f"{folder} is not a folder; pass the folder that holds your photos, not one file")
    paths = _image_files(folder, log)
    if not paths:
        raise PersonalizeError(
            f"{folder} has no images; put your photos directly in it (subfolders are not read), "
            f"with one of the extensions {_accepted()}"
        )
    return paths


def load_image_folder(
    folder: str | Path,
    resolution: int,
    *,
    log: logging.Logger | logging.LoggerAdapter = _LOG,
    masks: bool = False,
    masks_dir: str | Path | None = None,
    buckets: Buckets | None = None,
) -> list[TrainImage]:
    """Load every image directly inside `folder` (not recursive), sorted by file name so runs are reproducible.

    Each image is loaded with `load_rgb` (upright, 8-bit RGB, transparency on white), its shorter side resized to
    `resolution`, and its centre cropped to a square: **non-square images lose their edges** (the long sides),
    so keep the subject near the middle. `NAME.txt` beside an image is its caption.

    Skipped: hidden files, captions (`.txt`) and masks (`NAME.mask.png`) silently; other non-image files and
    subfolders with one `log.info` line each. Images whose shorter side is below `resolution` are upscaled, with a
    `log.warning` naming each.

    With `masks=True` each image also gets its foreground mask (`find_mask`, `load_mask`), cropped like it.
    With `buckets`, each image keeps its aspect ratio in its bucket (see `Buckets`) instead of a square crop.

    Raises PersonalizeError when the folder is missing or not a folder, when it holds no image, or when any image
    cannot be decoded (all undecodable files are named at once, so they can be fixed in one go).
    """
    folder = Path(folder).expanduser()
    paths = image_paths(folder, log)
    images, failures = [], []
    for path in paths:
        try:
            image = load_rgb(path)
        except PersonalizeError as exc:
            failures.append(str(exc))
            continue
        bucket = buckets.fit(image.size) if buckets else None
        if bucket is None and min(image.size) < resolution:
            log.warning(
                "%s is only %dx%d, smaller than the training resolution %d: it will be upscaled (and look soft)",
                path, image.width, image.height, resolution,
            )
        mask = load_mask(find_mask(path, masks_dir), image.size, resolution, log, bucket) if masks else None
        target = bucket or (resolution, resolution)
        (resized_w, resized_h), box = cover_crop(image.size, target)
        top, left = (round((resized_h - target[1]) / 2), round((resized_w - target[0]) / 2))
        pixels = to_bucket_tensor(image, bucket) if bucket else to_training_tensor(image, resolution)
        images.append(TrainImage(path, pixels, _read_caption(path), mask, (image.height, image.width),
                                 (top, left) if bucket else crop_top_left(image.size, resolution), (resized_h, resized_w)))
    if len(failures) == 1:
        raise PersonalizeError(failures[0])
    if failures:
        raise PersonalizeError(f"{len(failures)} images in {folder} cannot be used:\n  " + "\n  ".join(failures))
    return images


# --------------------------------------------------------------------------------------------- several concepts

SUBSET_ALIASES = {"image_dir": "images", "num_repeats": "repeats", "class_data_dir": "class_images"}  # kohya's names


@dataclass
class Subset:
    """One folder of a multi-concept dataset file (kohya's dataset subsets, OneTrainer's concepts).

    `caption`: where each image's training prompt comes from — None: the method's default (DreamBooth-LoRA and
    Dis²Booth read NAME.txt, embedding methods use their templates); "files": NAME.txt (the method's default where
    an image has none); "templates": the method's prompts, ignoring NAME.txt; any other text: that fixed prompt,
    with {token} and {class_word} filled in. `repeats`: how often each image counts when batches are drawn."""

    images: str
    token: str | None = None
    class_word: str | None = None
    init_word: str | None = None
    caption: str | None = None
    repeats: int = 1
    class_images: str | None = None

    def prompt_for(self, image: TrainImage, reads_caption_files: bool, token: str, class_word: str | None) -> str | None:
        if self.caption in (None, "files"):
            return image.caption if (self.caption == "files" or reads_caption_files) else None
        if self.caption == "templates":
            return None
        return self.caption.format(token=token, class_word=class_word)


def read_dataset(path: str | Path) -> list[Subset]:
    """A dataset file (TOML or YAML) with a list `subsets` of {images, token, class_word, init_word, caption,
    repeats, class_images}; relative folders are read from the file's own folder."""
    import tomllib

    import yaml

    path = Path(path)
    if not path.is_file():
        raise PersonalizeError(f"--dataset {path}: no such file")
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else yaml.safe_load(path.read_text())
    except Exception as exc:  # noqa: BLE001 - TOML and YAML raise their own error types
        raise PersonalizeError(f"--dataset {path} is not valid TOML/YAML: {exc}") from exc
    entries = (data or {}).get("subsets") if isinstance(data, dict) else None
    if not entries or not isinstance(entries, list):
        raise PersonalizeError(f"--dataset {path}: expected a list `subsets` of folders, e.g. [[subsets]] images = \"dogs/\"")
    known = set(Subset.__dataclass_fields__)
    subsets = []
    for number, entry in enumerate(entries, 1):
        entry = {SUBSET_ALIASES.get(k, k): v for k, v in (entry or {}).items()}
        unknown = set(entry) - known
        if unknown or "images" not in entry:
            problem = f"unknown key(s) {', '.join(sorted(unknown))}" if unknown else "no `images` folder"
            raise PersonalizeError(f"--dataset {path}: subset {number} has {problem}; keys: {', '.join(sorted(known))}")
        for key in ("images", "class_images"):
            if entry.get(key) and not Path(entry[key]).expanduser().is_absolute():
                entry[key] = str(path.parent / entry[key])
        subset = Subset(**entry)
        if not isinstance(subset.repeats, int) or subset.repeats < 1:
            raise PersonalizeError(f"--dataset {path}: subset {number}: repeats must be a whole number ≥ 1")
        subsets.append(subset)
    return subsets
