"""`personalize bench`: the papers' tables in miniature on the toy model, judged by the toy judge.

Suites (each a table in the report; rows are methods, figures mean ± std over concepts × seeds):

- `base-model`: how faithfully the toy model draws full captions of random scenes (the judge's reading of each
  attribute against the caption), and the held-out combinations from their full description.
- `embeddings` (BaTex Tables 2/5): Textual Inversion vs BaTex on the held-out concepts (colour-shape-pattern
  combinations the model draws but no caption named whole), 5 renders each, init word = the shape. Image
  alignment ("a <c>": all three traits drawn; judge-feature cosine to the training renders), text alignment over
  an editing list (4 background swaps, a colour change, a pattern change, a position, a size: the asked attribute
  drawn, and drawn while the concept's other traits stay), steps to converge (first preview at which the concept
  rate reaches 80 % of the run's best), wall time. Reference rows: the base model prompted with the full
  description and with the init word only.
- `init-word` (BaTex Tables 6/7): the same with an unrelated init word (another shape).
- `basis-size` (BaTex Table 4): BaTex with M = d/8, 3d/4 (the default) and 4d.
- `singleinsert` (SingleInsert Table 2): one render with its exact mask on a pink background; Textual Inversion and
  TI+LoRA (the paper's "TI+DB") on it, SingleInsert's ablation (baseline = plain reconstruction; + L_fg; + L_bg;
  + L_sm = full), Stage I only, and the official code's semantic reference (LoRA text encoder). Foreground
  alignment, background leakage (share of "a <c> <class>" samples on the source's pink), clean foreground (the
  concept on another background), text alignment (background swaps obeyed) and edit keeps concept (obeyed with the
  concept drawn), diversity, toy ESR.
- `distribution` (Dis²Booth): a varied category (30 reference renders sharing one trait, the rest random);
  DreamBooth-LoRA (at the same steps, and at as many optimizer updates as Dis²Booth's schedule makes,
  `Dis2Booth.updates_per_run`) vs Dis²Booth and its ablation (no contextual loss / no delta loss / synchronous). Judge-feature
  Fréchet distance to 128 held-out renders of the category, diversity, share keeping the common trait; floor row:
  as many fresh real renders as generated images (Fréchet distances are only comparable at the same N).

`--methods LABEL ...` keeps only those trained rows (reference rows are always measured).
Writes OUTPUT/bench.json (every row), OUTPUT/bench.md (the tables) and OUTPUT/grids/*.png (samples per row).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from PIL import Image

from ..errors import PersonalizeError
from ..evaluate import toy as T
from ..evaluate.esr import editing_success_rate
from ..evaluate.protocols import TOY_ESR
from ..export import atomic_write
from .world import BACKGROUNDS, CATEGORIES, COLOURS, HELD_OUT, SHAPES, random_scene, render

_LOG = logging.getLogger("personalize.bench")
SUITES = ("base-model", "embeddings", "init-word", "basis-size", "singleinsert", "distribution")
TOKEN = "<concept>"
# Learning rates on the toy model (before the trainer's batch-size scaling), from two short probes each: the
# methods' SD defaults (5e-4) barely move a 64-d toy embedding in 300 steps.
BENCH_LR = {"textual-inversion": 5e-3, "batex": 2e-2}
# TI+LoRA's LoRA (rank 4, as SingleInsert's): DreamBooth-LoRA's default 1e-4 × batch 4, as the trainer scales it.
TI_LORA_LR = 4e-4
SOURCE_BACKGROUND = "pink"  # SingleInsert's source scene: a background no edit prompt asks for


@dataclass
class BenchConfig:
    output: str | None = field(default=None, metadata={"help": "folder for bench.json, bench.md and grids/"})
    suite: list[str] = field(default_factory=lambda: ["embeddings"], metadata={"help": f"which tables: {', '.join(SUITES)}"})
    concepts: int = field(default=3, metadata={"help": "how many held-out concepts (or categories) to use"})
    seeds: int = field(default=3, metadata={"help": "training seeds per concept"})
    steps: int | None = field(default=None, metadata={"help": "training steps of every run (default: each suite's)"})
    samples: int = field(default=16, metadata={"help": "images of the plain prompt per run"})
    edit_samples: int = field(default=4, metadata={"help": "images per editing prompt"})
    inference_steps: int | None = field(default=None, metadata={"help": "sampler steps (default: the toy model's recommended)"})
    guidance: float | None = field(default=None, metadata={"help": "classifier-free guidance (default: the toy model's recommended)"})
    keep_runs: bool = field(default=False, metadata={"help": "keep every run's folder under OUTPUT/runs"})
    methods: list[str] = field(default_factory=list, metadata={"help": "only the trained rows with these labels (as in bench.md); default all"})


# -- the world's training sets ---------------------------------------------------------------------------------


def concept_traits(concept: tuple[str, str, str]) -> dict[str, str]:
    colour, shape, pattern = concept
    return {"colour": colour, "shape": shape, "pattern": pattern}


def render_set(folder: Path, n: int, seed: int, masks: bool = False, **fixed) -> list[Image.Image]:
    """n renders with `fixed` attributes (the rest random) written as PNGs (and NAME.mask.png) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, images = random.Random(seed), []
    for i in range(n):
        image, mask = render(random_scene(rng, **fixed))
        image.save(folder / f"{i:03d}.png")
        if masks:
            Image.fromarray((mask > 0.5).astype("uint8") * 255).save(folder / f"{i:03d}.mask.png")
        images.append(image)
    return images


