"""`base-model`: how faithfully the toy model draws what a caption says — the gates of toy world 2.

Rows: full captions of random one-object scenes (every attribute read back), two-object prompts in both forms
("… on the left and … on the right", full caption; "X next to Y", colour and shape), the held-out concepts from
their full description (all three traits at once), and the VAE's reconstructions of fresh renders (every head).
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

from ...evaluate import toy as T
from ..judge import pair_shows
from ..world import HELD_OUT, describe, random_pair, random_scene
from .common import BenchConfig, Sampler, concept_name, concept_traits, load_model, save_grid

ONE_OBJECT = ("shape", "colour", "pattern", "background", "size", "position")  # what a full caption always names


def suite_base_model(cfg: BenchConfig, judge, work: Path) -> list[dict]:
    sample, rows, rng = Sampler(cfg), [], random.Random(7)
    backbone = load_model(cfg)
    n = cfg.samples * 4
    scenes = [random_scene(rng) for _ in range(n)]
    images = sample.each(backbone, [describe(s) for s in scenes])
    save_grid(images[:32], Path(cfg.output) / "grids" / "base-model-one-object.png")
    readings = judge.predict(images)
    row = {"suite": "base-model", "method": f"{n} random one-object scenes, full caption", "concept": "all", "seed": 0}
    for attribute in ONE_OBJECT:
        row[attribute] = sum(r[attribute] == getattr(s, attribute) for r, s in zip(readings, scenes)) / n
    row["one_object"] = sum(r["objects"] == "one" for r in readings) / n
    row["every_attribute"] = sum(all(r[a] == getattr(s, a) for a in ONE_OBJECT) for r, s in zip(readings, scenes)) / n
    rows.append(row)

    pairs = [random_pair(rng) for _ in range(n)]
    for form, prompt_of in (("on the left and on the right, full caption", describe),
                            ("next to, colour and shape", lambda p: f"a {p.colour} {p.shape} next to a {p.second.colour} {p.second.shape}")):
        images = sample.each(backbone, [prompt_of(p) for p in pairs])
        save_grid(images[:32], Path(cfg.output) / "grids" / f"base-model-pairs-{form.split(',')[0].replace(' ', '-')}.png")
        readings = judge.predict(images)
        exact_sides = form.startswith("on the left")
        both = [pair_shows(r, *({"colour": t.colour, "shape": t.shape} for t in p.things))
                and (not exact_sides or (r["left"]["shape"], r["right"]["shape"]) == (p.shape, p.second.shape))
                for r, p in zip(readings, pairs)]
        pair_row = {"suite": "base-model", "method": f"{n} two-object prompts: {form}", "concept": "all", "seed": 0,
                    "two_objects": sum(r["objects"] == "two" for r in readings) / n, "both_colour_and_shape": sum(both) / n}
        # both forms read left to right: the first object named is drawn on the left
        pair_row["in_order"] = sum(r["objects"] == "two" and (r["left"]["shape"], r["right"]["shape"]) == (p.shape, p.second.shape)
                                   for r, p in zip(readings, pairs)) / n
        if exact_sides:
            for attribute in ("shape", "colour", "pattern", "size"):
                pair_row[attribute] = statistics.mean(
                    r["objects"] == "two" and r[side][attribute] == getattr(t, attribute)
                    for r, p in zip(readings, pairs) for side, t in zip(("left", "right"), p.things))
            pair_row["background"] = sum(r["background"] == p.background for r, p in zip(readings, pairs)) / n
        rows.append(pair_row)

    for concept in HELD_OUT:
        traits = concept_traits(concept)
        images = sample(backbone, f"a {traits['colour']} {traits['pattern']} {traits['shape']}", cfg.samples)
        save_grid(images, Path(cfg.output) / "grids" / f"base-model-held-out-{concept_name(traits)}.png")
        r = judge.predict(images)
        rows.append({"suite": "base-model", "method": "held-out concept, full description", "concept": concept_name(traits),
                     "seed": 0, **{a: T.concept_rate(r, {a: v}) for a, v in traits.items()},
                     "all_three": T.concept_rate(r, traits)})
    rows.append(_vae_row(backbone, judge))
    return rows


def _vae_row(backbone, judge) -> dict:
    from ..base_model import vae_report

    report = vae_report(backbone.vae, judge, n=1000, seed=1)
    return {"suite": "base-model", "method": "VAE reconstructions of 1000 fresh renders (judge, every head)",
            "concept": "all", "seed": 0, "worst_head": min(report.values()), **report}
