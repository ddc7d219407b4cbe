"""The papers' evaluation protocols: which prompts, how many images, which references.

- DreamBench (Ruiz et al.; BaTex and SingleInsert report on it): 25 object or 25 live-subject prompts, 4 images
  each, DINO / CLIP-I / CLIP-T averaged. The prompt lists and subject classes ship in
  `assets/dreambench/prompts_and_classes.txt` (the benchmark's own file, CC-BY-4.0) and are parsed from it.
- BaTex (appendix E): 64 images of "a photo of *" for image alignment; an editing prompt list (background
  changes and style transfer, the paper's two examples plus the same kinds) for text alignment.
- SingleInsert (appendix A.2): the 10 ESR prompts, 10 seeds each; one point per prompt, half a point per target
  when a prompt has two. The paper marks targets by colour only; the split into targets below is ours.
- Dis²Booth: a reference set of 30 images per category to train on, 128 generated images compared with the
  held-out real images of the category (FID, LPIPS diversity).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
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
