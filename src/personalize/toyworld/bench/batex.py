"""BaTex's claims in miniature (Tables 2, 4-7): Textual Inversion vs BaTex on the bench concepts (`world.BENCH_CONCEPTS`:
the held-out ones first, then nameable ones; each row's `held_out` says which).

- `embeddings`: image alignment ("a S": all three traits drawn) and text alignment (the six edits of
  `common.edit_list` obeyed) of TI and BaTex, measured along training (`CURVE_POINTS` checkpoints of one run,
  trained in segments that resume exactly) so the image-vs-text trade-off is a curve, not a point; steps for
  BaTex to reach TI's final image alignment. Reference rows: the base model prompted with the full description
  and with the init word only.
- `init-word`: the same with an unrelated init word (another shape).
- `basis-size`: BaTex with M = d/8, 3d/4 (the default) and 4d (Table 4).
- `distance`: BaTex with the dot product (default), cosine and L2 distance choosing the basis (Figure 7).
"""

from __future__ import annotations

from pathlib import Path

from ..world import BENCH_CONCEPTS, HELD_OUT, SHAPES
from .common import (LOG, TOKEN, BenchConfig, chosen_concepts, concept_name, concept_traits, load_model, measure_embedding, method_rate,
                     render_set, run_seeds, run_slug, select_runs, steps_to_reach, train_run)

CURVE_POINTS = 3  # evaluations along each run (the last at the final step)


def _runs(variant: str, init: str, dim: int):
    from ...methods import BatexConfig, TextualInversionConfig

    if variant == "basis-size":
        return [(f"batex M={m}", "batex", BatexConfig(init_word=init, basis_size=m)) for m in (dim // 8, 3 * dim // 4, 4 * dim)]
    if variant == "distance":
        return [(f"batex {d}", "batex", BatexConfig(init_word=init, distance=d)) for d in ("dot", "cosine", "l2")]
    return [("textual-inversion", "textual-inversion", TextualInversionConfig(init_word=init)),
            ("batex", "batex", BatexConfig(init_word=init))]


def suite_embeddings(cfg: BenchConfig, judge, work: Path, variant: str = "embeddings") -> list[dict]:
    rows = []
    steps = 300 if cfg.steps is None else cfg.steps
    points = ([round(steps * (i + 1) / CURVE_POINTS) for i in range(CURVE_POINTS)] if variant == "embeddings" and cfg.curve
              else [steps])
    dim = load_model(cfg).embedding_dims[0]
    for _, concept in chosen_concepts(cfg, BENCH_CONCEPTS):
        traits, name = concept_traits(concept), concept_name(concept_traits(concept))
        held_out = concept in HELD_OUT
        references = render_set(work / name / "images", 5, seed=1, **traits)
        init = traits["shape"] if variant != "init-word" else next(s for s in SHAPES if s not in (traits["shape"], "circle"))
        if variant == "embeddings":
            base = load_model(cfg)
            for label, subject in (("base: full description", f"{traits['colour']} {traits['pattern']} {traits['shape']}"),
                                   ("base: init word only", traits["shape"])):
                if cfg.methods and label not in cfg.methods:
                    continue
                rows.append({"suite": variant, "method": label, "concept": name, "held_out": held_out, "seed": 0,
                             **measure_embedding(cfg, base, judge, subject, traits, references)})
        for label, method, method_cfg in select_runs(cfg, variant, _runs(variant, init, dim)):
            for seed in run_seeds(cfg):
                out = work / name / f"{run_slug(label)}-{seed}"
                seconds, curve = 0.0, {}
                for point in points:  # segments of one run: a resumed run continues exactly
                    seconds += train_run(cfg, out, method, method_cfg, work / name / "images", point, seed,
                                         lr=method_rate(cfg, method), resume=point != points[0])
                    grid = Path(cfg.output) / "grids" / f"{variant}-{name}-{out.name}-step{point}.png"
                    curve[point] = measure_embedding(cfg, load_model(cfg, [out]), judge, TOKEN, traits, references,
                                                     grid if point == points[-1] else None)
                final = curve[points[-1]]
                rows.append({"suite": variant, "method": label, "concept": name, "held_out": held_out, "seed": seed, "init_word": init,
                             "train_seconds": seconds, **final,
                             "curve": {str(p): {k: v[k] for k in ("image_alignment", "text_alignment")} for p, v in curve.items()}})
                LOG.info("%s", {k: v for k, v in rows[-1].items() if k != "curve"})
    if variant == "embeddings":
        _steps_to_reach_ti(rows, variant)
    return rows


def _steps_to_reach_ti(rows: list[dict], suite: str) -> None:
    """For each BaTex run: the first checkpoint at which its image alignment reaches TI's final one (same concept,
    mean over seeds); None when it never does."""
    for row in rows:
        if row["suite"] != suite or row["method"] != "batex":
            continue
        ti = [r["image_alignment"] for r in rows if r["suite"] == suite and r["method"] == "textual-inversion"
              and r["concept"] == row["concept"]]
        if ti:
            curve = {int(p): v["image_alignment"] for p, v in row["curve"].items()}
            row["steps_to_ti_final"] = steps_to_reach(curve, sum(ti) / len(ti))
