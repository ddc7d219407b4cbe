"""Drawing a foreground mask on an image in the browser, saved as `NAME.mask.png`: exactly the file the CLI reads.

The mask is painted on a display copy of the image (at most MAX_SIDE pixels a side, so every brush stroke is a
small array update) and saved at the image's own size, upright as the loader sees it, white = the concept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..data import MASK_SUFFIX, MASK_THRESHOLD, load_rgb
from ..masking import save_mask

MAX_SIDE = 512
_OVERLAY = np.array([255, 40, 90], dtype=np.float32)  # the painted area: a pink no toy-world object has


def mask_path(image_path: Path) -> Path:
    return image_path.with_name(f"{image_path.stem}{MASK_SUFFIX}.png")


def read_mask(path: Path) -> np.ndarray:
    """A mask file as bool [H, W], read as `data.load_mask` reads it (gray ≥ 50 %, or the alpha of a cut-out)."""
    with Image.open(path) as image:
        image.load()
        gray = image.convert("L")
        if image.mode in ("RGBA", "LA") and gray.getextrema()[0] == gray.getextrema()[1]:
            gray = image.getchannel("A")
    return np.asarray(gray) >= MASK_THRESHOLD


class MaskCanvas:
    """One image and the mask being drawn on it."""

    def __init__(self, image_path: str | Path):
        self.image_path = Path(image_path)
        self.image = load_rgb(self.image_path)  # upright (EXIF), as the loader and so the mask file see it
        scale = min(1.0, MAX_SIDE / max(self.image.size))
        size = (max(1, round(self.image.width * scale)), max(1, round(self.image.height * scale)))
        self.display = self.image.resize(size, Image.Resampling.BICUBIC) if scale < 1 else self.image.copy()
        self.mask = np.zeros((size[1], size[0]), dtype=bool)
        existing = mask_path(self.image_path)
        if existing.is_file():
            loaded = Image.fromarray(read_mask(existing)).resize(size, Image.Resampling.NEAREST)
            self.mask = np.asarray(loaded, dtype=bool).copy()
        self._last: tuple[float, float] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.display.size

    def paint(self, x: float, y: float, radius: float, foreground: bool = True, continue_stroke: bool = False) -> None:
        """A round brush at display pixel (x, y); `continue_stroke` joins it to the previous dab (no gaps on a
        fast drag, where the browser reports only every few pixels)."""
        points = [(x, y)]
        if continue_stroke and self._last is not None:
            (x0, y0), steps = self._last, max(1, int(np.hypot(x - self._last[0], y - self._last[1]) / max(radius / 2, 0.5)))
            points = [(x0 + (x - x0) * t / steps, y0 + (y - y0) * t / steps) for t in range(1, steps + 1)]
        yy, xx = np.mgrid[0 : self.mask.shape[0], 0 : self.mask.shape[1]]
        for px, py in points:
            self.mask[(xx + 0.5 - px) ** 2 + (yy + 0.5 - py) ** 2 <= radius**2] = foreground
        self._last = (x, y)

    def end_stroke(self) -> None:
        self._last = None

    def clear(self) -> None:
        self.mask[:] = False

    def guess_flat_background(self) -> None:
        """Everything that is not the flat background connected to the border: right for toy-world scenes and
        product shots on a plain backdrop; a starting point to correct by hand elsewhere."""
        from ..evaluate.toy import foreground_mask

        self.mask = foreground_mask(self.display).copy()

    @property
    def coverage(self) -> float:
        return float(self.mask.mean())

    def composite(self) -> Image.Image:
        """The image with the mask over it: the concept tinted, the background dimmed."""
        rgb = np.asarray(self.display, dtype=np.float32)
        out = np.where(self.mask[..., None], 0.55 * rgb + 0.45 * _OVERLAY, 0.45 * rgb)
        return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))

    def save(self) -> Path:
        """Write NAME.mask.png beside the image, at the image's own size (what `personalize train` reads)."""
        full = Image.fromarray(self.mask).resize(self.image.size, Image.Resampling.NEAREST)
        return save_mask(np.asarray(full, dtype=bool), self.image_path)
