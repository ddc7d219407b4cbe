"""`personalize evaluate`: draw a protocol's prompts with trained concepts, score the images, write a report.

A protocol (see `protocols.py`) says which prompts, how many seeds per prompt, and what each set of images is
scored for:

| protocol       | prompts                                   | images / prompt | metrics                                   |
|----------------|-------------------------------------------|-----------------|-------------------------------------------|
| `dreambench`   | the 25 DreamBench prompts of the class    | 4               | DINO, CLIP-I (vs references), CLIP-T      |
| `batex`        | "a photo of S"; 8 editing prompts         | 64; 8           | CLIP-I, DINO; CLIP-T                      |
| `singleinsert` | SingleInsert's 10 editing prompts         | 10              | CLIP-I-f/-b, DINO-f/-b, CLIP-T, DIV, ESR  |
| `esr`          | the same prompts and samples              | 10              | ESR (judge), CLIP-T                       |
| `distribution` | "a photo of S"                            | 128             | FID (vs --heldout), DIV (LPIPS)           |
| `toy`          | "a S"; the toy world's 10 ESR prompts      | 16; 4           | judge-I, judge-DIV; ESR (toy judge)       |

S, the subject, is how prompts name the concept: `<token>` for embedding methods, `<token> <class word>` for
DreamBooth-LoRA, Dis²Booth and SingleInsert runs that have a class word (as they were trained), or `--subject`.
Each metric follows its protocol's paper (`protocols.CONVENTIONS`: the paper's words where it states the rule, our
choice where it is silent), and the report says which parts are which. CLIP-T, for one, reads the prompt with S
replaced by the class word for DreamBench and SingleInsert, and with S removed on CLIPScore's scale for BaTex
(after Textual Inversion); --clip-t-text and --clip-t-convention override the paper's.

SingleInsert's masked metrics need a mask per sample: `--generated-masks DIR` (NAME.mask.png, what `personalize
mask --images OUTPUT/samples` writes), or `toy` (the default on the toy model: its flat backgrounds segment
exactly enough, see `toy.foreground_mask`). On the toy model the singleinsert protocol draws the toy world's
editing prompts and judges them with the toy judge, as SingleInsert's face prompts mean nothing there.

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

from ..backbone import sampler_settings
from ..data import find_mask, image_paths, load_rgb
from ..errors import PersonalizeError
from ..export import atomic_write
from ..generate import run_settings
from ..methods import run_subject
from ..trainer import default_model
from . import metrics as M
from .esr import editing_success_rate
from .protocols import (BATEX_IMAGE_PROMPT, BATEX_TEXT_PROMPTS, CONVENTIONS, LIVE_CLASSES, SINGLEINSERT_ESR, TOY_ESR,
                        parse_dreambench)
from .report import write_report

_LOG = logging.getLogger("personalize.evaluate")

PROTOCOLS = ("dreambench", "batex", "singleinsert", "esr", "distribution", "toy")
TOY_MODEL = "toy"
TOY_MASKS = "toy"  # --generated-masks value: segment samples by the toy world's background (toy.foreground_mask)
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
    reference_masks: str | None = field(default=None, metadata={
        "help": "singleinsert: folder of the references' masks named like them (default: the run's --masks, "
                "else NAME.mask.png beside each reference)"})
    generated_masks: str | None = field(default=None, metadata={
        "help": "singleinsert: folder of the samples' masks NAME.mask.png (`personalize mask --images OUTPUT/samples`), "
                "or `toy` to segment by the toy world's background (default on the toy model)"})
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
    clip_t_convention: str | None = field(default=None, metadata={
        "help": "CLIP-T's scale: raw mean cosine or CLIPScore (default: the protocol's paper's)",
        "choices": list(M.CLIP_T_CONVENTIONS)})
    clip_t_text: str | None = field(default=None, metadata={
        "help": "what stands for the subject in the text CLIP-T reads: remove it, the class word, or keep the prompt "
                "(default: the protocol's paper's)", "choices": list(M.CLIP_T_TEXTS)})
    judge: str = field(default="clip", metadata={"help": "ESR judge: clip, toy, or a CSV file image,target,success"})
    steps: int | None = field(default=None, metadata={"help": "sampler steps (default: the model's recommended, else 30)"})
    guidance: float | None = field(default=None, metadata={"help": "classifier-free guidance (default: the model's recommended, else 7.5)"})
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
    scores: tuple[str, ...]  # kinds of SCORES: "reference" (CLIP-I, DINO), "masked" (their -f/-b), "text" (CLIP-T),
    # "esr", "diversity" (DIV), "distribution" (FID), "judge" (toy)


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
    subject = cfg.subject if cfg.subject is not None else run_subject(run)
    model = {"model": cfg.model, "model_config": cfg.model_config} if cfg.model else {
        "model": run.get("model") or default_model(), "model_config": cfg.model_config or run.get("model_config")}
    sampler = sampler_settings(model["model"])  # resolved here, so the samples' fingerprint records real values
    generated_masks = cfg.generated_masks or (TOY_MASKS if model["model"] == TOY_MODEL else None)
    return EvalConfig(**{**asdict(cfg), **model, "class_word": class_word,
                         "subject": subject, "references": cfg.references or run.get("images"),
                         "reference_masks": cfg.reference_masks or run.get("masks"), "generated_masks": generated_masks,
                         "steps": sampler["inference_steps"] if cfg.steps is None else cfg.steps,
                         "guidance": sampler["guidance"] if cfg.guidance is None else cfg.guidance})


def toy_world(cfg: EvalConfig) -> bool:
    """Whether the protocol's prompts and ESR judge are the toy world's: the toy protocol, and SingleInsert's on the
    toy model (its face prompts mean nothing there)."""
    return cfg.protocol == "toy" or (cfg.protocol == "singleinsert" and cfg.model == TOY_MODEL)


def protocol_plan(cfg: EvalConfig) -> list[PromptSet]:
    n, s = cfg.num_images, cfg.subject
    if cfg.protocol == "dreambench":
        classes, object_prompts, live_prompts = parse_dreambench()
        live = cfg.class_word in LIVE_CLASSES
        prompts = [p.replace("{0} {1}", s) for p in (live_prompts if live else object_prompts)]
        return [PromptSet(prompts, n or 4, ("reference", "text"))]
    if cfg.protocol == "batex":
        return [PromptSet([BATEX_IMAGE_PROMPT.format(s)], n or 64, ("reference",)),
                PromptSet([p.format(s) for p in BATEX_TEXT_PROMPTS], n or 8, ("text",))]
    if cfg.protocol in ("singleinsert", "esr"):  # esr: the same samples, scored only for ESR and CLIP-T
        scores = ("masked", "text", "diversity", "esr") if cfg.protocol == "singleinsert" else ("esr", "text")
        return [PromptSet([p.template.format(s) for p in esr_prompts(cfg)], n or 10, scores)]
    if cfg.protocol == "toy":
        return [PromptSet([f"a {s}"], n or 16, ("judge",)), PromptSet([p.template.format(s) for p in TOY_ESR], n or 4, ("esr",))]
    if cfg.protocol == "distribution":
        return [PromptSet([f"a photo of {s}"], n or 128, ("distribution", "diversity"))]
    raise PersonalizeError(f"unknown --protocol {cfg.protocol!r}; choose from {', '.join(PROTOCOLS)}")


# -- which metrics can run -------------------------------------------------------------------------------------


SCORES = {  # metric -> the kind of images it scores (PromptSet.scores), in SingleInsert's Table 1 order
    "CLIP-I": "reference", "DINO": "reference", "CLIP-I-f": "masked", "CLIP-I-b": "masked", "DINO-f": "masked",
    "DINO-b": "masked", "CLIP-T": "text", "DIV": "diversity", "ESR": "esr", "judge-I": "judge", "judge-DIV": "judge",
    "FID": "distribution",
}
MASKED = {"CLIP-I-f": ("clip", "foreground"), "CLIP-I-b": ("clip", "background"),
          "DINO-f": ("dino", "foreground"), "DINO-b": ("dino", "background")}
OPTION_HELP = {
    "clip_model": "--clip-model", "dino_model": "--dino-model", "inception": "--inception",
    "lpips_backbone": "--lpips-backbone", "references": "--references (the concept's own images)",
    "heldout": "--heldout (held-out real images of the category)",
    "generated_masks": "--generated-masks (the samples' masks: run `personalize mask --images OUTPUT/samples`, then "
                       "evaluate again with --generated-masks OUTPUT/samples)",
}


def judge_kind(cfg: EvalConfig) -> str:
    """"toy", "clip" or "csv": the toy world is judged by its own judge unless human judgements are given."""
    if cfg.protocol == "toy" or cfg.judge == "toy" or (cfg.judge == "clip" and toy_world(cfg)):
        return "toy"
    return "clip" if cfg.judge == "clip" else "csv"


def _needs(cfg: EvalConfig, metric: str) -> tuple[str, ...]:
    """The options a metric cannot run without (the toy judge ships with the package)."""
    if metric in MASKED:
        return f"{MASKED[metric][0]}_model", "references", "generated_masks"
    return {
        "CLIP-I": ("clip_model", "references"), "DINO": ("dino_model", "references"), "CLIP-T": ("clip_model",),
        "ESR": ("clip_model",) if judge_kind(cfg) == "clip" else (), "judge-I": ("references",), "judge-DIV": (),
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
        too_few = name == "DIV" and any("diversity" in ps.scores and ps.per_prompt < 2 for ps in plan)
        if too_few:
            skipped[name] = "LPIPS diversity needs at least 2 images per prompt (--num-images)"
        elif not missing:
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

    paths = sample_paths(cfg, plan)
    jobs = [(prompt, cfg.seed + i, path) for groups in paths for prompt, group in groups.items()
            for i, path in enumerate(group)]  # (prompt, seed, path) of every image, in a fixed order
    missing = [job for job in jobs if not job[2].exists()]
    if missing:
        _draw(cfg, missing)
    elif jobs:
        _LOG.info("reusing the %d samples in %s", len(jobs), folder)
    return [{prompt: [load_rgb(path) for path in group] for prompt, group in groups.items()} for groups in paths]


def sample_paths(cfg: EvalConfig, plan: list[PromptSet]) -> list[dict[str, list[Path]]]:
    """For each prompt set, {prompt: the files of its samples}: OUTPUT/samples/PPP-SEED.png, prompts numbered
    across the whole plan (so the names are also what --generated-masks folders are matched by)."""
    folder = Path(cfg.output) / SAMPLES_DIR
    out, index = [], 0
    for ps in plan:
        groups = {}
        for prompt in ps.prompts:
            groups[prompt] = [_sample_path(folder, index, cfg.seed + i) for i in range(ps.per_prompt)]
            index += 1
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


def clip_t_setting(cfg: EvalConfig) -> tuple[str, str]:
    """(text, scale) of CLIP-T: the protocol paper's, unless --clip-t-text / --clip-t-convention say otherwise.
    Without a class word, a paper's "class" falls back to removing the subject (the report says so)."""
    paper = CONVENTIONS[cfg.protocol]["CLIP-T"]
    text = cfg.clip_t_text or (paper.text if cfg.class_word or paper.text != "class" else "remove")
    return text, cfg.clip_t_convention or paper.scale


