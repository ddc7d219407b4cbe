"""CLIP: image and text embeddings for CLIP-I and CLIP-T, and the prompt conventions CLIP-T is read with."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ...errors import PersonalizeError
from .common import (ModelSource, _batches, _pooled, _preprocessor_config, _source_provenance, mean_pairwise_cosine,
                     preprocess_images, resolve_pretrained)

# OpenAI CLIP's normalisation (also every open_clip / HF CLIP preprocessor_config.json of the ViT-B/L models).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def prompt_for_clip_t(prompt: str, placeholder: str, mode: str = "remove", class_word: str | None = None) -> str:
    """The text CLIP-T compares an image with, derived from the generation prompt.

    CLIP has never seen the learned placeholder token, so papers differ: "remove" drops it ("a photo of <x> on
    the beach" -> "a photo of on the beach"; whitespace runs collapse to one space and a space left before
    , . ; : ! ? is dropped), "class" replaces it with the class word ("a photo of cat on the beach"), "keep"
    leaves the prompt as is (CLIP's BPE then reads the placeholder as ordinary characters).
    """
    if mode not in ("remove", "keep", "class"):
        raise ValueError(f"mode must be 'remove', 'keep' or 'class', got {mode!r}")
    if placeholder not in prompt:
        raise PersonalizeError(f"the prompt {prompt!r} does not contain the placeholder {placeholder!r}")
    if mode == "keep":
        return prompt
    if mode == "class":
        if not class_word:
            raise PersonalizeError("CLIP-T prompt mode 'class' needs the class word (e.g. 'dog')")
        replacement = class_word
    else:
        replacement = ""
    text = re.sub(r"\s+", " ", prompt.replace(placeholder, replacement)).strip()
    return re.sub(r" ([,.;:!?])", r"\1", text)


CLIP_T_TEXTS = {  # prompt_for_clip_t's modes, as the report words them
    "remove": "subject removed from the prompt", "class": "subject replaced by the class word",
    "keep": "prompt as drawn",
}
CLIP_T_CONVENTIONS = {
    "raw": "mean cos(image_i, prompt_i)",
    "clipscore": 'CLIPScore (Hessel et al. 2021, reference code): '
                 'mean 2.5*max(cos(image_i, "A photo depicts " + prompt_i), 0)',
}
CLIPSCORE_PREFIX = "A photo depicts "


def clip_t_caption(text: str, convention: str) -> str:
    """The caption CLIP reads under a CLIP-T convention. CLIPScore's reference code (clipscore.py, which BaTex
    says it uses) puts "A photo depicts " before every candidate caption, so its scores need the prefix too."""
    return CLIPSCORE_PREFIX + text if convention == "clipscore" else text


def clip_t_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, convention: str = "raw") -> float:
    """CLIP-T from paired embeddings (row i of each belongs to sample i).

    raw:       mean_i cos(I_i, T_i)
    clipscore: mean_i 2.5 * max(cos(I_i, T_i), 0)   (Hessel et al.; w = 2.5 stretches the typical 0..0.4 range)
    """
    if convention not in CLIP_T_CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(CLIP_T_CONVENTIONS)}, got {convention!r}")
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"need one text per image: got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if len(image_emb) == 0:
        raise PersonalizeError("CLIP-T needs at least one image")
    cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    if convention == "clipscore":
        cos = 2.5 * cos.clamp(min=0.0)
    return float(cos.mean())


class ClipScorer:
    """CLIP image and text embeddings (L2-normalised, after CLIP's projection) for CLIP-I and CLIP-T.

    Preprocessing: shorter side to the model's image size (bicubic, Pillow), centre crop, x/255, CLIP mean/std
    (or the model folder's preprocessor_config.json values): the same as transformers' CLIPImageProcessor on
    PIL input. Text: CLIP's tokenizer, truncated to 77 tokens (longer prompts are cut, as in CLIP itself).
    """

    def __init__(self, model, tokenizer, *, image_size: int | None = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, device: str | torch.device = "cpu", batch_size: int = 32,
                 source: ModelSource | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = batch_size
        self.source = source
        self._sha256: str | None = None

    @classmethod
    def load(cls, path_or_id: str | Path, allow_download: bool = False, *, device: str | torch.device = "cpu",
             option: str = "--clip-model") -> "ClipScorer":
        """A CLIPModel + tokenizer from a local folder or hub id (e.g. openai/clip-vit-large-patch14).

        Fails in well under a second, naming `option`, when nothing is there; only then imports transformers.
        """
        source = resolve_pretrained(path_or_id, allow_download=allow_download, what="CLIP", option=option)
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(source.load_from, local_files_only=not allow_download)
            tokenizer = AutoTokenizer.from_pretrained(source.load_from, local_files_only=not allow_download)
        except (OSError, ValueError) as exc:
            raise PersonalizeError(f"{option} {path_or_id}: cannot load a CLIP model and tokenizer from it ({exc})") from exc
        pre = _preprocessor_config(source)
        return cls(model, tokenizer, mean=pre.get("image_mean", CLIP_MEAN), std=pre.get("image_std", CLIP_STD),
                   device=device, source=source)

    def provenance(self) -> dict:
        """Model, revision, weights sha256 (hashed once, lazily: gigabytes) and preprocessing, for MetricResult."""
        return {
            **_source_provenance(self),
            "preprocessing": f"short side {self.image_size} bicubic (Pillow), centre crop {self.image_size}, "
                             f"mean {list(self.mean)}, std {list(self.std)}",
            "embedding": "projected pooled output, L2-normalised",
        }

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, D] unit vectors."""
        out = []
        for batch in _batches(list(images), self.batch_size):
            pixels = preprocess_images(batch, self.image_size, self.mean, self.std).to(self.device)
            out.append(_pooled(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        if not out:
            raise PersonalizeError("no images to embed")
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """[N, D] unit vectors."""
        max_length = min(int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        out = []
        for batch in _batches(list(prompts), self.batch_size):
            tokens = self.tokenizer(list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device))
            out.append(_pooled(features).float().cpu())
        if not out:
            raise PersonalizeError("no prompts to embed")
        return F.normalize(torch.cat(out), dim=-1)

    def clip_i(self, generated: Sequence[Image.Image], reference: Sequence[Image.Image]) -> float:
        """CLIP-I: mean cosine over all (generated, reference) pairs of image embeddings."""
        return mean_pairwise_cosine(self.image_embeddings(generated), self.image_embeddings(reference))

    def clip_t(self, images: Sequence[Image.Image], prompts: Sequence[str], convention: str = "raw") -> float:
        """CLIP-T: image i against prompt i (see `clip_t_from_embeddings` for the two conventions).

        Hessel et al.'s reference code also prefixes every caption with "A photo depicts"; this does not: pass
        the captions you mean to score (see `prompt_for_clip_t` and `clip_t_caption`).
        """
        if len(images) != len(prompts):
            raise PersonalizeError(f"CLIP-T needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        return clip_t_from_embeddings(self.image_embeddings(images), self.text_embeddings(prompts), convention)
