"""The papers' image metrics, each with a stated convention: CLIP-I, CLIP-T, DINO, their masked variants, LPIPS
diversity (DIV) and FID.

Every metric here is a function of embeddings that a pretrained network computes, so each number is only as
meaningful as the record of *which* network, *which* preprocessing and *which* convention produced it: two
papers' "CLIP-T" can differ by a factor of 2.5. `MetricResult` carries that record into the report.

One file per network, as peft keeps one folder per tuner: `clip.py` (CLIP-I, CLIP-T), `dino.py`, `lpips.py` (DIV),
`fid.py`; `masks.py` masks images for the -f/-b variants of any of them; `common.py` holds what they share — the
result type `MetricResult`, cosine similarity, preprocessing and where a pretrained network is read from. Callers
use this package as one namespace (`from personalize.evaluate import metrics as M; M.ClipScorer`).

No pretrained weights ship with this package (apart from LPIPS's 6 kB linear heads, BSD-2, see
`assets/lpips/LICENSE`): CLIP, DINO, AlexNet and Inception come from a local path or Hugging Face hub id that the
user gives. A missing file fails at once with a `PersonalizeError` naming what to provide, before transformers is
imported (importing it takes seconds). Hub ids are only read from the local cache unless `allow_download=True`.

torchvision is deliberately not used: image preprocessing is done here with Pillow (bicubic, antialiased, which is
what the reference preprocessors do for PIL input), AlexNet's feature layers are rebuilt with torchvision's exact
layout, and Inception is NVIDIA's self-contained TorchScript file.
"""

from .clip import (CLIP_MEAN, CLIP_STD, CLIP_T_CONVENTIONS, CLIP_T_TEXTS, CLIPSCORE_PREFIX, ClipScorer, clip_t_caption,
                   clip_t_from_embeddings, prompt_for_clip_t)
from .common import (MetricResult, ModelSource, cosine_matrix, file_sha256, library_versions, mean_pairwise_cosine,
                     preprocess_images, resolve_pretrained)
from .dino import IMAGENET_MEAN, IMAGENET_STD, DinoScorer
from .fid import INCEPTION_URL, FidResult, InceptionFeatures, feature_statistics, fid, frechet_distance
from .fid import _sqrt_psd  # noqa: F401 - tested directly
from .lpips import (ALEXNET_URL, LPIPS, LPIPS_HEADS_FILE, AlexNetFeatures, div_lpips, images_to_tensor,
                    mean_pairwise_lpips)
from .masks import apply_mask, clip_i_masked, dino_masked, masked_similarity

__all__ = [
    "ALEXNET_URL", "CLIPSCORE_PREFIX", "CLIP_MEAN", "CLIP_STD", "CLIP_T_CONVENTIONS", "CLIP_T_TEXTS", "IMAGENET_MEAN",
    "IMAGENET_STD", "INCEPTION_URL", "LPIPS_HEADS_FILE", "AlexNetFeatures", "ClipScorer", "DinoScorer", "FidResult",
    "InceptionFeatures", "LPIPS", "MetricResult", "ModelSource", "apply_mask", "clip_i_masked", "clip_t_caption",
    "clip_t_from_embeddings", "cosine_matrix", "dino_masked", "div_lpips", "feature_statistics", "fid", "file_sha256",
    "frechet_distance", "images_to_tensor", "library_versions", "masked_similarity", "mean_pairwise_cosine",
    "mean_pairwise_lpips", "preprocess_images", "prompt_for_clip_t", "resolve_pretrained",
]
