"""The papers' evaluation protocols: which prompts, how many images, which references.

- DreamBench (Ruiz et al.; BaTex and SingleInsert report on it): 25 object or 25 live-subject prompts, 4 images
  each, DINO / CLIP-I / CLIP-T averaged. The prompt lists and subject classes ship in
  `assets/dreambench/prompts_and_classes.txt` (the benchmark's own file, CC-BY-4.0) and are parsed from it.
- BaTex (appendix E): 64 images of "a photo of *" for image alignment; an editing prompt list (background
  changes and style transfer, the paper's two examples plus the same kinds) for text alignment.
- SingleInsert (appendix A.2): the 10 ESR prompts, 10 seeds each; one point per prompt, half a point per target
  when a prompt has two. The paper marks targets by colour only; the split into targets below is ours.
- SingleInsert (§4.1, Table 1): the same prompts and seeds scored for CLIP-T, CLIP-I-f/-b and DINO-f/-b (the
  source image and the samples masked to their foreground / background), DIV and ESR.
- Dis²Booth: a reference set of 30 images per category to train on, 128 generated images compared with the
  held-out real images of the category (FID, LPIPS diversity).

Each protocol also carries how its paper computes each metric (`CONVENTIONS`): the paper's words where it states
the rule, our choice (and why) where it is silent. The report records both with every figure.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PersonalizeError

DREAMBENCH_FILE = Path(__file__).resolve().parent.parent / "assets" / "dreambench" / "prompts_and_classes.txt"
LIVE_CLASSES = {"cat", "dog"}  # DreamBench's live subjects; every other class uses the object prompts


@dataclass(frozen=True)
class EsrPrompt:
    template: str  # "{}" stands for the subject, e.g. "<concept> face"
    targets: tuple[str, ...]  # what a judge checks; each is worth 1/len(targets) of the prompt's point


SINGLEINSERT_ESR = (
    EsrPrompt("A NBA/WNBA player, {}", ("a basketball player",)),
    EsrPrompt("{} funko pop", ("a funko pop figure",)),
    EsrPrompt("A tattoo of {} on the back", ("a tattoo on a person's back",)),
    EsrPrompt("A person wearing police uniform and a blue beret, {}", ("a police uniform", "a blue beret")),
    EsrPrompt("A person wearing sunglasses smiling, {}", ("sunglasses", "a smiling person")),
    EsrPrompt("A side view {} with long/short hair", ("a side view", "long or short hair")),
    EsrPrompt("An oil painting of {} in a wooden frame", ("an oil painting", "a wooden frame")),
    EsrPrompt("A {} person took a selfie with Obama in the forest", ("a selfie of two people", "a forest")),
    EsrPrompt("A book with a person wearing a crown on it, {}", ("a book cover", "a crown")),
    EsrPrompt("{} with teal hair, in front of a pink wall", ("teal hair", "a pink wall")),
)

# The toy world's ESR list (its judge reads `attribute=value` targets): edits of the scene around the concept,
# one or two targets each, scored like SingleInsert's. `{}` is the subject ("<concept> heart").
TOY_ESR = (
    EsrPrompt("a {} on a black background", ("background=black",)),
    EsrPrompt("a {} on a white background", ("background=white",)),
    EsrPrompt("a {} on a gray background", ("background=gray",)),
    EsrPrompt("a small {}", ("size=small",)),
    EsrPrompt("a {}, left", ("position=left",)),
    EsrPrompt("a {}, top", ("position=top",)),
    EsrPrompt("a large {} on a black background", ("size=large", "background=black")),
    EsrPrompt("a {} on a white background, right", ("background=white", "position=right")),
    EsrPrompt("a small {} on a gray background", ("size=small", "background=gray")),
    EsrPrompt("a {} on a black background, bottom", ("background=black", "position=bottom")),
)

BATEX_IMAGE_PROMPT = "a photo of {}"
BATEX_TEXT_PROMPTS = (
    "a photo of {} on the beach",
    "a photo of {} in the snow",
    "a photo of {} in the jungle",
    "a photo of {} on a cobblestone street",
    "a painting of {} in the style of Van Gogh",
    "a waterfall in the style of {}",
    "a cartoon drawing of {}",
    "a photo of {} with the Eiffel Tower in the background",
)


def parse_dreambench(path: str | Path = DREAMBENCH_FILE) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject -> class, the 25 object prompt templates, the 25 live prompt templates) with {0}/{1} slots."""
    text = Path(path).read_text(encoding="utf-8")
    classes = dict(re.findall(r"^([a-z0-9_]+),([a-z ]+)$", text.split("Prompts")[0], flags=re.M))
    classes.pop("subject_name", None)
    lists = re.findall(r"prompt_list = \[(.*?)\]", text, flags=re.S)
    if len(lists) != 2:
        raise PersonalizeError(f"{path}: expected the object and live prompt lists")
    object_prompts, live_prompts = ([m for m in re.findall(r"'([^']*)'\.format", block)] for block in lists)
    return classes, object_prompts, live_prompts


