"""`personalize evaluate`: draw a protocol's prompts with trained concepts, score the images, write a report.

A protocol (see `protocols.py`) says which prompts, how many seeds per prompt, and what each set of images is
scored for:

| protocol       | prompts                                   | images / prompt | metrics                              |
|----------------|-------------------------------------------|-----------------|--------------------------------------|
| `dreambench`   | the 25 DreamBench prompts of the class    | 4               | DINO, CLIP-I (vs references), CLIP-T |
| `batex`        | "a photo of S"; 8 editing prompts         | 64; 8           | CLIP-I, DINO; CLIP-T                 |
| `esr`          | SingleInsert's 10 editing prompts         | 10              | ESR (judge), CLIP-T                  |
| `distribution` | "a photo of S"                            | 128             | FID (vs --heldout), DIV (LPIPS)      |
| `toy`          | "a S"; the toy world's 10 ESR prompts      | 16; 4           | judge-I, judge-DIV; ESR (toy judge)  |

S, the subject, is how prompts name the concept: `<token>` for embedding methods, `<token> <class word>` for
DreamBooth-LoRA, Dis²Booth and SingleInsert runs that have a class word (as they were trained), or `--subject`.
CLIP-T compares each image with its prompt where S is replaced by the class word (or removed without one):
CLIP has never seen the learned token.

Images are written to OUTPUT/samples and reused by a later call with the same settings (a fingerprint guards
against mixing samples of different concepts or settings), so an interrupted evaluation continues where it
stopped and metrics can be added without drawing again. Metrics whose network is not given are skipped and
listed in the report; when none can be computed the command stops before drawing anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..data import image_paths, load_rgb
from ..errors import PersonalizeError
from ..export import atomic_write
from ..generate import run_settings
from ..trainer import default_model
from . import metrics as M
from .esr import editing_success_rate
from .protocols import BATEX_IMAGE_PROMPT, BATEX_TEXT_PROMPTS, SINGLEINSERT_ESR, TOY_ESR, parse_dreambench
from .report import write_report

_LOG = logging.getLogger("personalize.evaluate")

PROTOCOLS = ("dreambench", "batex", "esr", "distribution", "toy")
CLASS_WORD_METHODS = {"dreambooth_lora", "dis2booth", "singleinsert"}  # trained on "<token> <class word>"
SAMPLES_DIR = "samples"
FINGERPRINT_FILE = "fingerprint.json"


def _env(name: str) -> str | None:
    """Metric networks can also be named once per machine: $PERSONALIZE_CLIP, _DINO, _INCEPTION, _LPIPS_BACKBONE."""
    return os.environ.get(f"PERSONALIZE_{name}") or None


@dataclass
class EvalConfig:
    protocol: str = field(default="dreambench", metadata={"help": "which paper's protocol", "choices": list(PROTOCOLS)})
    concept: list[str] | None = field(default=None, metadata={"help": "run folder(s), embedding or LoRA file(s) to load"})
    output: str | None = field(default=None, metadata={"help": "folder for samples/ and report.{json,md,html}"})
    model: str | None = field(default=None, metadata={"help": "base model (default: the run's, else $PERSONALIZE_MODEL or toy)"})
    model_config: str | None = field(default=None, metadata={"help": "diffusers folder with a single-file checkpoint's configs"})
    references: str | None = field(default=None, metadata={"help": "reference images for CLIP-I/DINO (default: the run's --images)"})
    heldout: str | None = field(default=None, metadata={"help": "distribution: held-out real images FID compares with"})
    subject: str | None = field(default=None, metadata={"help": "how prompts name the concept (default: from the run)"})
    class_word: str | None = field(default=None, metadata={"help": "the concept's class, e.g. dog (default: from the run)"})
    num_images: int | None = field(default=None, metadata={"help": "images per prompt (default: the protocol's)"})
    clip_model: str | None = field(default_factory=lambda: _env("CLIP"), metadata={
        "help": "CLIP folder or cached hub id (CLIP-I, CLIP-T, ESR clip judge; $PERSONALIZE_CLIP)", "aliases": ["--clip"]})
    dino_model: str | None = field(default_factory=lambda: _env("DINO"), metadata={
        "help": "DINO ViT folder or cached hub id (DINO; $PERSONALIZE_DINO)", "aliases": ["--dino"]})
    lpips_backbone: str | None = field(default_factory=lambda: _env("LPIPS_BACKBONE"), metadata={
        "help": "torchvision AlexNet weights file (DIV; $PERSONALIZE_LPIPS_BACKBONE)"})
    inception: str | None = field(default_factory=lambda: _env("INCEPTION"), metadata={
        "help": "TorchScript inception-2015-12-05.pt (FID; $PERSONALIZE_INCEPTION)"})
    clip_t_convention: str = field(default="raw", metadata={"help": "CLIP-T as mean cosine or CLIPScore", "choices": list(M.CLIP_T_CONVENTIONS)})
    judge: str = field(default="clip", metadata={"help": "ESR judge: clip, toy, or a CSV file image,target,success"})
    steps: int = field(default=50, metadata={"help": "sampler steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance"})
    resolution: int | None = field(default=None, metadata={"help": "image size (default: the model's)"})
    seed: int = field(default=0, metadata={"help": "first seed; image i of each prompt uses seed + i"})
    lora_scale: float = field(default=1.0, metadata={"help": "scale of the concepts' LoRAs"})
    allow_download: bool = field(default=False, metadata={"help": "let transformers fetch metric networks from the hub"})
    overwrite: bool = field(default=False, metadata={"help": "discard samples drawn with other settings"})


@dataclass
class PromptSet:
    """Prompts drawn `per_prompt` times each and what their images are scored for."""

    prompts: list[str]
    per_prompt: int
    scores: tuple[str, ...]  # of "reference" (CLIP-I, DINO), "text" (CLIP-T), "esr", "distribution", "judge" (toy)


# -- what to draw --------------------------------------------------------------------------------------------


def resolve_defaults(cfg: EvalConfig) -> EvalConfig:
    """Fill model, subject, class word and references from the first concept's run folder."""
    if not cfg.concept:
        raise PersonalizeError("--concept is required: a run folder (or embedding / LoRA file) to evaluate")
    if not cfg.output:
        raise PersonalizeError("--output is required: the folder for the samples and the report")
    for concept in cfg.concept:
        if not Path(concept).exists():
            raise PersonalizeError(f"--concept {concept} does not exist (pass a run folder, embedding or LoRA file)")
    run = run_settings(cfg.concept[0])
    # Textual Inversion and BaTex runs name no class; their init word is one ("cat"), as DreamBench needs.
    class_word = cfg.class_word or run.get("class_word") or run.get("init_word") or None
    token = run.get("token") or "<concept>"
    subject = cfg.subject
    if subject is None:
        subject = f"{token} {class_word}" if class_word and run.get("method") in CLASS_WORD_METHODS else token
    model = {"model": cfg.model, "model_config": cfg.model_config} if cfg.model else {
        "model": run.get("model") or default_model(), "model_config": cfg.model_config or run.get("model_config")}
    return EvalConfig(**{**asdict(cfg), **model, "class_word": class_word,
                         "subject": subject, "references": cfg.references or run.get("images")})


