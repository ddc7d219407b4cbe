"""Foreground / background masking for SingleInsert's CLIP-I-f/-b and DINO-f/-b: any embedding network (CLIP,
DINO) scores the masked images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ...data import MASK_THRESHOLD
from ...errors import PersonalizeError
from .common import mean_pairwise_cosine

if TYPE_CHECKING:
    from .clip import ClipScorer
    from .dino import DinoScorer


def _mask_bool(mask, size: tuple[int, int]) -> np.ndarray:
    """A foreground mask as bool [H, W] at `size` (width, height).

    PIL masks: gray >= MASK_THRESHOLD (128) is foreground, as in training. Arrays: bool as is; float in 0..1
    -> >= 0.5; integers 0..255 -> >= 128 (0/1 integer arrays -> >= 1). A mask of another size is resized
    (bilinear on 0/255, then >= 128), so a mask made at a different resolution still lines up.
    """
    if isinstance(mask, Image.Image):
        gray = np.asarray(mask.convert("L"))
        fg = gray >= MASK_THRESHOLD
    else:
        array = np.asarray(mask)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2:
            raise PersonalizeError(f"a mask must be 2-D (height x width), got shape {array.shape}")
        if array.dtype == bool:
            fg = array
        elif np.issubdtype(array.dtype, np.floating):
            fg = array >= 0.5
        else:
            fg = array >= (1 if array.max(initial=0) <= 1 else MASK_THRESHOLD)
    if (fg.shape[1], fg.shape[0]) != tuple(size):
        resized = Image.fromarray(fg.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
        fg = np.asarray(resized) >= MASK_THRESHOLD
    return fg


def apply_mask(image: Image.Image, mask, keep: str = "foreground", fill: tuple[int, int, int] = (0, 0, 0),
               crop: bool = True) -> Image.Image:
    """The image with the region that is not kept painted `fill`, optionally cropped to the subject.

    keep="foreground": pixels outside the mask become `fill`; with crop=True the result is then cut to the
    smallest *square* centred on the mask's bounding box that contains it (parts of that square outside the
    image are `fill`). Square, because CLIP/DINO centre-crop a square: a tight non-square box would lose the
    subject's ends. An empty mask gives the all-`fill` image, uncropped (the subject is absent: a low score is
    the right outcome).
    keep="background": the mask's pixels become `fill`; `crop` is ignored (the background has no subject box).
    """
    if keep not in ("foreground", "background"):
        raise ValueError(f"keep must be 'foreground' or 'background', got {keep!r}")
    rgb = np.array(image.convert("RGB"))
    fg = _mask_bool(mask, image.size)
    kept = fg if keep == "foreground" else ~fg
    fill_arr = np.asarray(fill, dtype=np.uint8)
    rgb[~kept] = fill_arr
    if not (crop and keep == "foreground" and fg.any()):
        return Image.fromarray(rgb)
    ys, xs = np.nonzero(fg)
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = max(bottom - top, right - left)
    top -= (side - (bottom - top)) // 2  # centre the box's short dimension in the square
    left -= (side - (right - left)) // 2
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = fill_arr
    h, w = fg.shape
    src_t, src_l, src_b, src_r = max(top, 0), max(left, 0), min(top + side, h), min(left + side, w)
    canvas[src_t - top : src_b - top, src_l - left : src_r - left] = rgb[src_t:src_b, src_l:src_r]
    return Image.fromarray(canvas)


def masked_similarity(embed: Callable[[Sequence[Image.Image]], torch.Tensor],
                      generated: Sequence[Image.Image], generated_masks: Sequence,
                      reference: Sequence[Image.Image], reference_masks: Sequence, *,
                      keep: str = "foreground", fill: tuple[int, int, int] = (0, 0, 0), crop: bool = True) -> float:
    """Mean pairwise cosine of `embed` over masked images (see `apply_mask`): subject-only (keep="foreground")
    or background-only (keep="background") CLIP-I / DINO."""
    if len(generated) != len(generated_masks) or len(reference) != len(reference_masks):
        raise PersonalizeError(
            f"need one mask per image: {len(generated)} generated with {len(generated_masks)} masks, "
            f"{len(reference)} references with {len(reference_masks)} masks"
        )
    gen = [apply_mask(im, m, keep, fill, crop) for im, m in zip(generated, generated_masks)]
    ref = [apply_mask(im, m, keep, fill, crop) for im, m in zip(reference, reference_masks)]
    return mean_pairwise_cosine(embed(gen), embed(ref))


def clip_i_masked(scorer: ClipScorer, generated, generated_masks, reference, reference_masks,
                  keep: str = "foreground", **kwargs) -> float:
    return masked_similarity(scorer.image_embeddings, generated, generated_masks, reference, reference_masks,
                             keep=keep, **kwargs)


def dino_masked(scorer: DinoScorer, generated, generated_masks, reference, reference_masks,
                keep: str = "foreground", **kwargs) -> float:
    return masked_similarity(scorer.image_embeddings, generated, generated_masks, reference, reference_masks,
                             keep=keep, **kwargs)