def dreambench_prompts(token: str, class_word: str, live: bool | None = None) -> list[str]:
    """The 25 DreamBench prompts for one subject ("a {token} {class} in the jungle", ...)."""
    _, object_prompts, live_prompts = parse_dreambench()
    live = class_word in LIVE_CLASSES if live is None else live
    return [p.format(token, class_word) for p in (live_prompts if live else object_prompts)]


def split_reference_heldout(files: list[Path], reference_size: int = 30, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Dis²Booth's protocol: a seeded random reference set to train on; the rest is held out for FID."""
    if len(files) <= reference_size:
        raise PersonalizeError(f"{len(files)} images cannot give a reference set of {reference_size} and a held-out set")
    shuffled = sorted(files)
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[:reference_size]), sorted(shuffled[reference_size:])


# -- how each paper computes each metric ----------------------------------------------------------------------


@dataclass(frozen=True)
class Convention:
    """How one protocol computes one metric, and on whose word.

    `paper` maps each aspect of the rule that the paper states (itself, or through the work it cites for the
    metric) to those words; `ours` maps each aspect it leaves open to what we chose and why. CLIP-T also says which
    text CLIP reads (`text`: what stands for the subject, see `metrics.prompt_for_clip_t`) and on which scale
    (`scale`, see `metrics.CLIP_T_CONVENTIONS`); --clip-t-text and --clip-t-convention override those two.
    """

    rule: str = ""  # in words, for the report; CLIP-T's is built from `text` and `scale`
    paper: dict[str, str] = field(default_factory=dict)
    ours: dict[str, str] = field(default_factory=dict)
    text: str | None = None
    scale: str | None = None


# DreamBooth (Ruiz et al. 2023, §4.1) and Textual Inversion (Gal et al. 2022, §4.3) are quoted from the published
# papers: they are not among ../shared/papers, so these two quotes could not be checked against a file here.
DREAMBOOTH = "DreamBooth §4.1: "
TEXTUAL_INVERSION = "Textual Inversion §4.3 (which BaTex follows): "
SINGLEINSERT = "SingleInsert §4.1: "
SINGLEINSERT_FOLLOWS_DREAMBOOTH = SINGLEINSERT + (
    '"Following Dreambooth (Ruiz et al., 2023a), we adopt CLIP (Radford et al., 2021) visual similarity (CLIP-I) and '
    'DINO (Caron et al., 2021) similarity to evaluate the image-alignment degree, and CLIP text-image similarity '
    '(CLIP-T) as the measurement for text-alignment"')
CLASS_WORD_CHOICE = ("the paper does not say what stands for the learned subject in the text CLIP reads; we put the "
                     "class word in its place (\"a dog in the jungle\"): CLIP has never seen the identifier or token")
MASKING_CHOICE = ("the paper does not say how a region is cut out: outside the kept region is painted black, and a "
                  "foreground is cropped to the square around its mask (metrics.apply_mask)")
MASKS_CHOICE = ("the paper makes its source masks with GroundingDINO + SAM and does not say how it masks generated "
                "images: --generated-masks (`personalize mask` on the samples: the same two networks) or, on the toy "
                "world, the scene's flat background colour (evaluate.toy.foreground_mask)")
SINGLEINSERT_CLIP_T = Convention(text="class", scale="raw", paper={
    "scale": SINGLEINSERT_FOLLOWS_DREAMBOOTH + "; " + DREAMBOOTH + '"the average cosine similarity between prompt and '
             'image CLIP embeddings. We denote this as CLIP-T"'}, ours={"text": CLASS_WORD_CHOICE})
SINGLEINSERT_ESR_RULE = Convention("one point per prompt, 1/k per target, averaged over prompts and seeds", paper={
    "rule": 'SingleInsert A.2: "Each editing prompt equals one point, meaning those with two requirements are scored '
            'a half point for each target. Typically, we generate 10 images with different seeds per prompt"'}, ours={
    "targets": "the paper marks targets by colour; the split into targets is ours (protocols.SINGLEINSERT_ESR)",
    "judge": "the paper does not say who judged: --judge clip (zero-shot CLIP), a CSV of human judgements, or toy"})


def _masked(network: str, region: str, better: str) -> Convention:
    return Convention(f"mean cos of {network} embeddings, {region} of every sample x {region} of the source image(s)",
                      paper={"region": SINGLEINSERT + '"we separately calculate the image-alignment scores on the '
                                                      f'foreground and background region" ({better})',
                             "pairs": SINGLEINSERT_FOLLOWS_DREAMBOOTH},
                      ours={"masking": MASKING_CHOICE, "masks": MASKS_CHOICE})


