"""Latents a run trains on: each training image (and its mirror) encoded once by the VAE and sampled from then on.

`LatentCache` keeps each image's latent distribution (mean and std), per image size (aspect-ratio buckets), with
the masks and SDXL time ids of its rows; a batch draws z = mean + std·ε through the run's generator, so a resumed
run draws exactly what an uninterrupted one would. `class_image_cache` is DreamBooth's prior preservation: class
images drawn by the base model before training, cached the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .data import Subset, load_image_folder
from .errors import PersonalizeError
from .generate import generate_images, save_png

if TYPE_CHECKING:
    from .methods import Concept
    from .trainer import TrainConfig

log = logging.getLogger("personalize")


class _Shard:
    """The cached latents of images of one size (one aspect-ratio bucket), with their mirrors after them."""

    def __init__(self, backbone, pixels: torch.Tensor, image_ids: list[int], flip: bool, device,
                 masks: torch.Tensor | None, time_ids: torch.Tensor | None, repeats: list[int], draw_once: int | None = None):
        self.num_images = len(pixels)
        self.row_weights = torch.tensor([float(r) for r in repeats] * (2 if flip else 1))  # a subset's repeats
        if flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
            masks = torch.cat([masks, masks.flip(-1)]) if masks is not None else None
        self.image_ids = torch.tensor(image_ids * (2 if flip else 1))
        self.time_ids = time_ids.to(device) if time_ids is not None else None  # one row per cached row
        means, stds = zip(*(backbone.encode_images(chunk) for chunk in pixels.split(8)))
        self.mean, self.std = torch.cat(means).to(device), torch.cat(stds).to(device)
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.std).all()):
            raise PersonalizeError(
                f"the VAE gave inf/NaN latents (in {backbone.vae.dtype}); SDXL's VAE overflows in fp16: keep it in fp32 "
                "(--mixed-precision bf16 or no), or use an fp16-safe VAE such as madebyollin/sdxl-vae-fp16-fix in the model folder")
        if draw_once is not None:  # one posterior sample per row, kept: every later draw returns it (kohya's cached latents)
            eps = torch.randn(self.mean.shape, generator=torch.Generator().manual_seed(draw_once)).to(self.mean.device)
            self.mean, self.std = self.mean + self.std * eps, torch.zeros_like(self.std)
        self.masks = None
        if masks is not None:
            self.masks = torch.nn.functional.interpolate(masks.float(), size=self.mean.shape[-2:], mode="area").to(device)


class LatentCache:
    """Each training image (and its mirror) encoded once; a batch samples z = mean + std·ε from the cache.

    Images of different sizes (aspect-ratio buckets) are cached per size, and a batch is drawn from one bucket
    only, chosen with probability proportional to its number of images (each counted `repeats` times: a subset's
    repeats make its images that much more frequent). A batch's rows are independent draws (an image can come twice),
    or with `distinct` distinct images while the bucket has enough (`_distinct_rows`). With `draw_once` (a seed) each
    row's z is drawn once, when cached, and returned by every batch after. Foreground masks, when given, are kept at
    the latent grid (area-averaged, so edge cells are fractional) and mirrored with their images. After `sample`,
    `last_time_ids` (SDXL) and `last_flipped` describe the rows drawn.
    """

    def __init__(self, backbone, pixels: torch.Tensor | list[torch.Tensor], flip: bool, device,
                 masks: torch.Tensor | list[torch.Tensor] | None = None, time_ids: torch.Tensor | None = None,
                 repeats: list[int] | None = None, distinct: bool = False, draw_once: int | None = None):
        pixels = list(pixels)
        self.distinct = distinct
        repeats = repeats or [1] * len(pixels)
        by_size: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixels):
            by_size.setdefault(tuple(p.shape[-2:]), []).append(i)
        n = len(pixels)
        self.shards = []
        for ids in by_size.values():
            rows = ids + ([i + n for i in ids] if flip else [])  # time_ids rows: every image, then every mirror
            self.shards.append(_Shard(
                backbone, torch.stack([pixels[i] for i in ids]), ids, flip, device,
                torch.stack([masks[i] for i in ids]) if masks is not None else None,
                time_ids[rows] if time_ids is not None else None, [repeats[i] for i in ids], draw_once))
        self.weights = torch.tensor([float(s.row_weights.sum()) for s in self.shards])
        self.num_images = n

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The latent (height, width) of each bucket."""
        return [tuple(s.mean.shape[-2:]) for s in self.shards]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(latents, image index of each row, masks) of `batch_size` rows of one bucket."""
        shard = self.shards[0]
        if len(self.shards) > 1:  # one draw more only with buckets: square runs keep their random sequence
            shard = self.shards[int(torch.multinomial(self.weights, 1, generator=generator))]
        if self.distinct:
            rows = _distinct_rows(shard, batch_size, generator)
        elif bool((shard.row_weights == shard.row_weights[0]).all()):  # no repeats: the plain draw, as ever
            rows = torch.randint(0, len(shard.mean), (batch_size,), generator=generator)
        else:
            rows = torch.multinomial(shard.row_weights, batch_size, replacement=True, generator=generator)
        # ε is drawn even where the draw was made once (std 0): the run's random stream stays the same either way
        eps = torch.randn(shard.mean[rows].shape, generator=generator).to(shard.mean.device)
        masks = shard.masks[rows.to(shard.masks.device)] if shard.masks is not None else None
        self.last_flipped = rows >= shard.num_images
        self.last_time_ids = shard.time_ids[rows.to(shard.time_ids.device)] if shard.time_ids is not None else None
        return shard.mean[rows] + shard.std[rows] * eps, shard.image_ids[rows], masks


def _distinct_rows(shard: _Shard, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` rows of distinct images (a bucket with fewer images repeats them only after each was drawn once),
    each image's mirror instead with probability ½ where mirrors are cached: what one batch of diffusers' or kohya's
    shuffled epochs holds, drawn afresh each batch (no epoch state, so a resumed run still draws what an uninterrupted
    one would). Repeats weight the draw as in the independent one."""
    n = shard.num_images
    weights = shard.row_weights[:n]
    images = torch.cat([torch.multinomial(weights, min(n, batch_size - start), replacement=False, generator=generator)
                        for start in range(0, batch_size, n)])
    if len(shard.mean) > n:  # mirrors cached: rows n.. are the mirrors of images 0..n-1
        images = images + n * (torch.rand(batch_size, generator=generator) < 0.5).long()
    return images


