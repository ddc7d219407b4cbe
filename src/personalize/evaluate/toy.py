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
"""

from __future__ import annotations

from typing import Sequence

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
