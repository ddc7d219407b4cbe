"""DINO: self-supervised ViT image embeddings (the CLS token) for DreamBooth's DINO metric."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ...errors import PersonalizeError
from .common import (ModelSource, _batches, _preprocessor_config, _source_provenance, mean_pairwise_cosine,
                     preprocess_images, resolve_pretrained)

# ImageNet's, which DINO was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoScorer:
    """DINO ViT image embeddings: the CLS token of the last layer (after the final LayerNorm), L2-normalised.

    Why not `pooler_output`: DINO was trained self-supervised without a pooler head; transformers' ViTModel adds
    a dense+tanh "pooler" that facebook/dino-vit* checkpoints do not contain, so it would be *randomly
    initialised* and the score meaningless. DINO's own `forward` returns exactly `norm(x)[:, 0]`, i.e.
    `last_hidden_state[:, 0]`.

    Preprocessing: shorter side to the model's image size (224; bicubic, Pillow), centre crop 224, ImageNet
    mean/std. For square images (all generated ones and most references) this is the same geometry as the hub
    checkpoints' ViTImageProcessor (a plain 224 x 224 resize; theirs may use a bilinear filter); DINO's own
    k-NN evaluation instead resizes to 256 and crops 224, which zooms in by 12 % — pass `resize_to=256` for that.
    """

    def __init__(self, model, *, image_size: int | None = None, resize_to: int | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 device: str | torch.device = "cpu", batch_size: int = 32, source: ModelSource | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.image_size = int(image_size or model.config.image_size)
        self.resize_to = int(resize_to or self.image_size)
        if self.resize_to < self.image_size:
            raise ValueError(f"resize_to ({self.resize_to}) must be at least the crop size ({self.image_size})")
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = batch_size
        self.source = source
        self._sha256: str | None = None

    @classmethod
    def load(cls, path_or_id: str | Path, allow_download: bool = False, *, device: str | torch.device = "cpu",
             option: str = "--dino-model", resize_to: int | None = None) -> "DinoScorer":
        """A DINO ViT (e.g. facebook/dino-vits16, DreamBooth's choice) from a local folder or hub id."""
        source = resolve_pretrained(path_or_id, allow_download=allow_download, what="DINO ViT", option=option)
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(source.load_from, local_files_only=not allow_download)
            extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}  # no pooler in DINO weights
            model = AutoModel.from_pretrained(source.load_from, local_files_only=not allow_download, **extra)
        except (OSError, ValueError) as exc:
            raise PersonalizeError(f"{option} {path_or_id}: cannot load a ViT model from it ({exc})") from exc
        pre = _preprocessor_config(source)
        return cls(model, mean=pre.get("image_mean", IMAGENET_MEAN), std=pre.get("image_std", IMAGENET_STD),
                   device=device, source=source, resize_to=resize_to)

    def provenance(self) -> dict:
        return {
            **_source_provenance(self),
            "preprocessing": f"short side {self.resize_to} bicubic (Pillow), centre crop {self.image_size}, "
                             f"mean {list(self.mean)}, std {list(self.std)}",
            "embedding": "last_hidden_state[:, 0] (CLS after final LayerNorm), L2-normalised",
        }

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, D] unit vectors of the CLS token."""
        out = []
        for batch in _batches(list(images), self.batch_size):
            pixels = preprocess_images(batch, self.resize_to, self.mean, self.std)
            if self.resize_to != self.image_size:
                offset = (self.resize_to - self.image_size) // 2
                pixels = pixels[:, :, offset : offset + self.image_size, offset : offset + self.image_size]
            hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state
            out.append(hidden[:, 0].float().cpu())
        if not out:
            raise PersonalizeError("no images to embed")
        return F.normalize(torch.cat(out), dim=-1)

    def dino(self, generated: Sequence[Image.Image], reference: Sequence[Image.Image]) -> float:
        """DINO: mean cosine over all (generated, reference) pairs of CLS embeddings."""
        return mean_pairwise_cosine(self.image_embeddings(generated), self.image_embeddings(reference))