# -- one run -------------------------------------------------------------------------------------------------


def train_run(out: Path, method: str, method_cfg, images: Path, steps: int, seed: int, subject: str,
              previews: int = 8, lr: float | None = None, batch_size: int = 4) -> float:
    """Train on the toy model with previews of "a <subject>" every steps/5; return the wall time in seconds."""
    from ..trainer import TrainConfig, train

    cfg = TrainConfig(method=method, model="toy", images=str(images), output=str(out), steps=steps, seed=seed, lr=lr,
                      batch_size=batch_size, validation_steps=max(1, steps // 5), validation_prompts=[f"a {subject}"],
                      num_validation_images=previews, checkpointing_steps=10**9,
                      overwrite=True)
    start = time.monotonic()
    train(cfg, method_cfg)
    return time.monotonic() - start


def subject_of(method: str, method_cfg) -> str:
    """How prompts name what a run of `method` learns (the method says: `Method.prompt_subject`)."""
    from ..methods import METHODS

    return METHODS[method].prompt_subject(asdict(method_cfg))


def preview_curve(out: Path, judge, traits: dict[str, str], tile: int = 32) -> dict[int, float]:
    """Concept rate of each preview grid (one row of seeds) the run wrote, by step."""
    curve = {}
    for grid_file in sorted((out / "validation").glob("step-*.png")):
        grid = Image.open(grid_file).convert("RGB")
        tiles = [grid.crop((x, 0, x + tile, tile)) for x in range(0, grid.width, tile)]
        curve[int(grid_file.stem.split("-")[1])] = T.concept_rate(judge.predict(tiles), traits)
    return curve


def steps_to_converge(curve: dict[int, float], share: float = 0.8) -> int | None:
    best = max(curve.values(), default=0.0)
    if best == 0:
        return None
    return min(step for step, rate in curve.items() if rate >= share * best)


# -- measuring -------------------------------------------------------------------------------------------------


class Sampler:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg

    def __call__(self, backbone, prompt: str, n: int) -> list[Image.Image]:
        from ..generate import generate_images

        return generate_images(backbone, [prompt], list(range(n)), steps=self.cfg.inference_steps,
                               guidance=self.cfg.guidance, batch_size=n)


def edit_list(subject: str, traits: dict[str, str]) -> list[tuple[str, dict, dict]]:
    """(prompt, what it asks, which concept traits must stay) for BaTex-style text alignment."""
    edits = [(f"a {subject} on a {bg} background", {"background": bg}, traits) for bg in BACKGROUNDS]
    other = next(c for c in COLOURS if c != traits["colour"])
    keep_shape_pattern = {k: v for k, v in traits.items() if k != "colour"}
    edits.append((f"a {other} {subject}", {"colour": other}, keep_shape_pattern))
    if traits["pattern"] != "plain":
        edits.append((f"a plain {subject}", {"pattern": "plain"}, {k: v for k, v in traits.items() if k != "pattern"}))
    edits.append((f"a {subject}, left", {"position": "left"}, traits))
    edits.append((f"a small {subject}", {"size": "small"}, traits))
    return edits


def measure_embedding(backbone, judge, sample: Sampler, subject: str, traits: dict, references: list[Image.Image],
                      grid: Path | None = None) -> dict[str, float]:
    cfg = sample.cfg
    images = sample(backbone, f"a {subject}", cfg.samples)
    if grid is not None:
        save_grid(images, grid)
    row = {"image_alignment": T.concept_rate(judge.predict(images), traits),
           "feature_similarity": T.feature_similarity(judge, images, references)}
    obeyed, both = [], []
    for prompt, asked, kept in edit_list(subject, traits):
        readings = judge.predict(sample(backbone, prompt, cfg.edit_samples))
        obeyed.append(T.obeyed_rate(readings, [asked] * len(readings)))
        both.append(T.obeyed_rate(readings, [{**kept, **asked}] * len(readings)))
    row["text_alignment"] = statistics.mean(obeyed)
    row["edit_keeps_concept"] = statistics.mean(both)
    return row


def save_grid(images: list[Image.Image], path: Path) -> None:
    from ..generate import make_grid, save_png

    save_png(make_grid(images, 8), path)


# -- suites ----------------------------------------------------------------------------------------------------


def select_runs(cfg: BenchConfig, suite: str, runs: list[tuple]) -> list[tuple]:
    """The runs (label first) that --methods names; all when it names none."""
    if not cfg.methods:
        return runs
    chosen = [run for run in runs if run[0] in cfg.methods]
    if not chosen:
        _LOG.warning("--methods names no row of suite %s; its rows: %s", suite, ", ".join(run[0] for run in runs))
    return chosen


def _toy(token_concepts=()):
    from ..backbone import load_backbone
    from ..generate import install_concept

    backbone = load_backbone("toy")
    for concept in token_concepts:
        install_concept(backbone, concept)
    return backbone


def suite_embeddings(cfg: BenchConfig, judge, work: Path, variant: str = "embeddings") -> list[dict]:
    from ..methods import BatexConfig, TextualInversionConfig

    sample, rows = Sampler(cfg), []
    steps = 300 if cfg.steps is None else cfg.steps
    dim = _toy().embedding_dims[0]
    for concept in HELD_OUT[: cfg.concepts]:
        traits, name = concept_traits(concept), "-".join(concept)
        references = render_set(work / name / "images", 5, seed=1, colour=traits["colour"], shape=traits["shape"],
                                pattern=traits["pattern"])
        init = traits["shape"] if variant != "init-word" else next(s for s in SHAPES if s not in (traits["shape"], "circle"))
        if variant == "embeddings":
            base = _toy()
            for label, subject in (("base: full description", f"{traits['colour']} {traits['pattern']} {traits['shape']}"),
                                   ("base: init word only", traits["shape"])):
                rows.append({"suite": variant, "method": label, "concept": name, "seed": 0,
                             **measure_embedding(base, judge, sample, subject, traits, references)})
        runs = [("textual-inversion", TextualInversionConfig(init_word=init), "textual-inversion"),
                ("batex", BatexConfig(init_word=init), "batex")]
        if variant == "basis-size":
            runs = [(f"batex M={m}", BatexConfig(init_word=init, basis_size=m), "batex")
                    for m in (dim // 8, 3 * dim // 4, 4 * dim)]
        for label, method_cfg, method in select_runs(cfg, variant, runs):
            for seed in range(cfg.seeds):
                out = work / name / f"{label.replace(' ', '_')}-{seed}"
                seconds = train_run(out, method, method_cfg, work / name / "images", steps, seed, TOKEN, lr=BENCH_LR[method])
                curve = preview_curve(out, judge, traits)
                grid = Path(cfg.output) / "grids" / f"{variant}-{name}-{label.replace(' ', '_')}-{seed}.png"
                row = {"suite": variant, "method": label, "concept": name, "seed": seed, "init_word": init,
                       "train_seconds": seconds, "steps_to_converge": steps_to_converge(curve), "curve": curve,
                       **measure_embedding(_toy([out]), judge, sample, TOKEN, traits, references, grid)}
                rows.append(row)
                _LOG.info("%s", {k: v for k, v in row.items() if k != "curve"})
    return rows


def suite_base_model(cfg: BenchConfig, judge, work: Path) -> list[dict]:
    """How faithfully the toy model draws what a caption says (the gates of toy world 2)."""
    from .judge import pair_shows
    from .world import describe, random_pair

    sample, rows, rng = Sampler(cfg), [], random.Random(7)
    backbone = _toy()
    scenes = [random_scene(rng) for _ in range(cfg.samples * 4)]
    readings = [judge.predict(sample(backbone, describe(s), 1))[0] for s in scenes]
    row = {"suite": "base-model", "method": f"{len(scenes)} random one-object scenes, full caption", "concept": "all", "seed": 0}
    for attribute in ("shape", "colour", "pattern", "background", "size", "position"):
        row[attribute] = sum(r[attribute] == getattr(s, attribute) for r, s in zip(readings, scenes)) / len(scenes)
    row["one_object"] = sum(r["objects"] == "one" for r in readings) / len(scenes)
    rows.append(row)

    pairs = [random_pair(rng) for _ in range(cfg.samples * 4)]
    for form, prompt_of in (("on the left and on the right, full caption", describe),
                            ("next to, colour and shape", lambda p: f"a {p.colour} {p.shape} next to a {p.second.colour} {p.second.shape}")):
        readings = [judge.predict(sample(backbone, prompt_of(p), 1))[0] for p in pairs]
        exact_sides = form.startswith("on the left")
        both = [pair_shows(r, *(({"colour": t.colour, "shape": t.shape} for t in p.things)))
                and (not exact_sides or (r["left"]["shape"], r["right"]["shape"]) == (p.shape, p.second.shape))
                for r, p in zip(readings, pairs)]
        pair_row = {"suite": "base-model", "method": f"{len(pairs)} two-object prompts: {form}", "concept": "all", "seed": 0,
                    "two_objects": sum(r["objects"] == "two" for r in readings) / len(pairs),
                    "both_colour_and_shape": sum(both) / len(pairs)}
        if exact_sides:
            for attribute in ("shape", "colour", "pattern", "size"):
                pair_row[attribute] = statistics.mean(
                    r["objects"] == "two" and r[side][attribute] == getattr(t, attribute)
                    for r, p in zip(readings, pairs) for side, t in zip(("left", "right"), p.things))
            pair_row["background"] = sum(r["background"] == p.background for r, p in zip(readings, pairs)) / len(pairs)
        rows.append(pair_row)

    for concept in HELD_OUT:
        traits = concept_traits(concept)
        images = sample(backbone, f"a {traits['colour']} {traits['pattern']} {traits['shape']}", cfg.samples)
        r = judge.predict(images)
        rows.append({"suite": "base-model", "method": "held-out concept, full description", "concept": "-".join(concept),
                     "seed": 0, **{a: T.concept_rate(r, {a: v}) for a, v in traits.items()},
                     "all_three": T.concept_rate(r, traits)})
    return rows


def suite_singleinsert(cfg: BenchConfig, judge, work: Path) -> list[dict]:
    from ..methods import SingleInsertConfig, TextualInversionConfig

    sample, rows = Sampler(cfg), []
    full = dict(fg_loss=True, bg_weight=1.0, sm_weight=1.0)
    variants = [
        ("singleinsert: baseline", dict(fg_loss=False, bg_weight=0.0, sm_weight=0.0)),
        ("singleinsert: +L_fg", dict(fg_loss=True, bg_weight=0.0, sm_weight=0.0)),
        ("singleinsert: +L_fg +L_bg", dict(fg_loss=True, bg_weight=1.0, sm_weight=0.0)),
        ("singleinsert: full (+L_sm)", full),
        ("singleinsert: stage I only", {**full, "stage2_steps": 0}),
        ("singleinsert: official semantic reference", {**full, "semantic_reference": "lora-text-encoder"}),
    ]
    for concept in HELD_OUT[: cfg.concepts]:
        traits, name = concept_traits(concept), "-".join(concept)
        folder = work / name / "single"
        source = render_set(folder, 1, seed=2, masks=True, background=SOURCE_BACKGROUND, size="large",
                            position="center", **traits)
        runs = [("textual-inversion (1 image)", "textual-inversion", TextualInversionConfig(init_word=traits["shape"])),
                ("textual-inversion + LoRA (1 image)", "textual-inversion",
                 TextualInversionConfig(init_word=traits["shape"], lora_rank=4, lora_lr=TI_LORA_LR))]
        for label, flags in variants:
            si = SingleInsertConfig(class_word=traits["shape"], **flags)
            if cfg.steps and si.stage2_steps:  # --steps sets the total; Stage I keeps the paper's 50
                si.stage2_steps = max(1, cfg.steps - si.stage1_steps)
            runs.append((label, "singleinsert", si))
        for label, method, method_cfg in select_runs(cfg, "singleinsert", runs):
            for seed in range(cfg.seeds):
                out = work / name / f"{label.replace(' ', '_').replace(':', '')}-{seed}"
                if method == "singleinsert":
                    steps = method_cfg.stage1_steps + method_cfg.stage2_steps
                else:
                    steps = 300 if cfg.steps is None else cfg.steps
                subject = subject_of(method, method_cfg)
                seconds = train_run(out, method, method_cfg, folder, steps, seed, subject, lr=BENCH_LR.get(method))
                backbone = _toy([out])
                images = sample(backbone, f"a {subject}", cfg.samples)
                save_grid(images, Path(cfg.output) / "grids" / f"singleinsert-{name}-{out.name}.png")
                readings = judge.predict(images)
                edits = [bg for bg in BACKGROUNDS if bg != SOURCE_BACKGROUND]
                obeyed, kept = [], []
                for bg in edits:
                    r = judge.predict(sample(backbone, f"a {subject} on a {bg} background", cfg.edit_samples))
                    obeyed.append(T.obeyed_rate(r, [{"background": bg}] * len(r)))
                    kept.append(T.obeyed_rate(r, [{**traits, "background": bg}] * len(r)))
                esr_images = {p.template: sample(backbone, p.template.format(subject), cfg.edit_samples) for p in TOY_ESR}
                row = {"suite": "singleinsert", "method": label, "concept": name, "seed": seed, "train_seconds": seconds,
                       "foreground_alignment": T.concept_rate(readings, traits),
                       "feature_similarity": T.feature_similarity(judge, images, source),
                       "background_leakage": T.background_leakage(readings, SOURCE_BACKGROUND),
                       "clean_foreground": T.clean_foreground_rate(readings, traits, SOURCE_BACKGROUND),
                       "text_alignment": statistics.mean(obeyed),
                       "edit_keeps_concept": statistics.mean(kept),
                       "diversity": T.diversity(judge, images),
                       "esr": editing_success_rate(esr_images, list(TOY_ESR), judge).overall}
                rows.append(row)
                _LOG.info("%s", row)
    return rows


def suite_distribution(cfg: BenchConfig, judge, work: Path) -> list[dict]:
    from ..methods import Dis2Booth, Dis2BoothConfig, DreamBoothLoraConfig

    sample, rows = Sampler(cfg), []
    n_generated = max(cfg.samples, 2)
    for name, traits in list(CATEGORIES.items())[: cfg.concepts]:
        class_word = traits.get("shape", "shape")
        folder = work / name / "reference"
        render_set(folder, 30, seed=3, **traits)
        heldout = render_set(work / name / "heldout", 128, seed=4, **traits)
        base = _toy()
        base_images = sample(base, f"a photo of a {class_word}", n_generated)
        rows.append({"suite": "distribution", "method": "base: class word", "concept": name, "seed": 0,
                     **_distribution_row(judge, base_images, heldout, traits)})
        real = render_set(work / name / "real", n_generated, seed=5, **traits)  # the floor: real renders, same N
        rows.append({"suite": "distribution", "method": "real renders (the floor)", "concept": name, "seed": 0,
                     **_distribution_row(judge, real, heldout, traits)})
        steps = 200 if cfg.steps is None else cfg.steps
        warmup = steps // 3
        d2b = Dis2BoothConfig(class_word=class_word, warmup_steps=warmup)
        updates = Dis2Booth.updates_per_run(d2b, steps)  # its optimizer updates in `steps` iterations
        runs = [
            ("dreambooth-lora", "dreambooth-lora", DreamBoothLoraConfig(class_word=class_word), steps),
            (f"dreambooth-lora: as many updates ({updates})", "dreambooth-lora", DreamBoothLoraConfig(class_word=class_word), updates),
            ("dis2booth", "dis2booth", d2b, steps),
            ("dis2booth: no contextual loss", "dis2booth", replace(d2b, contextual_loss=False), steps),
            ("dis2booth: no delta loss", "dis2booth", replace(d2b, delta_loss=False), steps),
            ("dis2booth: synchronous", "dis2booth", replace(d2b, synchronous=True), steps),
        ]
        for label, method, method_cfg, run_steps in select_runs(cfg, "distribution", runs):
            for seed in range(cfg.seeds):
                out = work / name / f"{label.replace(' ', '_').replace(':', '')}-{seed}"
                subject = subject_of(method, method_cfg)
                seconds = train_run(out, method, method_cfg, folder, run_steps, seed, subject, previews=4)
                images = sample(_toy([out]), f"a photo of {subject}", n_generated)
                save_grid(images, Path(cfg.output) / "grids" / f"distribution-{name}-{out.name}.png")
                rows.append({"suite": "distribution", "method": label, "concept": name, "seed": seed,
                             "train_seconds": seconds, **_distribution_row(judge, images, heldout, traits)})
                _LOG.info("%s", rows[-1])
    return rows


def _distribution_row(judge, images, heldout, traits) -> dict[str, float]:
    return {"frechet": T.judge_frechet(judge, images, heldout), "diversity": T.diversity(judge, images),
            "keeps_trait": T.concept_rate(judge.predict(images), traits), "n_generated": len(images)}


# -- report ----------------------------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> str:
    """One Markdown table per suite: mean ± std of each numeric column per method."""
    lines = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        suite_rows = [r for r in rows if r["suite"] == suite]
        keys = list(dict.fromkeys(k for r in suite_rows for k, v in r.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"))
        lines += [f"\n### {suite}\n", "| method | N | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for method in dict.fromkeys(r["method"] for r in suite_rows):
            group = [r for r in suite_rows if r["method"] == method]
            cells = []
            for k in keys:
                values = [r[k] for r in group if isinstance(r.get(k), (int, float))]
                if not values:
                    cells.append("—")
                elif len(values) == 1:
                    cells.append(f"{values[0]:.3g}")
                else:
                    cells.append(f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}")
            lines.append(f"| {method} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bench(cfg: BenchConfig) -> list[Path]:
    from .judge import ToyJudge

    if not cfg.output:
        raise PersonalizeError("--output is required: the folder for bench.json, bench.md and grids/")
    unknown = set(cfg.suite) - set(SUITES)
    if unknown:
        raise PersonalizeError(f"unknown --suite {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}")
    judge = ToyJudge.load()
    output = Path(cfg.output)
    work = output / "runs"
    rows: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for suite in cfg.suite:
        if suite == "base-model":
            rows += suite_base_model(cfg, judge, work / suite)
        elif suite == "singleinsert":
            rows += suite_singleinsert(cfg, judge, work / suite)
        elif suite == "distribution":
            rows += suite_distribution(cfg, judge, work / suite)
        else:
            rows += suite_embeddings(cfg, judge, work / suite, variant=suite)
        _write(output, cfg, rows, started)  # after every suite: a long bench that dies keeps what it measured
    if not cfg.keep_runs:
        shutil.rmtree(work, ignore_errors=True)
    return _write(output, cfg, rows, started)


def _write(output: Path, cfg: BenchConfig, rows: list[dict], started: str) -> list[Path]:
    payload = {"started": started, "config": asdict(cfg), "rows": rows}
    json_file = atomic_write(output / "bench.json", lambda t: t.write_text(json.dumps(payload, indent=1, default=str)))
    md = f"# personalize bench ({started})\n\nsettings: {json.dumps(asdict(cfg))}\n" + summarise(rows)
    md_file = atomic_write(output / "bench.md", lambda t: t.write_text(md))
    return [json_file, md_file]
