"""The toy world's judge: a small CNN that reads every attribute of a 32×32 scene.

Trained on fresh renders (exact labels), it answers what a model drew: shape, colour, pattern, background, size,
position. It implements the evaluation `Judge` interface for targets written `attribute=value` (e.g.
`background=pink`) or as a bare value word (`pink`, `striped`, `star`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..errors import PersonalizeError
from .world import BACKGROUNDS, COLOURS, PATTERNS, POSITIONS, SHAPES, SIZES, random_scene, render

ATTRIBUTES = {
    "shape": list(SHAPES), "colour": list(COLOURS), "pattern": list(PATTERNS),
    "background": list(BACKGROUNDS), "size": list(SIZES), "position": list(POSITIONS),
}
WEIGHTS_DIR = Path(__file__).parent / "weights"


class JudgeNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        c = width
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * c * 16, 256), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


def _batch(rng: random.Random, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes = [random_scene(rng) for _ in range(n)]
    pixels = torch.from_numpy(np.stack([np.asarray(render(s)[0]) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = {k: torch.tensor([v.index(getattr(s, k)) for s in scenes]) for k, v in ATTRIBUTES.items()}
    return pixels, labels


def train_judge(output: str | Path = WEIGHTS_DIR / "judge.safetensors", steps: int = 2000, batch: int = 64,
                seed: int = 0, noise: float = 0.15, pool_size: int = 20_000) -> dict[str, float]:
    """Train on renders (with pixel noise and blur, so generated images are judged fairly); return the accuracy
    on 1,000 fresh renders."""
    from ..export import save_safetensors

    rng = random.Random(seed)
    torch.manual_seed(seed)
    pool_x, pool_y = _batch(rng, pool_size)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="judge", dynamic_ncols=True):
        rows = torch.randint(0, pool_size, (batch,))
        x, y = _augment(pool_x[rows], noise), {k: v[rows] for k, v in pool_y.items()}
        out = net(x)
        loss = sum(F.cross_entropy(out[k], y[k]) for k in ATTRIBUTES)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    net.eval()
    accuracy = evaluate_judge(net, random.Random(seed + 1), 1000)
    state = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    save_safetensors(Path(output), state, {"accuracy": json.dumps(accuracy), "steps": str(steps)})
    return accuracy


def _augment(x: torch.Tensor, noise: float) -> torch.Tensor:
    """Generated images are noisier and blurrier than renders: train the judge on such versions too."""
    blur = torch.rand(x.shape[0], 1, 1, 1) < 0.5
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(blur, blurred, x)
    return (x + noise * torch.rand(x.shape[0], 1, 1, 1) * torch.randn_like(x)).clamp(-1, 1)


@torch.no_grad()
def evaluate_judge(net: JudgeNet, rng: random.Random, n: int) -> dict[str, float]:
    x, y = _batch(rng, n)
    out = net(x)
    return {k: float((out[k].argmax(-1) == y[k]).float().mean()) for k in ATTRIBUTES}


class ToyJudge:
    """Reads attributes of images; also an ESR `Judge` (`judge(image, "background=pink")`)."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path = WEIGHTS_DIR / "judge.safetensors") -> "ToyJudge":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise PersonalizeError(f"toy judge weights {path} are missing; train them with `personalize toyworld train-judge`")
        net = JudgeNet()
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    @staticmethod
    def _pixels(images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.array(im.convert("RGB").resize((32, 32), Image.Resampling.BOX))).permute(2, 0, 1)
                            for im in images]).float() / 127.5 - 1

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> list[dict[str, str]]:
        out = self.net(self._pixels(images))
        return [{k: ATTRIBUTES[k][int(out[k][i].argmax())] for k in ATTRIBUTES} for i in range(len(images))]

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, 256] penultimate features: the toy world's CLIP/DINO/Inception embedding."""
        return self.net.features(self._pixels(images))

    def __call__(self, image: Image.Image, target: str, *, image_id: str = "") -> float:
        attribute, value = parse_target(target)
        return float(self.predict([image])[0][attribute] == value)


def parse_target(target: str) -> tuple[str, str]:
    """`attribute=value`, or a bare value word that names exactly one attribute's value."""
    if "=" in target:
        attribute, value = (part.strip() for part in target.split("=", 1))
        if attribute not in ATTRIBUTES or value not in ATTRIBUTES[attribute]:
            raise PersonalizeError(f"unknown toy-world target {target!r}")
        return attribute, value
    matches = [(k, target) for k, values in ATTRIBUTES.items() if target in values]
    if len(matches) != 1:
        raise PersonalizeError(f"toy-world target {target!r} is ambiguous or unknown; write it as attribute=value")
    return matches[0]