def protocol_plan(cfg: EvalConfig) -> list[PromptSet]:
    n, s = cfg.num_images, cfg.subject
    if cfg.protocol == "dreambench":
        classes, object_prompts, live_prompts = parse_dreambench()
        live = cfg.class_word in {"cat", "dog"}
        prompts = [p.replace("{0} {1}", s) for p in (live_prompts if live else object_prompts)]
        return [PromptSet(prompts, n or 4, ("reference", "text"))]
    if cfg.protocol == "batex":
        return [PromptSet([BATEX_IMAGE_PROMPT.format(s)], n or 64, ("reference",)),
                PromptSet([p.format(s) for p in BATEX_TEXT_PROMPTS], n or 8, ("text",))]
    if cfg.protocol == "esr":
        return [PromptSet([p.template.format(s) for p in SINGLEINSERT_ESR], n or 10, ("esr", "text"))]
    if cfg.protocol == "toy":
        return [PromptSet([f"a {s}"], n or 16, ("judge",)), PromptSet([p.template.format(s) for p in TOY_ESR], n or 4, ("esr",))]
    if cfg.protocol == "distribution":
        return [PromptSet([f"a photo of {s}"], n or 128, ("distribution",))]
    raise PersonalizeError(f"unknown --protocol {cfg.protocol!r}; choose from {', '.join(PROTOCOLS)}")