def caption_for_clip_t(prompt: str, cfg: EvalConfig) -> str:
    """The text CLIP-T compares a sample of `prompt` with, under the protocol's (or the user's) convention."""
    text, scale = clip_t_setting(cfg)
    return M.clip_t_caption(M.prompt_for_clip_t(prompt, cfg.subject, text, cfg.class_word), scale)


def describe_convention(cfg: EvalConfig, metric: str) -> str:
    if metric != "CLIP-T":
        return CONVENTIONS[cfg.protocol][metric].rule
    text, scale = clip_t_setting(cfg)
    how = f"subject replaced by {cfg.class_word!r}" if text == "class" else M.CLIP_T_TEXTS[text]
    return f"{M.CLIP_T_CONVENTIONS[scale]}; {how}"


def convention_origin(cfg: EvalConfig, metric: str) -> dict:
    """On whose word each aspect of a metric's rule stands: the paper's (quoted), ours where it is silent, or a
    user's flag that overrode it (MetricResult.origin)."""
    convention = CONVENTIONS[cfg.protocol][metric]
    paper, ours, user = dict(convention.paper), dict(convention.ours), {}
    if metric == "CLIP-T":
        chosen = dict(zip(("text", "scale"), clip_t_setting(cfg)))
        flags = {"text": ("--clip-t-text", cfg.clip_t_text), "scale": ("--clip-t-convention", cfg.clip_t_convention)}
        for aspect, (flag, value) in flags.items():
            if value is not None and value != getattr(convention, aspect):
                paper.pop(aspect, None)
                ours.pop(aspect, None)
                user[aspect] = f"{flag} {value}"
            elif chosen[aspect] != getattr(convention, aspect):  # the class-word fallback
                paper.pop(aspect, None)
                ours[aspect] = "no class word is known, so the subject is removed instead of replaced by it"
    return {"protocol": cfg.protocol, "paper": paper, "ours": ours, "user": user}


