"""What every metric shares: the result type with its provenance, cosine similarity, image preprocessing, and
where pretrained networks are read from (without importing transformers until one is really loaded)."""

from __future__ import annotations

import hashlib
import logging
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...errors import PersonalizeError

_LOG = logging.getLogger("personalize.evaluate")

_VERSIONED_LIBRARIES = ("personalize", "torch", "transformers", "numpy", "Pillow")


def _torch_build() -> str:
    import torch

    return torch.__version__


def library_versions(names: Sequence[str] = _VERSIONED_LIBRARIES) -> dict[str, str]:
    """Versions of the libraries a figure depends on (a changed resize kernel changes the numbers)."""
    versions = {}
    for name in names:
        try:
            # torch's own version names the build that ran ("2.14.1+cu130"); its wheel's metadata may drop that tag.
            versions[name] = _torch_build() if name == "torch" else metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (model files are gigabytes): identifies the exact weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class MetricResult:
    """One reported figure and everything needed to reproduce or compare it.

    `convention` is the short human-readable rule (e.g. "clipscore: mean 2.5*max(cos,0)"); `origin` says on whose
    word each part of that rule stands: {"protocol", "paper": {aspect: the paper's words}, "ours": {aspect: our
    choice where the paper is silent}, "user": {aspect: the flag that overrode it}}; `provenance` holds the model
    (path or hub id, revision, weights sha256), preprocessing and any other settings; `versions` the library
    versions at the time it was computed.
    """

    name: str
    value: float
    n: int
    convention: str = ""
    provenance: dict = field(default_factory=dict)
    versions: dict = field(default_factory=library_versions)
    origin: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- cosine similarity


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, D] x [M, D] -> [N, M] of cos(a_i, b_j) = a_i·b_j / (|a_i| |b_j|), computed in float32."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cosine_matrix needs [N, D] and [M, D] tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    return a @ b.T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_j) over all N*M pairs: the CLIP-I / DINO convention of DreamBooth (every generated image
    against every reference image). When `a` and `b` are the same set the diagonal (each image with itself, = 1)
    is included."""
    if len(a) == 0 or len(b) == 0:
        raise PersonalizeError("a similarity needs at least one image on each side, got an empty set")
    return float(cosine_matrix(a, b).mean())


# --------------------------------------------------------------------------------------------- preprocessing


def _resize_center_crop(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize so the shorter side is `size`, then centre-crop `size` x `size`.

    Same arithmetic as transformers' CLIPImageProcessor with PIL input: long side = floor(size * long / short),
    crop offset = floor((side - size) / 2), Pillow resize without `reducing_gap` (exact, antialiased filter).
    """
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    image = image.resize((new_w, new_h), resample=resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess_images(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resample: int = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """PIL images -> float32 [N, 3, size, size]: short side to `size`, centre crop, x/255, (x - mean) / std."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    arrays = [np.asarray(_resize_center_crop(im.convert("RGB"), size, resample), dtype=np.float32) for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (pixels - mean_t) / std_t


def _pooled(output) -> torch.Tensor:
    """transformers 4.x `get_*_features` returns the projected tensor; 5.x an output object whose
    `pooler_output` holds it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# --------------------------------------------------------------------------------------------- model sources

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelSource:
    """Where a pretrained model is read from: `load_from` is what from_pretrained gets."""

    name: str  # what the user gave
    load_from: str  # a local folder, or the hub id when it will be downloaded
    revision: str | None = None  # the hub snapshot (commit) when it came from the cache
    local_dir: Path | None = None


def _missing_weights(folder: Path) -> bool:
    return not any((folder / name).is_file() for name in _WEIGHT_FILES)


def resolve_pretrained(path_or_id: str | Path, *, allow_download: bool, what: str, option: str) -> ModelSource:
    """Find a transformers model folder or hub id *without importing transformers*, or fail naming what to give.

    A path that exists is used as is (it must hold config.json and a weights file). Something that looks like a
    hub id ("org/name") is looked up in the local Hugging Face cache; if absent it is downloaded only when
    `allow_download`. Anything else is reported as a missing path.
    """
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PersonalizeError(f"{option} {path}: expected a {what} model folder (config.json + weights), got a file")
        if not (path / "config.json").is_file():
            raise PersonalizeError(
                f"{option} {path}: no config.json; give a {what} folder saved by transformers' save_pretrained"
            )
        if _missing_weights(path):
            raise PersonalizeError(f"{option} {path}: no weights file (one of {', '.join(_WEIGHT_FILES)})")
        return ModelSource(text, str(path), None, path)
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise PersonalizeError(f"{option} {text}: no such folder; give the path of a {what} model folder or a hub id")
    from huggingface_hub import try_to_load_from_cache  # light (no torch models): keeps the failure fast

    cached = try_to_load_from_cache(text, "config.json")
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        if not _missing_weights(snapshot):
            return ModelSource(text, str(snapshot), snapshot.name, snapshot)
    if allow_download:
        return ModelSource(text, text)
    raise PersonalizeError(
        f"{option} {text}: not a folder, and the {what} model {text!r} is not in the local Hugging Face cache; "
        f"download it (`huggingface-cli download {text}`), give a local folder, or allow downloading"
    )


def _preprocessor_config(source: ModelSource) -> dict:
    """The model's preprocessor_config.json (image_mean / image_std), or {} when there is none."""
    if source.local_dir is None or not (source.local_dir / "preprocessor_config.json").is_file():
        return {}
    import json

    try:
        return json.loads((source.local_dir / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return {}


def _weights_sha256(source: ModelSource | None) -> str | None:
    """sha256 of the (first) weights file of a local model folder: pins the exact weights in the report."""
    if source is None or source.local_dir is None:
        return None
    for name in _WEIGHT_FILES:
        if (source.local_dir / name).is_file():
            return file_sha256(source.local_dir / name)
    return None


def _source_provenance(scorer) -> dict:
    """Model, revision and weights sha256 of a CLIP/DINO scorer (hashed once, lazily: gigabytes)."""
    if scorer._sha256 is None:
        scorer._sha256 = _weights_sha256(scorer.source) or ""
    return {
        "model": scorer.source.name if scorer.source else f"in-memory {type(scorer.model).__name__}",
        "revision": scorer.source.revision if scorer.source else None,
        "weights_sha256": scorer._sha256 or None,
    }


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
