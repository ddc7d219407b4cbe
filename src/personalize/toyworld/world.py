"""The toy world: procedural 32×32 scenes with exact attributes, masks and captions made of real CLIP words.

A scene is one object (shape, colour, pattern, size, position) on a plain background colour. Everything is
seeded and exact, so a judge can check what a model drew and every method's effect can be measured on a CPU.

Held-out concepts (`HELD_OUT`): attribute combinations that are rendered during base-model training but never
captioned as a whole (at least one of their three attributes is always dropped from their captions), so the
base model can draw them but no prompt names them — what personalization must learn. Varied categories
(`CATEGORIES`) share one trait and vary in the others, for Dis²Booth.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4  # drawn at 128 px then reduced: anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
PATTERNS = ("plain", "striped", "dotted")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "pink": (250, 170, 200)}
SIZES = ("small", "large")
POSITIONS = {"center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7)}

HELD_OUT = (  # (colour, shape, pattern): drawn in training, never named as a whole
    ("orange", "heart", "dotted"),
    ("blue", "star", "striped"),
    ("green", "triangle", "dotted"),
)
CATEGORIES = {  # Dis²Booth's varied sets: the common trait is fixed, the rest varies
    "striped-squares": {"shape": "square", "pattern": "striped"},
    "red-things": {"colour": "red"},
    "stars-on-black": {"shape": "star", "background": "black"},
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    pattern: str
    background: str
    size: str
    position: str

    def is_held_out(self) -> bool:
        return (self.colour, self.shape, self.pattern) in HELD_OUT


def random_scene(rng: random.Random, **fixed) -> Scene:
    values = dict(
        shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), pattern=rng.choice(PATTERNS),
        background=rng.choice(list(BACKGROUNDS)), size=rng.choice(SIZES), position=rng.choice(list(POSITIONS)),
    )
    values.update(fixed)
    return Scene(**values)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape centred at (cx, cy) with radius r (None: drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 17, cy - y * r / 17 - r * 0.05))
        return pts
    if shape == "cross":
        a, b = r * 0.95, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
                (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """(RGB image SIZE×SIZE, exact boolean foreground mask SIZE×SIZE)."""
    big = SIZE * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    fx, fy = POSITIONS[scene.position]
    r = big * (0.16 if scene.size == "small" else 0.3)
    cx, cy = fx * big, fy * big
    outline = _outline(scene.shape, cx, cy, r)
    draw = ImageDraw.Draw(mask)
    if outline is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(outline, fill=255)
    colour = np.array(COLOURS[scene.colour], dtype=np.float32)
    fill = np.broadcast_to(colour, (big, big, 3)).copy()
    yy, xx = np.mgrid[0:big, 0:big]
    if scene.pattern == "striped":  # diagonal stripes, darker
        fill[((xx + yy) // (2 * SUPERSAMPLE * 2)) % 2 == 0] *= 0.45
    elif scene.pattern == "dotted":  # a grid of white dots
        period = 3 * SUPERSAMPLE * 2
        dots = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period * 0.22) ** 2
        fill[dots] = 255
    background = np.broadcast_to(np.array(BACKGROUNDS[scene.background], dtype=np.float32), (big, big, 3))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255
    picture = Image.fromarray((alpha * fill + (1 - alpha) * background).round().astype(np.uint8), "RGB")
    small_mask = np.asarray(mask.resize((SIZE, SIZE), Image.Resampling.BOX)) >= 128
    return picture.resize((SIZE, SIZE), Image.Resampling.BOX), small_mask


def caption(scene: Scene, rng: random.Random, drop: float = 0.25) -> str:
    """A caption from the grammar, with attributes dropped at random (held-out combinations never whole)."""
    keep = {k: rng.random() >= drop for k in ("size", "colour", "pattern", "background", "position")}
    keep["shape"] = True
    if scene.is_held_out() and keep["colour"] and keep["pattern"]:
        keep[rng.choice(["colour", "pattern"])] = False  # never all three named together
    words = [w for k, w in (("size", scene.size), ("colour", scene.colour), ("pattern", scene.pattern)) if keep[k] and w != "plain"]
    text = f"a {' '.join(words + [scene.shape])}"
    if keep["background"]:
        text += f" on a {scene.background} background"
    if keep["position"] and scene.position != "center":
        text += f", {scene.position}"
    return text


def describe(scene: Scene) -> str:
    """The full caption (for prompts and judging)."""
    words = [scene.size, scene.colour] + ([scene.pattern] if scene.pattern != "plain" else []) + [scene.shape]
    return f"a {' '.join(words)} on a {scene.background} background"


def training_sample(rng: random.Random, empty_caption: float = 0.1) -> tuple[Image.Image, str, Scene]:
    scene = random_scene(rng)
    image, _ = render(scene)
    text = "" if rng.random() < empty_caption else caption(scene, rng)
    return image, text, scene


def scene_dict(scene: Scene) -> dict[str, str]:
    return asdict(scene)