CONVENTIONS: dict[str, dict[str, Convention]] = {
    "dreambench": {
        "CLIP-I": Convention("mean cos of CLIP embeddings over every (generated, reference) pair", paper={
            "rule": DREAMBOOTH + '"CLIP-I is the average pairwise cosine similarity between CLIP embeddings of '
                                 'generated and real images"'}),
        "DINO": Convention("mean cos of DINO CLS embeddings over every (generated, reference) pair", paper={
            "rule": DREAMBOOTH + '"the average pairwise cosine similarity between the ViT-S/16 DINO embeddings of '
                                 'generated and real images"'}),
        "CLIP-T": Convention(text="class", scale="raw", paper={
            "scale": DREAMBOOTH + '"prompt fidelity, measured as the average cosine similarity between prompt and '
                                  'image CLIP embeddings. We denote this as CLIP-T"'}, ours={
            "text": "DreamBooth does not say whether the prompt CLIP reads keeps the identifier (\"a sks dog\"); "
                    "we put the class word in place of the subject (\"a dog in the jungle\")"}),
    },
    "batex": {
        "CLIP-I": Convention("mean cos of CLIP embeddings, 64 samples of \"a photo of S\" x the training images", paper={
            "rule": 'BaTex app. E: "For each concept, we generate 64 examples using the learned embeddings with the '
                    'prompt "A photo of *". We then compute the average pair-wise CLIP-space cosine similarity '
                    'between the generated images and the images in the training dataset"'}),
        "DINO": Convention("mean cos of DINO CLS embeddings on CLIP-I's images", ours={
            "rule": "BaTex reports no DINO; computed DreamBooth's way on CLIP-I's images, for DreamBench-style tables"}),
        "CLIP-T": Convention(text="remove", scale="clipscore", paper={
            "scale": 'BaTex app. E: "we follow the most commonly used metrics in Textual Inversion and measure the '
                     'performance by computing the clip-space scores (Hessel et al., 2021). We use the original '
                     'implementation of CLIPScore" (its scale 2.5*max(cos, 0), and its caption prefix "A photo '
                     'depicts"; BaTex\'s text scores 0.62-0.80 are on that scale)',
            "text": TEXTUAL_INVERSION + '"where we omit the placeholder S* (i.e. "A photo of on the beach")"'}, ours={
            "prompts": "BaTex names two of its prompts (\"A photo of * on the beach\", \"a waterfall in the style of "
                       "*\"); the other six of BATEX_TEXT_PROMPTS are ours, of the same kinds"}),
    },
    "esr": {"ESR": SINGLEINSERT_ESR_RULE, "CLIP-T": SINGLEINSERT_CLIP_T},
    "singleinsert": {
        "CLIP-T": SINGLEINSERT_CLIP_T,
        "CLIP-I-f": _masked("CLIP", "foreground", "higher = better visual fidelity"),
        "CLIP-I-b": _masked("CLIP", "background", "lower = better disentangled from the source background"),
        "DINO-f": _masked("DINO", "foreground", "higher = better visual fidelity"),
        "DINO-b": _masked("DINO", "background", "lower = better disentangled from the source background"),
        "DIV": Convention("mean LPIPS over the pairs of one prompt's samples, averaged over prompts", paper={
            "rule": SINGLEINSERT + '"we adopt the average LPIPS (Zhang et al., 2018) to measure the diversity of '
                                   'samples under the same condition prompts (denoted as DIV)"'}, ours={
            "network": "the paper does not name LPIPS's backbone: AlexNet, v0.1 (the lpips package's default)"}),
        "ESR": SINGLEINSERT_ESR_RULE,
    },
    "distribution": {
        "FID": Convention("Fréchet distance of Inception pool3 features, generated vs held-out images", paper={
            "rule": 'Dis²Booth, Quantitative Experiments: "For every method, 128 images are generated for each '
                    'unseen category ... FID and LPIPS are calculated based on the S_real and S_gen"'}, ours={
            "network": "the paper does not name its FID code: the TF Inception graph of pytorch-fid / clean-fid, "
                       "with clean-fid's resize"}),
        "DIV": Convention("mean LPIPS over the pairs of the generated images", paper={
            "rule": 'Dis²Booth, Quantitative Experiments: "LPIPS is used to measure the diversity"'}, ours={
            "pairs": "the paper does not say which images LPIPS compares: the pairs of generated images (DreamBooth's "
                     "diversity metric), AlexNet v0.1"}),
    },
    "toy": {name: Convention(rule, ours={"rule": "the toy world's stand-in for a paper metric (evaluate/toy.py)"})
            for name, rule in (("judge-I", "mean cos of toy-judge features, generated x reference (the toy CLIP-I)"),
                               ("judge-DIV", "mean 1 - cos of toy-judge features over distinct pairs (the toy DIV)"),
                               ("ESR", "SingleInsert's scoring on the toy world's prompts, toy judge"))},
}
