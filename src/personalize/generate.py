"""Inference: load any number of concepts into a base model and sample prompts with fixed seeds.

Training-time validation calls `generate_images` too, so what a run previews is exactly what `personalize
generate` draws.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from .concepts import FixedVectors, add_placeholder_tokens, concept_embedding
from .errors import PersonalizeError
from .export import atomic_write, load_embedding_file


def install_concept(backbone, path: str | Path, token: str | None = None) -> str:
    """Load an embedding file (or a run's folder) into the backbone; return the placeholder to use in prompts."""
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


@torch.no_grad()
def generate_images(
    backbone,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int = 30,
    guidance: float = 7.5,
    resolution: int | None = None,
    negative_prompt: str | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed), prompt-major. The pipeline expands multi-vector placeholders itself."""
    size = resolution or backbone.default_resolution
    device = backbone.unet.device
    images = []
    for prompt in prompts:
        for seed in seeds:
            generator = torch.Generator(device=device).manual_seed(seed)
            out = backbone.pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=size,
                width=size,
                generator=generator,
            )
            images.append(out.images[0])
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
