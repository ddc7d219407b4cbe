"""The papers' metrics in miniature, on the toy world's judge (`toyworld.judge.ToyJudge`).

The judge reads every attribute of a 32×32 scene and gives a 256-d feature per image, so each paper's metric has
an exact analogue:

| here                 | paper metric it stands for                   | definition                                          |
|----------------------|----------------------------------------------|-----------------------------------------------------|
| `concept_rate`       | image alignment (CLIP-I / DINO)              | share of images showing every trait of the concept  |
| `feature_similarity` | CLIP-I / DINO                                | mean pairwise cosine of judge features, gen vs ref  |
| `obeyed_rate`        | text alignment (CLIP-T)                      | share of images showing what the prompt asked       |
| `background_leakage` | SingleInsert's CLIP-I-b                      | share of images whose background is the source's    |
| `diversity`          | DIV (LPIPS) of Dis²Booth / DreamBooth        | mean pairwise cosine distance of judge features     |
| `judge_frechet`      | FID of Dis²Booth                             | Fréchet distance of judge features, gen vs held-out |

`foreground_mask` segments a toy-world image by its flat background colour: what SingleInsert's CLIP-I-f/-b and
DINO-f/-b need for generated images, which have no renderer mask.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import PersonalizeError
from .metrics import cosine_matrix, fid, mean_pairwise_cosine


def concept_rate(readings: Sequence[dict[str, str]], traits: dict[str, str]) -> float:
    """Share of judge readings that match every `attribute: value` of `traits`."""
    if not readings:
        raise PersonalizeError("no images to judge")
    return sum(all(r[k] == v for k, v in traits.items()) for r in readings) / len(readings)


def obeyed_rate(readings: Sequence[dict[str, str]], asked: Sequence[dict[str, str]]) -> float:
    """Share of images whose reading matches what its own prompt asked (`asked[i]`, attribute: value)."""
    if len(readings) != len(asked) or not readings:
        raise PersonalizeError(f"need one request per image, got {len(readings)} images and {len(asked)} requests")
    return sum(all(r[k] == v for k, v in a.items()) for r, a in zip(readings, asked)) / len(readings)


def background_leakage(readings: Sequence[dict[str, str]], source_background: str) -> float:
    """Share of images (drawn with prompts that name no background) on the source image's background: a concept
    that learned its background along with itself drags it into every picture."""
    return concept_rate(readings, {"background": source_background})


def clean_foreground_rate(readings: Sequence[dict[str, str]], traits: dict[str, str], source_background: str) -> float:
    """Share of images showing the concept's traits on a background other than the source's: fidelity that was
    not bought by copying the source scene (SingleInsert's claim in one number)."""
    return concept_rate(readings, traits) - concept_rate(readings, {**traits, "background": source_background})


def feature_similarity(judge, generated: Sequence[Image.Image], reference: Sequence[Image.Image]) -> float:
    return mean_pairwise_cosine(judge.features(generated), judge.features(reference))


def diversity(judge, images: Sequence[Image.Image]) -> float:
    """Mean 1 - cos over the n(n-1)/2 distinct pairs of images (0 when all samples are the same)."""
    if len(images) < 2:
        raise PersonalizeError(f"diversity needs at least 2 images, got {len(images)}")
    sims = cosine_matrix(judge.features(images), judge.features(images))
    n = len(images)
    off_diagonal = sims[~torch.eye(n, dtype=torch.bool)]
    return float(1 - off_diagonal.mean())


def judge_frechet(judge, generated: Sequence[Image.Image], heldout: Sequence[Image.Image]) -> float:
    return float(fid(judge.features(generated), judge.features(heldout)))


# -- masks of toy-world images ----------------------------------------------------------------------------------

# Everything an object of the toy world is painted with (world._pattern_fill): its colour, stripes at 0.4 of it, and
# white dots. A colour closer than MIN_CONTRAST to the background cannot be told from it (white dots on white).
MIN_CONTRAST = 32.0


def _object_colours() -> np.ndarray:
    from ..toyworld.world import COLOURS

    base = np.array(list(COLOURS.values()), dtype=np.float32)
    return np.concatenate([base, 0.4 * base, np.full((1, 3), 255.0, dtype=np.float32)])


def _background_colour(rgb: np.ndarray) -> np.ndarray:
    """The world's background colour nearest to the median of the image's border (objects touch it at most)."""
    from ..toyworld.world import BACKGROUNDS

    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    palette = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
    return palette[np.linalg.norm(palette - np.median(border, axis=0), axis=1).argmin()]


def _reachable_from_border(allowed: np.ndarray) -> np.ndarray:
    """The `allowed` pixels connected (4-neighbours) to the image border through `allowed` pixels."""
    reached = np.zeros_like(allowed)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        reached[edge] = allowed[edge]
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= allowed
        if np.array_equal(grown, reached):
            return reached
        reached = grown


def foreground_mask(image: Image.Image) -> np.ndarray:
    """bool [H, W]: the objects of a toy-world image, found from its flat background.

    Each pixel is read as a blend bg + α·(c - bg) towards the object colour c it lies closest to (the line from
    the background to c that passes nearest); it is foreground when α ≥ 0.45 — the renderer's own rule is
    coverage ≥ 50 %, and 8-bit rounding puts exact half-covered pixels just below 0.5. Background-coloured pixels
    enclosed by an object (its dots, a stripe) are foreground too: background is what connects to the border.

    On rendered scenes this reproduces `world.render`'s mask away from the anti-aliased rim (where stripes and
    the background blend three colours) except for white dots cut by the outline of a dotted object on white. On a
    model's samples it is the same rule applied to a drawing: as exact as the drawing's background is flat.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    background = _background_colour(rgb)
    towards = _object_colours() - background
    towards = towards[np.linalg.norm(towards, axis=1) >= MIN_CONTRAST]
    alpha = np.clip((rgb - background) @ towards.T / (towards**2).sum(axis=1), 0.0, 1.0)  # [H, W, K]
    off_line = np.linalg.norm(rgb[..., None, :] - (background + alpha[..., None] * towards), axis=-1)
    nearest = np.take_along_axis(alpha, off_line.argmin(axis=-1)[..., None], axis=-1)[..., 0]
    return ~_reachable_from_border(nearest < 0.45)