def class_image_cache(cfg: TrainConfig, method_cfg, subsets: list[Subset], concepts: list[Concept], backbone, output: Path,
                      resolution: int, device) -> tuple[LatentCache | None, list[int] | None]:
    """DreamBooth's prior preservation: class images drawn by the base model (before any LoRA), cached as latents,
    per concept (OUTPUT/class_images, or OUTPUT/class_images/<class word> with several classes, or the subset's
    own folder); returns the cache and the concept of each class image."""
    if not getattr(method_cfg, "prior_preservation", False):
        return None, None
    pixels, class_concepts, done = [], [], {}
    several = len({c.class_word for c in concepts}) > 1
    for index, (subset, concept) in enumerate(zip(subsets, concepts)):
        default = output / "class_images" / concept.class_word if several else output / "class_images"
        folder = Path(subset.class_images or default)
        if folder not in done:
            done[folder] = _class_images(cfg, method_cfg, backbone, folder, concept, resolution)
        pixels += done[folder]
        class_concepts += [index] * len(done[folder])
    return LatentCache(backbone, pixels, cfg.flip, device), class_concepts


def _class_images(cfg: TrainConfig, method_cfg, backbone, folder: Path, concept: Concept, resolution: int) -> list[torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    missing = method_cfg.num_class_images - len(have)
    if missing > 0:
        prompt = method_cfg.class_prompt.format(token=concept.token, class_word=concept.class_word)
        log.info("generating %d class images for %r into %s", missing, prompt, folder)
        for i in tqdm(range(len(have), method_cfg.num_class_images), desc="class images", dynamic_ncols=True):
            (image,) = generate_images(backbone, [prompt], [cfg.seed + 10_000 + i], steps=cfg.inference_steps,
                                       guidance=cfg.guidance, resolution=resolution)
            save_png(image, folder / f"class-{i:05d}.png")
    return [im.pixels for im in load_image_folder(folder, resolution)[: method_cfg.num_class_images]]