# -- which metrics can run -------------------------------------------------------------------------------------


SCORES = {  # metric -> the kind of images it scores (PromptSet.scores)
    "CLIP-I": "reference", "DINO": "reference", "CLIP-T": "text", "ESR": "esr",
    "judge-I": "judge", "judge-DIV": "judge", "FID": "distribution", "DIV": "distribution",
}
OPTION_HELP = {
    "clip_model": "--clip-model", "dino_model": "--dino-model", "inception": "--inception",
    "lpips_backbone": "--lpips-backbone", "references": "--references (the concept's own images)",
    "heldout": "--heldout (held-out real images of the category)",
}


def _needs(cfg: EvalConfig, metric: str) -> tuple[str, ...]:
    """The options a metric cannot run without (the toy judge ships with the package)."""
    clip_judge = cfg.judge == "clip" and cfg.protocol != "toy"
    return {
        "CLIP-I": ("clip_model", "references"), "DINO": ("dino_model", "references"), "CLIP-T": ("clip_model",),
        "ESR": ("clip_model",) if clip_judge else (), "judge-I": ("references",), "judge-DIV": (),
        "FID": ("inception", "heldout"), "DIV": ("lpips_backbone",),
    }[metric]


def plan_metrics(cfg: EvalConfig, plan: list[PromptSet]) -> tuple[list[str], dict[str, str]]:
    """(metrics to compute, {skipped metric: why}); refuses when nothing can be computed."""
    wanted = {score for ps in plan for score in ps.scores}
    run, skipped = [], {}
    for name, score in SCORES.items():
        if score not in wanted:
            continue
        missing = [OPTION_HELP[o] for o in _needs(cfg, name) if not getattr(cfg, o)]
        if not missing:
            run.append(name)
        elif name == "ESR":
            skipped[name] = "pass --clip-model for the zero-shot CLIP judge, or --judge toy / --judge FILE.csv"
        else:
            skipped[name] = "pass " + " and ".join(missing)
    if not run:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise PersonalizeError(f"no metric of the {cfg.protocol} protocol can be computed ({reasons})")
    return run, skipped


# -- drawing, with reuse ---------------------------------------------------------------------------------------


def _fingerprint(cfg: EvalConfig) -> dict:
    keys = ("model", "model_config", "subject", "steps", "guidance", "resolution", "lora_scale")
    return {"concepts": [str(Path(c).resolve()) for c in cfg.concept], **{k: getattr(cfg, k) for k in keys}}


def _sample_path(folder: Path, prompt_index: int, seed: int) -> Path:
    return folder / f"{prompt_index:03d}-{seed}.png"


def draw_samples(cfg: EvalConfig, plan: list[PromptSet]) -> list[dict[str, list[Image.Image]]]:
    """For each prompt set, {prompt: images}; draws only the images OUTPUT/samples does not hold yet."""
    folder = Path(cfg.output) / SAMPLES_DIR
    fingerprint = _fingerprint(cfg)
    stamp = folder / FINGERPRINT_FILE
    if stamp.exists() and json.loads(stamp.read_text()) != fingerprint:
        if not cfg.overwrite:
            raise PersonalizeError(f"{folder} holds samples drawn with other settings or concepts; "
                                   "pass --overwrite to discard them, or another --output")
        shutil.rmtree(folder)
    atomic_write(stamp, lambda t: t.write_text(json.dumps(fingerprint, indent=1)))

    jobs, index = [], 0  # (prompt, seed, path) of every image, in a fixed order
    for ps in plan:
        for prompt in ps.prompts:
            jobs += [(prompt, cfg.seed + i, _sample_path(folder, index, cfg.seed + i)) for i in range(ps.per_prompt)]
            index += 1
    missing = [job for job in jobs if not job[2].exists()]
    if missing:
        _draw(cfg, missing)
    elif jobs:
        _LOG.info("reusing the %d samples in %s", len(jobs), folder)

    out, position = [], 0
    for ps in plan:
        groups = {}
        for prompt in ps.prompts:
            groups[prompt] = [load_rgb(path) for _, _, path in jobs[position : position + ps.per_prompt]]
            position += ps.per_prompt
        out.append(groups)
    return out


