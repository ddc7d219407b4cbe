"""LPIPS v0.1 (AlexNet trunk) and DIV, the mean pairwise LPIPS of one prompt's samples."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...errors import PersonalizeError
from .common import _batches, file_sha256

LPIPS_HEADS_FILE = Path(__file__).resolve().parents[2] / "assets" / "lpips" / "alex_v0.1.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


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
