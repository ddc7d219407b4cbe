"""Textual Inversion vs BaTex on the toy world's held-out concepts, judged attribute by attribute.

For each held-out concept (a colour-shape-pattern combination the toy model can draw but no caption ever named
whole) the benchmark renders 5 training images (the concept on random backgrounds, sizes and positions), trains
Textual Inversion and BaTex from the same init word (the shape), and asks the judge:

- image alignment: "a <concept>" × 16 seeds -> share of images whose colour, shape and pattern all match;
- text alignment: "a <concept> on a <bg> background" for each background × 4 seeds -> share whose background is
  the asked one (the prompt obeyed), and share that also still show the concept (both at once);
- references: the base model prompted with the full description (what it can draw) and with the init word only.

Usage: python benchmarks/toy_embeddings.py [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from personalize.backbone import load_backbone
from personalize.generate import generate_images, install_concept
from personalize.methods import BatexConfig, TextualInversionConfig
from personalize.toyworld.judge import ToyJudge
from personalize.toyworld.world import BACKGROUNDS, HELD_OUT, random_scene, render
from personalize.trainer import TrainConfig, train


def training_images(folder: Path, colour: str, shape: str, pattern: str, n: int = 5, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _ = render(random_scene(rng, colour=colour, shape=shape, pattern=pattern))
        image.save(folder / f"{i:02d}.png")
    return folder


def judge_rates(judge, images, concept, background=None) -> dict[str, float]:
    colour, shape, pattern = concept
    seen = judge.predict(images)
    keeps = [s["colour"] == colour and s["shape"] == shape and s["pattern"] == pattern for s in seen]
    out = {"concept": sum(keeps) / len(seen)}
    if background is not None:
        obeys = [s["background"] == b for s, b in zip(seen, background)]
        out["background"] = sum(obeys) / len(seen)
        out["both"] = sum(k and o for k, o in zip(keeps, obeys)) / len(seen)
    return out


def measure(backbone, judge, token: str, concept, seeds_image=16, seeds_text=4, steps=25, guidance=4.0) -> dict[str, float]:
    image_prompts = [f"a {token}"]
    images = generate_images(backbone, image_prompts, list(range(seeds_image)), steps=steps, guidance=guidance)
    result = {"image_" + k: v for k, v in judge_rates(judge, images, concept).items()}
    bgs = list(BACKGROUNDS)
    text_prompts = [f"a {token} on a {bg} background" for bg in bgs]
    images = generate_images(backbone, text_prompts, list(range(seeds_text)), steps=steps, guidance=guidance)
    asked = [bg for bg in bgs for _ in range(seeds_text)]
    result.update({"text_" + k: v for k, v in judge_rates(judge, images, concept, asked).items()})
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    judge = ToyJudge.load()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for concept in HELD_OUT:
            colour, shape, pattern = concept
            name = f"{colour}-{pattern}-{shape}"
            folder = training_images(tmp / name, *concept)
            base = load_backbone("toy")
            rows.append({"concept": name, "method": "base: full description",
                         **measure(base, judge, f"{colour} {pattern} {shape}", concept)})
            rows.append({"concept": name, "method": "base: init word only", **measure(base, judge, shape, concept)})
            for method, cfg in (("textual-inversion", TextualInversionConfig(init_word=shape)),
                                ("batex", BatexConfig(init_word=shape))):
                out = tmp / f"{name}-{method}"
                start = time.monotonic()
                train(TrainConfig(method=method, model="toy", images=str(folder), output=str(out), steps=a.steps,
                                  lr=a.lr, num_validation_images=0, checkpointing_steps=10**9), cfg)
                seconds = time.monotonic() - start
                backbone = load_backbone("toy")
                token = install_concept(backbone, out)
                rows.append({"concept": name, "method": method, "train_s": round(seconds, 1),
                             **measure(backbone, judge, token, concept)})
                print(rows[-1], flush=True)
    keys = ["image_concept", "text_background", "text_both", "text_concept"]
    print("| concept | method | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['concept']} | {r['method']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