def _draw(cfg: EvalConfig, jobs: list[tuple[str, int, Path]]) -> None:
    from ..backbone import load_backbone
    from ..generate import generate_images, install_concept, save_png

    backbone = load_backbone(cfg.model, model_config=cfg.model_config)
    for concept in cfg.concept:
        _LOG.info("loaded %s from %s", install_concept(backbone, concept, lora_scale=cfg.lora_scale), concept)
    for prompt, seed, path in tqdm(jobs, desc="drawing", dynamic_ncols=True):
        image, = generate_images(backbone, [prompt], [seed], steps=cfg.steps, guidance=cfg.guidance, resolution=cfg.resolution)
        save_png(image, path)  # one by one: an interrupted evaluation keeps what it drew


# -- scoring ---------------------------------------------------------------------------------------------------


def _images(folder: str) -> list[Image.Image]:
    return [load_rgb(p) for p in image_paths(folder)]


def clip_t_text(prompt: str, cfg: EvalConfig) -> str:
    mode = "class" if cfg.class_word else "remove"
    return M.prompt_for_clip_t(prompt, cfg.subject, mode, cfg.class_word)


def esr_prompts(cfg: EvalConfig):
    return TOY_ESR if cfg.protocol == "toy" else SINGLEINSERT_ESR


def _judge(cfg: EvalConfig, clip):
    if cfg.judge == "toy" or cfg.protocol == "toy":
        from ..toyworld.judge import ToyJudge

        return ToyJudge.load(), {"judge": "toy-world attribute CNN"}
    if cfg.judge == "clip":
        from .esr import ClipJudge

        return ClipJudge(clip, cfg.class_word or "person"), {"judge": "zero-shot CLIP", **clip.provenance()}
    from .esr import CsvJudge

    return CsvJudge(cfg.judge), {"judge": f"human judgements {cfg.judge}"}


@dataclass
class Networks:
    """The metric networks and reference images, loaded before drawing so a bad path fails at once."""

    clip: M.ClipScorer | None = None
    dino: M.DinoScorer | None = None
    judge: object = None
    judge_provenance: dict | None = None
    inception: M.InceptionFeatures | None = None
    lpips: M.LPIPS | None = None
    references: list[Image.Image] = field(default_factory=list)
    heldout: list[Image.Image] = field(default_factory=list)


def load_networks(cfg: EvalConfig, wanted: list[str]) -> Networks:
    nets = Networks()
    if {"CLIP-I", "CLIP-T"} & set(wanted) or ("ESR" in wanted and cfg.judge == "clip" and cfg.protocol != "toy"):
        nets.clip = M.ClipScorer.load(cfg.clip_model, cfg.allow_download)
    if "DINO" in wanted:
        nets.dino = M.DinoScorer.load(cfg.dino_model, cfg.allow_download)
    if "ESR" in wanted or cfg.protocol == "toy":
        nets.judge, nets.judge_provenance = _judge(cfg, nets.clip)
    if "FID" in wanted:
        nets.inception, nets.heldout = M.InceptionFeatures(cfg.inception), _images(cfg.heldout)
    if "DIV" in wanted:
        nets.lpips = M.LPIPS.load(cfg.lpips_backbone)
    if {"CLIP-I", "DINO", "judge-I"} & set(wanted):
        nets.references = _images(cfg.references)
    return nets


