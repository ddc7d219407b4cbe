"""FID: Inception-v3 pool3 features and the Fréchet distance of their Gaussian statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ...errors import PersonalizeError
from .common import _LOG, _batches, file_sha256

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


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