def esr_prompts(cfg: EvalConfig):
    return TOY_ESR if toy_world(cfg) else SINGLEINSERT_ESR


def _judge(cfg: EvalConfig, clip):
    kind = judge_kind(cfg)
    if kind == "toy":
        from ..toyworld.judge import ToyJudge

        return ToyJudge.load(), {"judge": "toy-world attribute CNN"}
    if kind == "clip":
        from .esr import ClipJudge

        return ClipJudge(clip, cfg.class_word or "person"), {"judge": "zero-shot CLIP", **clip.provenance()}
    from .esr import CsvJudge

    return CsvJudge(cfg.judge), {"judge": f"human judgements {cfg.judge}"}


def read_mask(path: Path) -> Image.Image:
    """A mask file as gray, white = the concept; an alpha-only cut-out gives its alpha (as training reads masks)."""
    with Image.open(path) as image:
        image.load()
    gray = image.convert("L")
    low, high = gray.getextrema()
    return image.getchannel("A") if image.mode in ("RGBA", "LA") and low == high else gray


def reference_masks(cfg: EvalConfig) -> list:
    """The references' masks, found as training finds them (`data.find_mask`); on the toy world a reference without
    a mask file is segmented by its background (exact for a rendered scene up to its anti-aliased rim)."""
    from .toy import foreground_mask

    masks = []
    for path in image_paths(cfg.references):
        try:
            masks.append(read_mask(find_mask(path, cfg.reference_masks)))
        except PersonalizeError:
            if cfg.generated_masks != TOY_MASKS:
                raise
            masks.append(foreground_mask(load_rgb(path)))
    return masks