def score(cfg: EvalConfig, plan: list[PromptSet], drawn: list[dict], wanted: list[str], nets: Networks):
    """(MetricResults, {prompt: {metric: value}})."""
    clip, dino, references = nets.clip, nets.dino, nets.references
    results, per_prompt = [], {}

    def record(name, value, n, convention, provenance):
        results.append(M.MetricResult(name, float(value), n, convention, provenance))

    for ps, groups in zip(plan, drawn):
        images = [im for group in groups.values() for im in group]
        for name, scorer in (("CLIP-I", clip), ("DINO", dino)):
            if name in wanted and "reference" in ps.scores:
                generated, refs = scorer.image_embeddings(images), scorer.image_embeddings(references)
                record(name, M.mean_pairwise_cosine(generated, refs), len(images),
                       f"mean cos over {len(images)} generated x {len(references)} reference images", scorer.provenance())
                for i, prompt in enumerate(groups):
                    rows = generated[i * ps.per_prompt : (i + 1) * ps.per_prompt]
                    per_prompt.setdefault(prompt, {})[name] = M.mean_pairwise_cosine(rows, refs)
        if "CLIP-T" in wanted and "text" in ps.scores:
            texts = [clip_t_text(p, cfg) for p, group in groups.items() for _ in group]
            image_emb, text_emb = clip.image_embeddings(images), clip.text_embeddings(texts)
            how = f"subject replaced by {cfg.class_word!r}" if cfg.class_word else "subject removed"
            record("CLIP-T", M.clip_t_from_embeddings(image_emb, text_emb, cfg.clip_t_convention), len(images),
                   f"{M.CLIP_T_CONVENTIONS[cfg.clip_t_convention]}; {how}", clip.provenance())
            for i, prompt in enumerate(groups):
                rows = slice(i * ps.per_prompt, (i + 1) * ps.per_prompt)
                per_prompt.setdefault(prompt, {})["CLIP-T"] = M.clip_t_from_embeddings(
                    image_emb[rows], text_emb[rows], cfg.clip_t_convention)
        if "judge" in ps.scores:
            from . import toy as T

            toy_judge = nets.judge
            if "judge-I" in wanted:
                record("judge-I", T.feature_similarity(toy_judge, images, references), len(images),
                       "mean cos of toy-judge features, generated x reference (the toy CLIP-I)", nets.judge_provenance)
            record("judge-DIV", T.diversity(toy_judge, images), len(images),
                   "mean 1 - cos of toy-judge features over distinct pairs (the toy DIV)", nets.judge_provenance)
        if "ESR" in wanted and "esr" in ps.scores:
            judge, provenance = nets.judge, nets.judge_provenance
            esr_list = esr_prompts(cfg)
            by_template = {p.template: groups[p.template.format(cfg.subject)] for p in esr_list}
            esr = editing_success_rate(by_template, list(esr_list), judge)
            record("ESR", esr.overall, esr.n_images, "SingleInsert A.2: one point per prompt, 1/k per target", provenance)
            for p in esr_list:
                per_prompt.setdefault(p.template.format(cfg.subject), {})["ESR"] = esr.per_prompt[p.template]
        if "distribution" in ps.scores:
            if "FID" in wanted:
                inception, heldout = nets.inception, nets.heldout
                fid = M.fid(inception(images), inception(heldout))
                record("FID", float(fid), len(images), f"Fréchet distance of Inception pool3 features, "
                       f"{len(images)} generated vs {len(heldout)} held-out", inception.provenance())
            if "DIV" in wanted:
                lpips = nets.lpips
                record("DIV", M.div_lpips(list(groups.values()), lpips), len(images),
                       "mean pairwise LPIPS (AlexNet, v0.1) within each prompt's samples", lpips.provenance())
    return results, per_prompt


def evaluate(cfg: EvalConfig) -> list[Path]:
    """Draw (or reuse) the protocol's samples, score them, write the report; returns the report files."""
    cfg = resolve_defaults(cfg)
    plan = protocol_plan(cfg)
    wanted, skipped = plan_metrics(cfg, plan)
    for name, why in skipped.items():
        _LOG.warning("skipping %s: %s", name, why)
    if "ESR" in wanted and cfg.judge not in ("clip", "toy") and not Path(cfg.judge).is_file():
        raise PersonalizeError(f"--judge {cfg.judge}: expected clip, toy, or an existing CSV file")
    nets = load_networks(cfg, wanted)
    drawn = draw_samples(cfg, plan)
    results, per_prompt = score(cfg, plan, drawn, wanted, nets)
    samples = {prompt: images for groups in drawn for prompt, images in groups.items()}
    references = _images(cfg.references)[:8] if cfg.references and Path(cfg.references).is_dir() else []
    context = {"protocol": cfg.protocol, **_fingerprint(cfg), "class_word": cfg.class_word, "seed": cfg.seed,
               "images_per_prompt": {p: ps.per_prompt for ps in plan for p in ps.prompts}, "skipped": skipped}
    return write_report(cfg.output, results, context=context, references=references, samples=samples, per_prompt=per_prompt)
