"""Inference: load any number of concepts into a base model and sample prompts with fixed seeds.

Training-time validation calls `generate_images` too, so what a run previews is exactly what `personalize
generate` draws.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch
from PIL import Image

from .backbone import seeded_noise
from .concepts import FixedVectors, add_placeholder_tokens, concept_embedding
from .errors import PersonalizeError
from .export import CONCEPTS_DIR, EMBEDDINGS_FILE, atomic_write, load_embedding_file
from .lora import LORA_FILE


def run_settings(concept: str | Path) -> dict:
    """The resolved config.yaml of a run folder (empty for a bare file): its model, token, class word, images."""
    import yaml

    path = Path(concept) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PersonalizeError(f"{path} is not readable YAML ({exc})") from exc


def install_concept(backbone, path: str | Path, token: str | None = None, lora_scale: float = 1.0) -> str:
    """Load a run's folder (its embedding and/or LoRA) or one file into the backbone; return what was loaded.

    LoRAs get adapter names `concept_0`, `concept_1`, ... and are combined with their own scales, so concepts
    trained separately compose in one prompt. A run of several concepts (`OUTPUT/concepts/<name>/`) loads each.
    """
    path = Path(path)
    loaded = []
    if path.is_dir() and (path / CONCEPTS_DIR).is_dir():
        if token is not None:
            raise PersonalizeError(f"{path} holds several concepts: rename one by passing its folder {path / CONCEPTS_DIR}/NAME")
        loaded += [_install_embedding(backbone, sub / EMBEDDINGS_FILE, None)
                   for sub in sorted((path / CONCEPTS_DIR).iterdir()) if (sub / EMBEDDINGS_FILE).is_file()]
    embedding = path / EMBEDDINGS_FILE if path.is_dir() else (None if is_lora_file(path) else path)
    lora = path / LORA_FILE if path.is_dir() else (path if is_lora_file(path) else None)
    if embedding is not None and (embedding.exists() or not path.is_dir()):
        loaded.append(_install_embedding(backbone, embedding, token))
    if lora is not None and lora.exists():
        loaded.append(_install_lora(backbone, lora, lora_scale))
    if not loaded:
        raise PersonalizeError(f"{path} holds neither {EMBEDDINGS_FILE} nor {LORA_FILE}: is it a personalize run folder?")
    return ", ".join(loaded)


# The down-projection's name in every LoRA layout diffusers' load_lora_weights reads: PEFT (`lora_A`), kohya
# (`lora_down`), and diffusers' own before PEFT (`to_q_lora.down` in attention processors, `lora_linear_layer.down` in
# text encoders: what diffusers 0.20-era scripts such as SingleInsert's official code save).
LORA_DOWN_NAMES = ("lora_A", "lora_down", "_lora.down", "lora_linear_layer.down", ".lora.down")


def is_lora_file(path: Path) -> bool:
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return any(name in k for k in f.keys() for name in LORA_DOWN_NAMES)
    except Exception:  # noqa: BLE001 - not readable as safetensors: let the embedding reader name the problem
        return False


def _install_lora(backbone, path: Path, scale: float) -> str:
    pipe = backbone.pipe
    names = [n for names in pipe.get_list_adapters().values() for n in names] if hasattr(pipe, "get_list_adapters") else []
    name = f"concept_{len(set(names))}"
    try:
        with warnings.catch_warnings():  # peft warns on every adapter after the first: composing is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            # Folder and file name given apart: diffusers 0.35 refuses a bare path when offline (HF_HUB_OFFLINE).
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a LoRA of another model
        raise PersonalizeError(f"{path}: this LoRA does not fit {backbone.name} ({type(exc).__name__}: {str(exc)[:200]})") from exc
    backbone.lora_scales = {**getattr(backbone, "lora_scales", {}), name: scale}
    pipe.set_adapters(list(backbone.lora_scales), adapter_weights=list(backbone.lora_scales.values()))
    return f"LoRA {path.name} (scale {scale})"


def _install_embedding(backbone, path: Path, token: str | None) -> str:
    token, vectors = load_embedding_file(path, token)
    if len(vectors) != len(backbone.text_encoders):
        raise PersonalizeError(
            f"{path} has embeddings for {len(vectors)} text encoder(s) but {backbone.name} has {len(backbone.text_encoders)}"
        )
    for vec, dim in zip(vectors, backbone.embedding_dims):
        if vec.shape[1] != dim:
            raise PersonalizeError(f"{path} holds {vec.shape[1]}-d vectors but {backbone.name} expects {dim}-d: another base model?")
    for vec, tokenizer, encoder in zip(vectors, backbone.tokenizers, backbone.text_encoders):
        first_id = add_placeholder_tokens(tokenizer, token, vec.shape[0])[0]
        concept_embedding(encoder).add(token, first_id, FixedVectors(vec).to(encoder.device))
    return token


# Samplers a user of A1111 or ComfyUI knows by name -> diffusers' scheduler class; each is built from the model's own
# scheduler config, so its noise schedule and prediction type (ε or v) stay the model's.
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@contextlib.contextmanager
def sampler_of(pipe, name: str | None):
    """The pipeline samples with `name` (a SAMPLERS key) inside the block, and with its own scheduler again after."""
    if name is None:
        yield
        return
    if name not in SAMPLERS:
        raise PersonalizeError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    import diffusers

    own = pipe.scheduler
    pipe.scheduler = getattr(diffusers, SAMPLERS[name]).from_config(own.config)
    try:
        yield
    finally:
        pipe.scheduler = own


@torch.no_grad()
def generate_images(
    backbone,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    resolution: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 1,
    sampler: str | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed), prompt-major. The pipeline expands multi-vector placeholders itself.

    Each image's starting noise comes from its own seeded generator, so image (prompt, seed) is the same whatever
    `batch_size` draws it with (up to float rounding of batched matrix products). `steps` and `guidance` default to
    the model's own recommended settings (`backbone.sampler`); `sampler` (a SAMPLERS name) to the model's scheduler.
    """
    steps = backbone.sampler["inference_steps"] if steps is None else steps
    guidance = backbone.sampler["guidance"] if guidance is None else guidance
    size = resolution or backbone.default_resolution
    images = []
    with sampler_of(backbone.pipe, sampler):
        for prompt in prompts:
            images += _draw(backbone, prompt, seeds, steps, guidance, size, negative_prompt, batch_size)
    return images


def _draw(backbone, prompt: str, seeds: list[int], steps: int, guidance: float, size: int, negative_prompt: str | None,
          batch_size: int) -> list[Image.Image]:
    images = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        out = backbone.pipe(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            num_images_per_prompt=len(chunk),
            generator=[seeded_noise(seed) for seed in chunk],
        )
        images.extend(out.images)
    return images


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def save_png(image: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