def generated_masks(cfg: EvalConfig, paths: list[Path], images: list[Image.Image]) -> list:
    """The samples' masks: NAME.mask.png in --generated-masks for samples/NAME.png, or the toy segmentation."""
    from .toy import foreground_mask

    if cfg.generated_masks == TOY_MASKS:
        return [foreground_mask(image) for image in images]
    return [read_mask(find_mask(Path(cfg.generated_masks) / path.name)) for path in paths]


def _masks_provenance(cfg: EvalConfig) -> dict:
    toy = "toy-world background segmentation (evaluate.toy.foreground_mask)"
    return {"generated_masks": toy if cfg.generated_masks == TOY_MASKS else cfg.generated_masks,
            "reference_masks": cfg.reference_masks or "NAME.mask.png beside each reference"}


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
    reference_masks: list = field(default_factory=list)
    heldout: list[Image.Image] = field(default_factory=list)


def load_networks(cfg: EvalConfig, wanted: list[str]) -> Networks:
    nets, wanted = Networks(), set(wanted)
    masked = wanted & set(MASKED)
    if {"CLIP-I", "CLIP-I-f", "CLIP-I-b", "CLIP-T"} & wanted or ("ESR" in wanted and judge_kind(cfg) == "clip"):
        nets.clip = M.ClipScorer.load(cfg.clip_model, cfg.allow_download)
    if {"DINO", "DINO-f", "DINO-b"} & wanted:
        nets.dino = M.DinoScorer.load(cfg.dino_model, cfg.allow_download)
    if "ESR" in wanted or cfg.protocol == "toy":
        nets.judge, nets.judge_provenance = _judge(cfg, nets.clip)
    if "FID" in wanted:
        nets.inception, nets.heldout = M.InceptionFeatures(cfg.inception), _images(cfg.heldout)
    if "DIV" in wanted:
        nets.lpips = M.LPIPS.load(cfg.lpips_backbone)
    if {"CLIP-I", "DINO", "judge-I"} & wanted or masked:
        nets.references = _images(cfg.references)
    if masked:
        if cfg.generated_masks != TOY_MASKS and not Path(cfg.generated_masks).is_dir():
            raise PersonalizeError(f"--generated-masks {cfg.generated_masks}: no such folder (give the folder of the "
                                   f"samples' NAME.mask.png files, or `{TOY_MASKS}` on the toy world)")
        nets.reference_masks = reference_masks(cfg)
    return nets


