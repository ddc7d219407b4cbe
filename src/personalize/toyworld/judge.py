"""The toy world's judge: a small CNN that reads every attribute of every object of a 64×64 scene.

Trained on fresh renders (exact labels), it answers what a model drew. One network reads the whole image
(not crops): how many objects there are (`objects`: one or two), the background, the lone object's shape, colour,
pattern, size and position, and, in a two-object scene, the left and the right object's shape, colour, pattern and
size. Each answer is a head of its own; a slot that does not apply to the scene is left out of the loss in
training and answered `None` in a reading, so a two-object picture never counts as showing a lone concept.

A reading is a dict: `objects`, `background`, `shape`, `colour`, `pattern`, `size`, `position` (None in a
two-object scene) and `left` / `right` (each a dict of shape, colour, pattern, size; None in a one-object scene).
It implements the evaluation `Judge` interface for targets written `attribute=value` (e.g. `background=pink`)
or as a bare value word (`pink`, `striped`, `star`).
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
from .world import BACKGROUNDS, COLOURS, PATTERNS, POSITIONS, SHAPES, SIZE, SIZES, random_pair, random_scene, render

ATTRIBUTES = {  # of a lone object and of the scene
    "shape": list(SHAPES), "colour": list(COLOURS), "pattern": list(PATTERNS),
    "background": list(BACKGROUNDS), "size": list(SIZES), "position": list(POSITIONS),
}
THING_ATTRIBUTES = ("shape", "colour", "pattern", "size")  # of each object of a pair
COUNTS = ["one", "two"]
SIDES = ("left", "right")
HEADS = {"objects": COUNTS, **ATTRIBUTES, **{f"{side}.{k}": ATTRIBUTES[k] for side in SIDES for k in THING_ATTRIBUTES}}
SCENE_HEADS = ("objects", "background")  # answered for every scene; the others only where they apply
WEIGHTS_DIR = Path(__file__).parent / "weights"


class JudgeNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        c = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(  # 64 -> 32 -> 16 -> 8 -> 4
            *block(3, c // 2), nn.MaxPool2d(2),
            *block(c // 2, c), *block(c, c), nn.MaxPool2d(2),
            *block(c, 2 * c), nn.MaxPool2d(2),
            *block(2 * c, 4 * c), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * c * (SIZE // 16) ** 2, 256), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({k.replace(".", "_"): nn.Linear(256, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: self.heads[k.replace(".", "_")](h) for k in HEADS}


def scene_labels(scene) -> dict[str, int]:
    """Head -> class index for one scene; heads that do not apply are -1 (ignored by the loss)."""
    labels = {k: -1 for k in HEADS}
    labels["objects"] = 0 if scene.second is None else 1
    labels["background"] = ATTRIBUTES["background"].index(scene.background)
    if scene.second is None:
        for k in ATTRIBUTES:
            labels[k] = ATTRIBUTES[k].index(getattr(scene, k))
    else:
        for side, thing in zip(SIDES, scene.things):
            for k in THING_ATTRIBUTES:
                labels[f"{side}.{k}"] = ATTRIBUTES[k].index(getattr(thing, k))
    return labels


def judge_scene(rng: random.Random):
    return random_pair(rng) if rng.random() < 0.5 else random_scene(rng)


def _batch(rng: random.Random, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes = [judge_scene(rng) for _ in range(n)]
    pixels = to_pixels([render(s)[0] for s in scenes])
    labels = [scene_labels(s) for s in scenes]
    return pixels, {k: torch.tensor([row[k] for row in labels]) for k in HEADS}


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """[N, 3, SIZE, SIZE] in [-1, 1]; other sizes are box-resized to the world's."""
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX))).permute(2, 0, 1)
                        for im in images]).float() / 127.5 - 1


def train_judge(output: str | Path = WEIGHTS_DIR / "judge.safetensors", steps: int = 3000, batch: int = 64,
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
        loss = sum(F.cross_entropy(out[k], y[k], ignore_index=-1) for k in HEADS if (y[k] >= 0).any())
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


def accuracy_by_head(predicted: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of right answers per head, over the scenes where the head applies."""
    result = {}
    for k in HEADS:
        applies = labels[k] >= 0
        if applies.any():
            result[k] = float((predicted[k][applies] == labels[k][applies]).float().mean())
    return result


@torch.no_grad()
def evaluate_judge(net: JudgeNet, rng: random.Random, n: int) -> dict[str, float]:
    x, y = _batch(rng, n)
    out = net(x)
    return accuracy_by_head({k: v.argmax(-1) for k, v in out.items()}, y)


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
        try:
            net.load_state_dict(load_file(str(path)))
        except RuntimeError as exc:
            raise PersonalizeError(f"{path} is not a judge of this toy world ({str(exc)[:200]}); retrain it with "
                                   "`personalize toyworld train-judge`") from exc
        return cls(net)

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> list[dict]:
        out = {k: v.argmax(-1) for k, v in self.net(to_pixels(images)).items()}
        return [self._reading(out, i) for i in range(len(images))]

    @staticmethod
    def _reading(out: dict[str, torch.Tensor], i: int) -> dict:
        answer = {k: HEADS[k][int(out[k][i])] for k in HEADS}
        reading = {"objects": answer["objects"], "background": answer["background"]}
        if answer["objects"] == "one":
            return {**reading, **{k: answer[k] for k in ATTRIBUTES if k != "background"}, "left": None, "right": None}
        return {**reading, **{k: None for k in ATTRIBUTES if k != "background"},
                **{side: {k: answer[f"{side}.{k}"] for k in THING_ATTRIBUTES} for side in SIDES}}

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, 256] penultimate features: the toy world's CLIP/DINO/Inception embedding."""
        return self.net.features(to_pixels(images))

    def __call__(self, image: Image.Image, target: str, *, image_id: str = "") -> float:
        attribute, value = parse_target(target)
        return float(self.predict([image])[0][attribute] == value)


def pair_shows(reading: dict, first: dict[str, str], second: dict[str, str]) -> bool:
    """A two-object reading shows one object with `first`'s traits and the other with `second`'s, either side."""
    if reading["objects"] != "two":
        return False
    left, right = reading["left"], reading["right"]

    def has(thing, traits):
        return all(thing[k] == v for k, v in traits.items())

    return (has(left, first) and has(right, second)) or (has(left, second) and has(right, first))


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
