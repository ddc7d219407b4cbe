"""What every bench suite shares: the settings, the world's training sets, one run, sampling, measuring, and the
row summaries (the statistics that turn rows into verdicts live in `stats.py`)."""

from __future__ import annotations

import logging
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from ...evaluate import toy as T
from ..judge import pair_shows
from ..world import BACKGROUNDS, COLOURS, PATTERNS, random_scene, render

LOG = logging.getLogger("personalize.bench")
TOKEN = "<concept>"
# Learning rates on the toy model, before the trainer's batch-size scaling (SingleInsert: its paper's, unscaled).
# Chosen by `personalize bench --suite lr-sweep` (the rule: the best image alignment at the suite's steps on a
# concept no table uses, ties to the better text alignment); `--rates FILE` uses another sweep's choice.
BENCH_LR = {"textual-inversion": 5e-3, "batex": 2e-2, "dreambooth-lora": 1e-4, "dis2booth": 1e-4, "singleinsert": None}
TI_LORA_LR = 4e-4  # TI+LoRA's LoRA (rank 4, as SingleInsert's): DreamBooth-LoRA's 1e-4 × batch 4
SECOND_OBJECT = {"colour": "green", "shape": "heart"}  # the composition edit: "a S next to a green heart"


@dataclass
class BenchConfig:
    output: str | None = field(default=None, metadata={"help": "folder for bench.json, bench.md, grids/ and plots"})
    suite: list[str] = field(default_factory=lambda: ["embeddings"], metadata={"help": "which tables (see `personalize bench --help`)"})
    concepts: int = field(default=3, metadata={
        "help": "how many bench concepts (world.BENCH_CONCEPTS: the 3 held-out first, up to 12) or Dis²Booth categories "
                "(world.CATEGORIES, up to 6) to use"})
    seeds: int = field(default=3, metadata={"help": "training seeds per concept"})
    first_seed: int = field(default=0, metadata={"help": "the first training seed (with --merge: extend an earlier bench by more seeds)"})
    concept_index: list[int] = field(default_factory=list, metadata={
        "help": "only these of the --concepts (0 = the first; default all): one bench split across processes or machines, "
                "joined again with --merge"})
    steps: int | None = field(default=None, metadata={"help": "training steps of every run (default: each suite's)"})
    samples: int = field(default=32, metadata={"help": "images of the plain prompt per run"})
    edit_samples: int = field(default=8, metadata={"help": "images per editing prompt"})
    inference_steps: int | None = field(default=None, metadata={"help": "sampler steps (default: the toy model's recommended)"})
    guidance: float | None = field(default=None, metadata={"help": "classifier-free guidance (default: the toy model's recommended)"})
    curve: bool = field(default=True, metadata={
        "help": "measure the embeddings suite along training (3 points); --no-curve: at the last step only (the same "
                "final rows: a run resumed in segments continues exactly; a third of the sampling)"})
    esr: bool = field(default=True, metadata={
        "help": "read the toy ESR of every SingleInsert run (10 more prompts × --edit-samples); --no-esr: leave the "
                "column out (half the suite's sampling; only the encoder claims read it)"})
    keep_runs: bool = field(default=False, metadata={"help": "keep every run's folder under OUTPUT/runs"})
    methods: list[str] = field(default_factory=list, metadata={
        "help": "only the trained rows with these labels (as in bench.md; the embeddings suite's base rows too); default all"})
    model: str = field(default="toy", metadata={"help": "the toy-world model to bench (a folder of the same world)"})
    rates: str | None = field(default=None, metadata={"help": "a bench.json of an lr-sweep whose chosen rates to use"})
    merge: list[str] = field(default_factory=list, metadata={
        "help": "earlier bench.json files (same model and sampling) whose rows join this bench's tables and verdicts"})


def chosen_concepts(cfg: BenchConfig, items) -> list[tuple[int, object]]:
    """(index, item) of the first --concepts items, only those --concept-index names when it names any."""
    items = list(items)
    if cfg.concepts > len(items):
        from ...errors import PersonalizeError

        raise PersonalizeError(f"--concepts {cfg.concepts}: this suite has {len(items)} concepts (or categories)")
    return [(i, item) for i, item in enumerate(items[: cfg.concepts]) if not cfg.concept_index or i in cfg.concept_index]


def run_seeds(cfg: BenchConfig) -> range:
    """The training seeds of every trained row: --first-seed, … (--seeds of them)."""
    return range(cfg.first_seed, cfg.first_seed + cfg.seeds)


