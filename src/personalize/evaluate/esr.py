"""Editing success rate (SingleInsert, appendix A.2) with a pluggable judge.

ESR = mean over prompts of the mean over seeds of Σ_targets success/len(targets): each prompt is worth one
point, a prompt with two targets half a point per target. A judge answers "does this image show <target>?":
- `ClipJudge` (zero-shot, real CLIP weights): yes when CLIP prefers "a photo of <target>" to the neutral
  "a photo of a <class>" (softmax over the two at CLIP's logit scale > 0.5);
- `CsvJudge`: human judgements from a CSV `image,target,success` (success 1/0, yes/no, true/false);
- the toy world's judge implements the same `Judge` interface.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from ..errors import PersonalizeError
from .protocols import EsrPrompt


class Judge(Protocol):
    def __call__(self, image: Image.Image, target: str, *, image_id: str = "") -> float:
        """1.0 when the image shows `target`, 0.0 when not (fractions allowed)."""


@dataclass
class EsrResult:
    overall: float
    per_prompt: dict[str, float] = field(default_factory=dict)
    n_images: int = 0


def editing_success_rate(images: dict[str, list[Image.Image]], prompts: list[EsrPrompt], judge: Judge) -> EsrResult:
    """`images[template]`: the samples (one per seed) drawn for that ESR prompt."""
    per_prompt, n = {}, 0
    for prompt in prompts:
        samples = images.get(prompt.template)
        if not samples:
            raise PersonalizeError(f"no images for the ESR prompt {prompt.template!r}")
        scores = []
        for i, image in enumerate(samples):
            ids = f"{prompt.template}#{i}"
            scores.append(sum(float(judge(image, t, image_id=ids)) for t in prompt.targets) / len(prompt.targets))
        per_prompt[prompt.template] = sum(scores) / len(scores)
        n += len(samples)
    return EsrResult(sum(per_prompt.values()) / len(per_prompt), per_prompt, n)


class ClipJudge:
    """Zero-shot: P("a photo of <target>" | image) against the neutral class prompt, thresholded at 0.5."""

    def __init__(self, scorer, class_word: str):
        self.scorer, self.neutral = scorer, f"a photo of a {class_word}"

    def __call__(self, image: Image.Image, target: str, *, image_id: str = "") -> float:
        image_emb = self.scorer.image_embeddings([image])
        text_emb = self.scorer.text_embeddings([f"a photo of {target}", self.neutral])
        logits = 100.0 * image_emb @ text_emb.T  # CLIP's trained logit scale is ~100
        return float(torch.softmax(logits, dim=-1)[0, 0] > 0.5)


class CsvJudge:
    """Human judgements: rows `image,target,success`; `image` matches the `image_id` the evaluator passes."""

    YES = {"1", "yes", "true", "y"}

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise PersonalizeError(f"judgement file {path} does not exist")
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"image", "target", "success"} <= rows[0].keys():
            raise PersonalizeError(f"{path}: expected a CSV with columns image,target,success")
        self.table = {(r["image"], r["target"]): r["success"].strip().lower() in self.YES for r in rows}
        self.path = path

    def __call__(self, image: Image.Image, target: str, *, image_id: str = "") -> float:
        try:
            return float(self.table[(image_id, target)])
        except KeyError:
            raise PersonalizeError(f"{self.path}: no judgement for image {image_id!r}, target {target!r}") from None