def _pairwise(generated, references, groups: dict, per_prompt: int) -> tuple[float, dict[str, float]]:
    """Mean cos over every (generated, reference) pair of embeddings: overall, and for each prompt's samples."""
    by_prompt = {prompt: M.mean_pairwise_cosine(generated[i * per_prompt : (i + 1) * per_prompt], references)
                 for i, prompt in enumerate(groups)}
    return M.mean_pairwise_cosine(generated, references), by_prompt


def _embed_masked(scorer, images: list[Image.Image], masks: list, keep: str):
    """Embeddings of the images with all but their `keep` region ("foreground" / "background") painted out."""
    return scorer.image_embeddings([M.apply_mask(image, mask, keep) for image, mask in zip(images, masks)])


def score(cfg: EvalConfig, plan: list[PromptSet], drawn: list[dict], wanted: list[str], nets: Networks):
    """(MetricResults, {prompt: {metric: value}})."""
    scorers = {"clip": nets.clip, "dino": nets.dino}
    references = nets.references
    results, per_prompt = [], {}

    def record(name, value, n, provenance, by_prompt=None):
        results.append(M.MetricResult(name, float(value), n, describe_convention(cfg, name), provenance,
                                      origin=convention_origin(cfg, name)))
        for prompt, v in (by_prompt or {}).items():
            per_prompt.setdefault(prompt, {})[name] = float(v)

    for ps, groups, paths in zip(plan, drawn, sample_paths(cfg, plan)):
        images = [im for group in groups.values() for im in group]
        for name, scorer in (("CLIP-I", nets.clip), ("DINO", nets.dino)):
            if name in wanted and "reference" in ps.scores:
                generated, refs = scorer.image_embeddings(images), scorer.image_embeddings(references)
                overall, by_prompt = _pairwise(generated, refs, groups, ps.per_prompt)
                record(name, overall, len(images), scorer.provenance(), by_prompt)
        masked = [name for name in MASKED if name in wanted and "masked" in ps.scores]
        if masked:
            masks = generated_masks(cfg, [p for group in paths.values() for p in group], images)
            for name in masked:
                network, keep = MASKED[name]
                scorer = scorers[network]
                generated = _embed_masked(scorer, images, masks, keep)
                refs = _embed_masked(scorer, references, nets.reference_masks, keep)
                overall, by_prompt = _pairwise(generated, refs, groups, ps.per_prompt)
                record(name, overall, len(images), {**scorer.provenance(), **_masks_provenance(cfg)}, by_prompt)
        if "CLIP-T" in wanted and "text" in ps.scores:
            clip, scale = nets.clip, clip_t_setting(cfg)[1]
            texts = [caption_for_clip_t(p, cfg) for p, group in groups.items() for _ in group]
            image_emb, text_emb = clip.image_embeddings(images), clip.text_embeddings(texts)
            rows = {prompt: slice(i * ps.per_prompt, (i + 1) * ps.per_prompt) for i, prompt in enumerate(groups)}
            record("CLIP-T", M.clip_t_from_embeddings(image_emb, text_emb, scale), len(images), clip.provenance(),
                   {p: M.clip_t_from_embeddings(image_emb[r], text_emb[r], scale) for p, r in rows.items()})
        if "FID" in wanted and "distribution" in ps.scores:
            inception, heldout = nets.inception, nets.heldout
            record("FID", float(M.fid(inception(images), inception(heldout))), len(images),
                   {**inception.provenance(), "heldout_images": len(heldout)})
        if "DIV" in wanted and "diversity" in ps.scores:
            # = M.div_lpips (the mean over prompts of each prompt's mean pairwise LPIPS), keeping its terms
            by_prompt = {prompt: M.mean_pairwise_lpips(group, nets.lpips) for prompt, group in groups.items()}
            record("DIV", sum(by_prompt.values()) / len(by_prompt), len(images), nets.lpips.provenance(), by_prompt)
        if "ESR" in wanted and "esr" in ps.scores:
            esr_list = esr_prompts(cfg)
            by_template = {p.template: groups[p.template.format(cfg.subject)] for p in esr_list}
            esr = editing_success_rate(by_template, list(esr_list), nets.judge)
            record("ESR", esr.overall, esr.n_images, nets.judge_provenance,
                   {p.template.format(cfg.subject): esr.per_prompt[p.template] for p in esr_list})
        if "judge" in ps.scores:
            from . import toy as T

            if "judge-I" in wanted:
                record("judge-I", T.feature_similarity(nets.judge, images, references), len(images), nets.judge_provenance)
            record("judge-DIV", T.diversity(nets.judge, images), len(images), nets.judge_provenance)
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
