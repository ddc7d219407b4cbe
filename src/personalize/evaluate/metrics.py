"""The papers' image metrics, each with a stated convention: CLIP-I, CLIP-T, DINO, their masked variants, LPIPS
diversity (DIV) and FID.

Every metric here is a function of embeddings that a pretrained network computes, so each number is only as
meaningful as the record of *which* network, *which* preprocessing and *which* convention produced it: two
papers' "CLIP-T" can differ by a factor of 2.5. `MetricResult` carries that record into the report.

No pretrained weights ship with this package (apart from LPIPS's 6 kB linear heads, BSD-2, see
`assets/lpips/LICENSE`): CLIP, DINO, AlexNet and Inception come from a local path or Hugging Face hub id that the
user gives. A missing file fails at once with a `PersonalizeError` naming what to provide, before transformers is
imported (importing it takes seconds). Hub ids are only read from the local cache unless `allow_download=True`.

torchvision is deliberately not used: image preprocessing is done here with Pillow (bicubic, antialiased, which is
what the reference preprocessors do for PIL input), AlexNet's feature layers are rebuilt with torchvision's exact
layout, and Inception is NVIDIA's self-contained TorchScript file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data import MASK_THRESHOLD
from ..errors import PersonalizeError

_LOG = logging.getLogger("personalize.evaluate")

# OpenAI CLIP's normalisation (also every open_clip / HF CLIP preprocessor_config.json of the ViT-B/L models).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet's, which DINO was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LPIPS_HEADS_FILE = Path(__file__).resolve().parent.parent / "assets" / "lpips" / "alex_v0.1.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"

_VERSIONED_LIBRARIES = ("personalize", "torch", "transformers", "numpy", "Pillow")


# --------------------------------------------------------------------------------------------- provenance


def library_versions(names: Sequence[str] = _VERSIONED_LIBRARIES) -> dict[str, str]:
    """Versions of the libraries a figure depends on (a changed resize kernel changes the numbers)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
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

    `convention` is the short human-readable rule (e.g. "clipscore: mean 2.5*max(cos,0)"); `provenance` holds the
    model (path or hub id, revision, weights sha256), preprocessing and any other settings; `versions` the library
    versions at the time it was computed.
    """

    name: str
    value: float
    n: int
    convention: str = ""
    provenance: dict = field(default_factory=dict)
    versions: dict = field(default_factory=library_versions)


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


# --------------------------------------------------------------------------------------------- CLIP


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


CLIP_T_CONVENTIONS = {
    "raw": "mean cos(image_i, prompt_i)",
    "clipscore": "CLIPScore (Hessel et al. 2021): mean 2.5*max(cos(image_i, prompt_i), 0)",
}


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
        the prompts you mean to score (see `prompt_for_clip_t`).
        """
        if len(images) != len(prompts):
            raise PersonalizeError(f"CLIP-T needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        return clip_t_from_embeddings(self.image_embeddings(images), self.text_embeddings(prompts), convention)


# --------------------------------------------------------------------------------------------- DINO


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


# --------------------------------------------------------------------------------------------- masks


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


# --------------------------------------------------------------------------------------------- LPIPS


class AlexNetFeatures(nn.Module):
    """torchvision's `alexnet().features`, same layers and state-dict names (features.0/3/6/8/10), so torchvision's
    alexnet-owt-7be5be79.pth loads into it unchanged. ReLUs are not in-place (the taps must survive)."""

    TAPS = (1, 4, 7, 9, 11)  # outputs of relu1..relu5, LPIPS's five layers

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
            nn.ReLU(),  # 1  relu1
            nn.MaxPool2d(kernel_size=3, stride=2),  # 2
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
            nn.ReLU(),  # 4  relu2
            nn.MaxPool2d(kernel_size=3, stride=2),  # 5
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
            nn.ReLU(),  # 7  relu3
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
            nn.ReLU(),  # 9  relu4
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
            nn.ReLU(),  # 11 relu5
            nn.MaxPool2d(kernel_size=3, stride=2),  # 12 (unused by LPIPS; kept for the exact layout)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.TAPS:
                taps.append(x)
                if index == self.TAPS[-1]:
                    break
        return taps


def _alexnet_state_dict(raw: dict, path: Path) -> dict:
    """Keys of torchvision's full model ("features.N.*", classifier ignored), bare ("N.*"), or the lpips
    package's ("net.sliceK.N.*") -> "features.N.*"."""
    out = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")
        match = re.match(r"^(?:features\.|net\.slice\d\.)?(\d+)\.(weight|bias)$", key)
        if match:
            out[f"features.{match.group(1)}.{match.group(2)}"] = value
    expected = {f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")}
    if not expected <= out.keys():
        raise PersonalizeError(
            f"--lpips-backbone {path}: not an AlexNet state dict (missing {sorted(expected - out.keys())}); "
            f"give torchvision's {ALEXNET_URL.rsplit('/', 1)[-1]}"
        )
    return {k: out[k] for k in expected}


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018), without torchvision.

    d(x, y) = Σ_l mean_hw( w_l · (f̂_l(x) - f̂_l(y))² ),  f̂_l = f_l / (‖f_l‖_channels + 1e-10)

    where f_l are AlexNet's relu1..relu5 outputs of the scaled input (x - shift) / scale and w_l ≥ 0 the learned
    1x1 linear heads (`lin{l}.model.1.weight`, shipped from the lpips package). Inputs are [N, 3, H, W] in [-1, 1].
    """

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self, backbone: AlexNetFeatures | None = None, heads: str | Path | dict | None = LPIPS_HEADS_FILE,
                 source: str | None = None):
        super().__init__()
        self.net = backbone if backbone is not None else AlexNetFeatures()  # random trunk: tests only
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))
        for k, channels in enumerate(self.CHANNELS):
            # lpips's NetLinLayer is Sequential(Dropout, Conv2d); Identity keeps the "model.1" key, no dropout.
            head = nn.Module()
            head.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))
            setattr(self, f"lin{k}", head)
        if heads is not None:
            state = heads if isinstance(heads, dict) else torch.load(heads, map_location="cpu", weights_only=True)
            self.load_heads(state)
        self.source = source
        self.requires_grad_(False)
        self.eval()

    def load_heads(self, state: dict) -> None:
        for k in range(len(self.CHANNELS)):
            getattr(self, f"lin{k}").model[1].weight.data.copy_(state[f"lin{k}.model.1.weight"])

    @classmethod
    def load(cls, backbone_path: str | Path, heads: str | Path = LPIPS_HEADS_FILE) -> "LPIPS":
        """LPIPS with torchvision's ImageNet AlexNet weights read from `backbone_path` (weights_only)."""
        path = Path(backbone_path).expanduser()
        if not path.is_file():
            raise PersonalizeError(
                f"--lpips-backbone {path}: no such file; give torchvision's AlexNet weights "
                f"({ALEXNET_URL})"
            )
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle / zip errors come in many types
            raise PersonalizeError(f"--lpips-backbone {path}: cannot be read as a PyTorch state dict ({exc})") from exc
        if not isinstance(raw, dict):
            raise PersonalizeError(f"--lpips-backbone {path}: expected a state dict, got {type(raw).__name__}")
        backbone = AlexNetFeatures()
        try:
            backbone.load_state_dict(_alexnet_state_dict(raw, path))
        except RuntimeError as exc:  # wrong shapes
            raise PersonalizeError(f"--lpips-backbone {path}: not AlexNet's weights ({exc})") from exc
        return cls(backbone, heads, source=str(path))

    def provenance(self) -> dict:
        return {
            "backbone": self.source or "in-memory (random) AlexNet",
            "backbone_sha256": file_sha256(self.source) if self.source else None,
            "heads": "lpips 0.1.4 weights/v0.1/alex.pth",
            "heads_sha256": file_sha256(LPIPS_HEADS_FILE),
        }

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Channel-unit-normalised relu1..5 features of [N, 3, H, W] images in [-1, 1]."""
        taps = self.net((x - self.shift) / self.scale)
        return [t / (torch.sqrt(torch.sum(t**2, dim=1, keepdim=True)) + 1e-10) for t in taps]

    def distance_from_features(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        """[N] distances from `features` outputs (broadcasts, so one image's features against many)."""
        total = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            total = total + getattr(self, f"lin{k}").model((a - b) ** 2).mean(dim=(2, 3))
        return total[:, 0]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[N] LPIPS distances between x[i] and y[i]."""
        return self.distance_from_features(self.features(x), self.features(y))


def images_to_tensor(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> float32 [N, 3, H, W] in [-1, 1] (x/127.5 - 1); all the same size unless `size` resizes them
    (bicubic) to size x size."""
    images = [im.convert("RGB") for im in images]
    if size is not None:
        images = [im.resize((size, size), Image.Resampling.BICUBIC) for im in images]
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise PersonalizeError(f"images of different sizes {sorted(sizes)}: pass a common size to resize them to")
    arrays = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arrays / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def mean_pairwise_lpips(images: Sequence[Image.Image], lpips: LPIPS, size: int | None = None,
                        batch_size: int = 16) -> float:
    """Mean LPIPS over all n(n-1)/2 unordered pairs of `images` (the trunk runs once per image)."""
    if len(images) < 2:
        raise PersonalizeError(f"LPIPS diversity needs at least 2 images per prompt, got {len(images)}")
    sizes = {im.size for im in images}
    if size is None and len(sizes) > 1:
        raise PersonalizeError(f"images of different sizes {sorted(sizes)}: pass a common size to resize them to")
    feats: list[list[torch.Tensor]] = []
    for batch in _batches(list(images), batch_size):
        feats.append(lpips.features(images_to_tensor(batch, size)))
    per_tap = [torch.cat([f[k] for f in feats]) for k in range(len(feats[0]))]
    total, count = 0.0, 0
    for i in range(len(images) - 1):
        for start in range(i + 1, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            d = lpips.distance_from_features([t[i : i + 1] for t in per_tap], [t[start:stop] for t in per_tap])
            total += float(d.double().sum())
            count += stop - start
    return total / count


def div_lpips(images_per_prompt: Sequence[Sequence[Image.Image]], lpips: LPIPS, size: int | None = None) -> float:
    """DIV (Dis²Booth, after DreamBooth's diversity metric): mean over prompts of the mean pairwise LPIPS between
    that prompt's samples. Higher = more varied generations; identical samples give 0."""
    if not images_per_prompt:
        raise PersonalizeError("DIV needs at least one prompt's images")
    return float(np.mean([mean_pairwise_lpips(images, lpips, size) for images in images_per_prompt]))


# --------------------------------------------------------------------------------------------- FID


class InceptionFeatures:
    """2048-d pool3 features of the Inception-v3 that FID is defined with (TF's 2015-12-05 graph).

    `model` is the path of NVIDIA's TorchScript port `inception-2015-12-05.pt` (StyleGAN2-ADA/3 metrics, also
    used by clean-fid; download from INCEPTION_URL), or — for tests — any callable mapping a uint8
    [N, 3, S, S] tensor to [N, D] features.

    Preprocessing: the whole image is resized (not cropped) to 299 x 299 with Pillow's antialiased bicubic —
    clean-fid's "clean" resize, except that Pillow resizes the 8-bit image rather than each channel in float
    (a difference below one grey level) — and given to the network as uint8 0..255; the network normalises
    internally.
    """

    def __init__(self, model: str | Path | Callable[[torch.Tensor], torch.Tensor], *, image_size: int = 299,
                 batch_size: int = 32, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.image_size = image_size
        self.batch_size = batch_size
        self.path: Path | None = None
        if isinstance(model, (str, os.PathLike)):
            path = Path(model).expanduser()
            if not path.is_file():
                raise PersonalizeError(
                    f"--inception {path}: no such file; give the TorchScript Inception inception-2015-12-05.pt "
                    f"({INCEPTION_URL})"
                )
            try:
                network = torch.jit.load(str(path), map_location=self.device).eval()
            except Exception as exc:  # TorchScript raises RuntimeError / zip errors for other files
                raise PersonalizeError(f"--inception {path}: not a TorchScript model ({exc})") from exc
            self.path = path
            self._fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: network(x, return_features=True)
        elif callable(model):
            self._fn = model
        else:
            raise TypeError(f"model must be a path or a callable, got {type(model).__name__}")

    def provenance(self) -> dict:
        return {
            "model": str(self.path) if self.path else "in-memory callable",
            "weights_sha256": file_sha256(self.path) if self.path else None,
            "preprocessing": f"resize to {self.image_size}x{self.image_size} bicubic (Pillow, uint8), no crop",
        }

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, D] float64 features."""
        out = []
        for batch in _batches(list(images), self.batch_size):
            arrays = [np.asarray(im.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC))
                      for im in batch]
            pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(self.device)
            out.append(self._fn(pixels).reshape(len(batch), -1).double().cpu())
        if not out:
            raise PersonalizeError("no images for FID")
        return torch.cat(out)


def _as_float64(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigendecomposition (rounding's tiny negative eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, S1) and N(mu2, S2):

        ||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

    tr((S1 S2)^{1/2}) = Σ sqrt(eig(S1^{1/2} S2 S1^{1/2})): S1 S2 and S1^{1/2} S2 S1^{1/2} have the same eigenvalues,
    and the latter is symmetric PSD, so a symmetric eigendecomposition gives them exactly and stably — no
    scipy.linalg.sqrtm of a non-symmetric product, no "add eps to the diagonal" fallback. float64 throughout.
    """
    mu1, mu2 = _as_float64(mu1).ravel(), _as_float64(mu2).ravel()
    s1, s2 = _as_float64(sigma1), _as_float64(sigma2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched shapes: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # a squared distance: rounding can leave -1e-12 for identical statistics


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of [N, D] features, float64 — what pytorch-fid and clean-fid compute."""
    x = _as_float64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise PersonalizeError(f"FID needs at least 2 feature vectors [N, D], got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


@dataclass
class FidResult:
    """FID and the sample sizes it came from: FID is biased upwards for small N (and the covariance is
    rank-deficient when N < D = 2048), so values are only comparable at equal N."""

    fid: float
    n_a: int
    n_b: int

    def __float__(self) -> float:
        return self.fid


def fid(features_a, features_b) -> FidResult:
    """FID between two sets of [N, D] features (e.g. generated vs held-out real images)."""
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    if mu_a.shape != mu_b.shape:
        raise PersonalizeError(f"feature sizes differ: {mu_a.shape[0]} and {mu_b.shape[0]}")
    n_a, n_b = len(features_a), len(features_b)
    if min(n_a, n_b) < mu_a.shape[0]:
        _LOG.warning("FID from %d and %d samples of %d-d features: the covariances are rank-deficient and the "
                     "value is biased upwards; compare only with FIDs at the same N", n_a, n_b, mu_a.shape[0])
    return FidResult(frechet_distance(mu_a, sigma_a, mu_b, sigma_b), n_a, n_b)


__all__ = [
    "ALEXNET_URL", "CLIP_MEAN", "CLIP_STD", "CLIP_T_CONVENTIONS", "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_URL",
    "LPIPS_HEADS_FILE", "AlexNetFeatures", "ClipScorer", "DinoScorer", "FidResult", "InceptionFeatures", "LPIPS",
    "MetricResult", "ModelSource", "apply_mask", "clip_i_masked", "clip_t_from_embeddings", "cosine_matrix",
    "dino_masked", "div_lpips", "feature_statistics", "fid", "file_sha256", "frechet_distance", "images_to_tensor",
    "library_versions", "masked_similarity", "mean_pairwise_cosine", "mean_pairwise_lpips", "preprocess_images",
    "prompt_for_clip_t", "resolve_pretrained",
]