# -- the world's training sets ---------------------------------------------------------------------------------


def concept_traits(concept: tuple[str, str, str]) -> dict[str, str]:
    colour, shape, pattern = concept
    return {"colour": colour, "shape": shape, "pattern": pattern}


def concept_name(traits: dict[str, str]) -> str:
    return "-".join(traits[k] for k in ("colour", "shape", "pattern") if k in traits)


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


def train_run(cfg: BenchConfig, out: Path, method: str, method_cfg, images: Path, steps: int, seed: int,
              lr: float | None = None, batch_size: int | None = 4, resume: bool = False, previews: list[str] | None = None,
              ) -> float:
    """Train `steps` steps on the bench's model (or continue `out` to `steps`); return the wall time in seconds."""
    from ...trainer import TrainConfig, train

    # flip=True: every bench row trains on mirrors, as every committed row did before DreamBooth-LoRA's default went to
    # no flip (2026-12-07), so rows of every day stay comparable.
    train_cfg = TrainConfig(method=method, model=cfg.model, images=str(images), output=str(out), steps=steps, seed=seed, lr=lr,
                            batch_size=batch_size, validation_steps=max(1, steps // 5) if previews else None,
                            validation_prompts=previews, num_validation_images=8 if previews else 0,
                            checkpointing_steps=10**9, checkpoints_total_limit=1,
                            overwrite=not resume, resume="latest" if resume else None, flip=True)
    start = time.monotonic()
    train(train_cfg, method_cfg)
    return time.monotonic() - start


def subject_of(method: str, method_cfg) -> str:
    """How prompts name what a run of `method` learns (the method says: `Method.prompt_subject`)."""
    from ...methods import METHODS

    return METHODS[method].prompt_subject(asdict(method_cfg))


def preview_curve(out: Path, judge, traits: dict[str, str], tile: int | None = None) -> dict[int, float]:
    """Concept rate of each preview grid (one row of seeds) the run wrote, by step."""
    curve = {}
    for grid_file in sorted((out / "validation").glob("step-*.png")):
        grid = Image.open(grid_file).convert("RGB")
        side = tile or grid.height
        tiles = [grid.crop((x, 0, x + side, side)) for x in range(0, grid.width, side)]
        curve[int(grid_file.stem.split("-")[1])] = T.concept_rate(judge.predict(tiles), traits)
    return curve


def steps_to_converge(curve: dict[int, float], share: float = 0.8) -> int | None:
    best = max(curve.values(), default=0.0)
    if best == 0:
        return None
    return min(step for step, rate in curve.items() if rate >= share * best)


def steps_to_reach(curve: dict[int, float], target: float) -> int | None:
    """The first step whose value reaches `target` (None: never)."""
    return min((step for step, value in curve.items() if value >= target), default=None)


# -- sampling and measuring -------------------------------------------------------------------------------------


class Sampler:
    """The same seeds for every row (0 … n−1), so grids compare row by row."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg

    def __call__(self, backbone, prompt: str, n: int) -> list[Image.Image]:
        from ...generate import generate_images

        return generate_images(backbone, [prompt], list(range(n)), steps=self.cfg.inference_steps,
                               guidance=self.cfg.guidance, batch_size=min(n, 16))

    def each(self, backbone, prompts: list[str], chunk: int = 16) -> list[Image.Image]:
        """One image per prompt (image i with seed i), several prompts per sampler batch."""
        from ...backbone import seeded_noise

        steps = backbone.sampler["inference_steps"] if self.cfg.inference_steps is None else self.cfg.inference_steps
        guidance = backbone.sampler["guidance"] if self.cfg.guidance is None else self.cfg.guidance
        size, images = backbone.default_resolution, []
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            generators = [seeded_noise(start + i) for i in range(len(part))]
            images += backbone.pipe(prompt=part, num_inference_steps=steps, guidance_scale=guidance, height=size,
                                    width=size, generator=generators).images
        return images


def load_model(cfg: BenchConfig, concepts=()):
    from ...backbone import load_backbone, sampling_device
    from ...generate import install_concept

    backbone = load_backbone(cfg.model)
    for concept in concepts:
        install_concept(backbone, concept)
    return backbone.to(sampling_device())


def _matches(reading: dict, traits: dict[str, str]) -> bool:
    return all(reading.get(k) == v for k, v in traits.items())


def edit_list(subject: str, traits: dict[str, str]) -> list[tuple[str, str, object, object]]:
    """(kind, prompt, obeyed(reading), obeyed-with-the-concept(reading)) for text alignment: a background swap, a
    colour change, a pattern change, a position, a size and a second object — edits the base model does not obey
    trivially for a concept it cannot name."""
    def keep(*dropped):
        return {k: v for k, v in traits.items() if k not in dropped}

    background = "black"
    colour = next(c for c in COLOURS if c != traits.get("colour"))
    pattern = next(p for p in PATTERNS if p != traits.get("pattern"))
    edits = [
        ("background", f"a {subject} on a {background} background", {"background": background}, keep()),
        ("colour", f"a {colour} {subject}", {"colour": colour}, keep("colour")),
        ("pattern", f"a {pattern} {subject}", {"pattern": pattern}, keep("pattern")),
        ("position", f"a {subject}, left", {"position": "left"}, keep()),
        ("size", f"a small {subject}", {"size": "small"}, keep()),
    ]
    out = [(kind, prompt, lambda r, a=asked: _matches(r, a), lambda r, a=asked, k=kept: _matches(r, {**k, **a}))
           for kind, prompt, asked, kept in edits]
    out.append(("composition", f"a {subject} next to a {SECOND_OBJECT['colour']} {SECOND_OBJECT['shape']}",
                lambda r: r["objects"] == "two" and (_matches(r["left"], SECOND_OBJECT) or _matches(r["right"], SECOND_OBJECT)),
                lambda r: pair_shows(r, dict(traits), SECOND_OBJECT)))
    return out


def measure_embedding(cfg: BenchConfig, backbone, judge, subject: str, traits: dict, references: list[Image.Image],
                      grid: Path | None = None, plain: list | None = None) -> dict[str, float]:
    """Image alignment ("a S": all traits drawn; judge-feature cosine to the references), text alignment (each edit
    obeyed) and edits that keep the concept, per edit kind and averaged. `plain` receives the "a S" images."""
    sample = Sampler(cfg)
    images = sample(backbone, f"a {subject}", cfg.samples)
    if plain is not None:
        plain.extend(images)
    if grid is not None:
        save_grid(images, grid)
    row = {"image_alignment": T.concept_rate(judge.predict(images), traits),
           "feature_similarity": T.feature_similarity(judge, images, references)}
    obeyed, kept = [], []
    for kind, prompt, asked, with_concept in edit_list(subject, traits):
        readings = judge.predict(sample(backbone, prompt, cfg.edit_samples))
        row[f"edit_{kind}"] = statistics.mean(bool(asked(r)) for r in readings)
        row[f"keeps_{kind}"] = statistics.mean(bool(with_concept(r)) for r in readings)
        obeyed.append(row[f"edit_{kind}"])
        kept.append(row[f"keeps_{kind}"])
    row["text_alignment"] = statistics.mean(obeyed)
    row["edit_keeps_concept"] = statistics.mean(kept)
    return row


def run_slug(label: str) -> str:
    """A row label as a run folder / grid name: 'singleinsert: full (+L_sm)' -> 'singleinsert_full_(pL_sm)',
    'batex M=16' -> 'batex_M16'."""
    return label.replace(" ", "_").replace(":", "").replace("=", "").replace("+", "p")


def save_grid(images: list[Image.Image], path: Path, columns: int = 8) -> None:
    from ...generate import make_grid, save_png

    zoom = max(1, 128 // images[0].width)
    save_png(make_grid([im.resize((im.width * zoom, im.height * zoom), resample=0) for im in images], columns), path)


def select_runs(cfg: BenchConfig, suite: str, runs: list[tuple]) -> list[tuple]:
    """The runs (label first) that --methods names; all when it names none."""
    if not cfg.methods:
        return runs
    chosen = [run for run in runs if run[0] in cfg.methods]
    if not chosen:
        LOG.warning("--methods names no row of suite %s; its rows: %s", suite, ", ".join(run[0] for run in runs))
    return chosen


def method_rate(cfg: BenchConfig, method: str) -> float | None:
    """The toy model's learning rate of `method` (from --rates' sweep when given)."""
    if cfg.rates:
        import json

        chosen = json.loads(Path(cfg.rates).read_text()).get("chosen_rates", {})
        if method in chosen:
            return chosen[method]
    return BENCH_LR.get(method)


# -- summaries -------------------------------------------------------------------------------------------------


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


def saturated(rows: list[dict], metric: str, suite: str) -> bool:
    """A metric that reads the same for every row separates nothing."""
    values = {round(r[metric], 6) for r in rows if r["suite"] == suite and isinstance(r.get(metric), (int, float))}
    return len(values) <= 1
