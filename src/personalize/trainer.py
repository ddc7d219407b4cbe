"""The one training loop, for every method.

Read top to bottom: load the base model and images, encode each image (and its mirror) once with the VAE,
build the method, then step. Each step samples a batch from the cached latent distributions, asks the method
for its loss on each parameter group its schedule names, and steps that group's optimiser. Every random draw
goes through one `torch.Generator` that checkpoints save, so a run killed and resumed continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .backbone import load_backbone
from .data import Buckets, Subset, load_image_folder, read_dataset
from .errors import PersonalizeError
from .export import atomic_write
from .generate import generate_images, make_grid, save_png
from .losses import LossOptions
from .methods import METHODS, Batch, Concept, Method

log = logging.getLogger("personalize")
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "logs.jsonl"


def default_model() -> str:
    """The model used when --model is not given: $PERSONALIZE_MODEL, else the shipped toy model."""
    return os.environ.get("PERSONALIZE_MODEL") or "toy"


@dataclass
class TrainConfig:
    """Options of the loop itself; each method adds its own (see its config dataclass)."""

    method: str = field(default="textual-inversion", metadata={"help": "what to train", "choices": sorted(METHODS)})
    model: str = field(
        default_factory=default_model,
        metadata={"help": "base model: toy | tiny | tiny-v | tiny-xl | random:sd15 | random:sd21 | random:sdxl | diffusers "
                          "folder | .safetensors/.ckpt | hub id ($PERSONALIZE_MODEL, else toy)",
                  "aliases": ["--pretrained_model_name_or_path"]},
    )
    model_config: str | None = field(default=None, metadata={"help": "diffusers folder with the configs of a single-file checkpoint"})
    images: str | None = field(default=None, metadata={"help": "folder of training images", "aliases": ["--instance_data_dir"]})
    dataset: str | None = field(default=None, metadata={"help": "TOML/YAML file of several concepts (subsets: images, token, class_word, "
                                                                 "init_word, caption, repeats, class_images) instead of --images",
                                                        "aliases": ["--dataset_config"]})
    output: str | None = field(default=None, metadata={"help": "folder for checkpoints, previews and artefacts", "aliases": ["--output_dir"]})
    steps: int | None = field(default=None, metadata={"help": "training steps (default: the method's)", "aliases": ["--max_train_steps"]})
    batch_size: int | None = field(default=None, metadata={"help": "images per (sub-)step (default: the method's; 4 for most, "
                                                                    "SingleInsert: 16 in Stage I, 4 in Stage II)", "aliases": ["--train_batch_size"]})
    lr: float | None = field(default=None, metadata={"help": "learning rate before scaling (default: the method's)", "aliases": ["--learning_rate"]})
    scale_lr: bool | None = field(default=None, metadata={"help": "multiply the learning rate by batch size × processes, as diffusers' "
                                                                 "--scale_lr (default: the method's; on, except SingleInsert whose paper "
                                                                 "rates are absolute)"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps of the learning rate", "aliases": ["--lr_warmup_steps"]})
    lr_scheduler: str = field(default="constant", metadata={"help": "learning-rate shape after the warm-up (diffusers' names)",
                                                            "choices": ["constant", "linear", "cosine"], "aliases": ["--lr_scheduler"]})
    resolution: int | None = field(default=None, metadata={"help": "training image size (default: the model's native size)"})
    flip: bool = field(default=True, metadata={"help": "also train on mirrored images"})
    buckets: bool = field(default=False, metadata={"help": "aspect-ratio buckets: keep each image's aspect ratio (about resolution² "
                                                            "pixels) instead of a square crop; a batch never mixes buckets (kohya --enable_bucket)",
                                                   "aliases": ["--enable_bucket"]})
    bucket_max_ratio: float = field(default=2.0, metadata={"help": "with --buckets: the most elongated bucket, long side : short side"})
    bucket_max_upscale: float = field(default=1.0, metadata={"help": "with --buckets: never upscale an image more than this "
                                                                      "(1 = never, kohya --bucket_no_upscale); a smaller image gets a smaller bucket"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    checkpointing_steps: int = field(default=500, metadata={"help": "save a resumable checkpoint every N steps", "aliases": ["--checkpointing_steps"]})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "keep only the newest N checkpoints"})
    validation_steps: int | None = field(default=None, metadata={"help": "preview images every N steps (default: at the end only)"})
    validation_prompts: list[str] | None = field(default=None, metadata={"help": "preview prompts (default: the method's)"})
    num_validation_images: int = field(default=2, metadata={"help": "preview images per prompt (seeds seed, seed+1, ...)"})
    inference_steps: int | None = field(default=None, metadata={"help": "sampler steps of previews (default: the model's recommended, else 30)"})
    guidance: float | None = field(default=None, metadata={"help": "classifier-free guidance of previews (default: the model's recommended, else 7.5)"})
    noise_offset: float = field(default=0.0, metadata={"help": "offset noise: + offset·N(0,1) per image and channel (kohya/diffusers --noise_offset)", "aliases": ["--noise_offset"]})
    snr_gamma: float | None = field(default=None, metadata={"help": "min-SNR-γ loss weighting, ε and v prediction (diffusers --snr_gamma; kohya --min_snr_gamma); 5 is usual", "aliases": ["--snr_gamma", "--min_snr_gamma"]})
    masked_loss: bool = field(default=False, metadata={"help": "weight the denoising loss by NAME.mask.png (kohya --masked_loss, OneTrainer's masked training)", "aliases": ["--masked_loss"]})
    unmasked_weight: float = field(default=0.0, metadata={"help": "with --masked-loss: weight of the area outside the mask (OneTrainer's unmasked weight)"})
    ema_decay: float = field(default=0.0, metadata={"help": "keep an exponential moving average of the trained weights with this decay (0: off; 0.999 is usual)"})
    export_ema: bool = field(default=False, metadata={"help": "write the EMA weights as the run's artefacts and previews (needs --ema-decay)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass instead of storing them: less memory, ~30 % slower steps "
                "(UNet, and text encoders where gradients pass through them)", "aliases": ["--gradient_checkpointing"]})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw, or adamw8bit (bitsandbytes, CUDA only: optimiser state in 8 bits, ~75 % less of it)",
        "choices": ["adamw", "adamw8bit"], "aliases": ["--optimizer_type"]})
    cache_text_embeddings: bool | None = field(default=None, metadata={
        "help": "encode each training prompt once (default: on when the method trains nothing on the text side: "
                "DreamBooth-LoRA without --train-text-encoder, Dis²Booth)", "aliases": ["--cache_text_embeddings"]})
    mixed_precision: str = field(default="no", metadata={"help": "run the frozen networks in half precision", "choices": ["no", "fp16", "bf16"]})
    report_to: str = field(default="none", metadata={"help": "also log to a service (every value is always in OUTPUT/logs.jsonl; "
                                                              "wandb works offline with WANDB_MODE=offline)",
                                                      "choices": ["none", "tensorboard", "wandb"], "aliases": ["--report_to"]})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder", "aliases": ["--resume_from_checkpoint"]})
    overwrite: bool = field(default=False, metadata={"help": "start over in an output folder that holds a run"})


# -- output folder ---------------------------------------------------------------------------------------------


def _read_run(output: Path) -> dict:
    try:
        return json.loads((output / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def prepare_output(cfg: TrainConfig) -> Path:
    """Create the output folder; refuse to clobber an earlier run unless told to resume or overwrite."""
    if not cfg.output:
        raise PersonalizeError("--output is required: the folder where the run writes its files")
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise PersonalizeError(f"--output {output} exists and is not a folder")
    run = _read_run(output)
    has_checkpoints = any((output / "checkpoints").glob("step-*"))
    if cfg.overwrite:
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
        (output / RUN_FILE).unlink(missing_ok=True)
    elif cfg.resume is None and (run or has_checkpoints):
        what = "a finished run" if run.get("status") == "finished" else "an unfinished run"
        raise PersonalizeError(f"{output} already holds {what}; pass --resume latest to continue it or --overwrite to start over")
    output.mkdir(parents=True, exist_ok=True)
    return output


def write_resolved_config(output: Path, cfg: TrainConfig, method_cfg) -> None:
    from . import __version__

    resolved = {"personalize": __version__, **asdict(cfg), **asdict(method_cfg)}
    atomic_write(output / CONFIG_FILE, lambda tmp: tmp.write_text(yaml.safe_dump(resolved, sort_keys=False)))


def _write_run(output: Path, **info) -> None:
    atomic_write(output / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(info, indent=1)))


# -- checkpoints -----------------------------------------------------------------------------------------------


def checkpoint_dirs(output: Path) -> list[Path]:
    found = [p for p in (output / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(output: Path, step: int, method: Method, optimizers, schedulers, generator, limit: int,
                    ema: ParameterEMA | None = None) -> Path:
    """Everything needed to continue exactly, written to a temporary folder and renamed into place."""
    final = output / "checkpoints" / f"step-{step:06d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".step-{step:06d}-"))
    try:
        save_file(method.trainable_state(), str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "method": method.extra_state(),
                "ema": ema.shadow if ema is not None else None,
            },
            tmp / "state.pt",
        )
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PersonalizeError(f"could not write checkpoint {final}: {exc.strerror or exc}") from exc
    for old in checkpoint_dirs(output)[:-limit] if limit > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, method: Method, optimizers, schedulers, generator, ema: ParameterEMA | None = None) -> int:
    method.load_trainable_state(load_file(str(path / "trainable.safetensors")))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    method.load_extra_state(state.get("method", {}))
    if ema is not None:
        if state.get("ema") is None:
            raise PersonalizeError(f"{path} was saved without --ema-decay: resume it without EMA, or start over")
        ema.load(state["ema"])
    return json.loads((path / "step.json").read_text())["step"]


def _find_resume(output: Path, resume: str) -> Path | None:
    if resume != "latest":
        path = Path(resume)
        if not (path / "step.json").exists():
            raise PersonalizeError(f"--resume {resume}: not a checkpoint folder (expected {output}/checkpoints/step-N)")
        return path
    found = checkpoint_dirs(output)
    if not found:
        log.warning("--resume latest: no checkpoint in %s, starting from step 0", output)
    return found[-1] if found else None


# -- data ------------------------------------------------------------------------------------------------------


class _Shard:
    """The cached latents of images of one size (one aspect-ratio bucket), with their mirrors after them."""

    def __init__(self, backbone, pixels: torch.Tensor, image_ids: list[int], flip: bool, device,
                 masks: torch.Tensor | None, time_ids: torch.Tensor | None, repeats: list[int]):
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
        self.masks = None
        if masks is not None:
            self.masks = torch.nn.functional.interpolate(masks.float(), size=self.mean.shape[-2:], mode="area").to(device)


class LatentCache:
    """Each training image (and its mirror) encoded once; a batch samples z = mean + std·ε from the cache.

    Images of different sizes (aspect-ratio buckets) are cached per size, and a batch is drawn from one bucket
    only, chosen with probability proportional to its number of images (each counted `repeats` times: a subset's
    repeats make its images that much more frequent). Foreground masks, when given, are kept at
    the latent grid (area-averaged, so edge cells are fractional) and mirrored with their images. After `sample`,
    `last_time_ids` (SDXL) and `last_flipped` describe the rows drawn.
    """

    def __init__(self, backbone, pixels: torch.Tensor | list[torch.Tensor], flip: bool, device,
                 masks: torch.Tensor | list[torch.Tensor] | None = None, time_ids: torch.Tensor | None = None,
                 repeats: list[int] | None = None):
        pixels = list(pixels)
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
                time_ids[rows] if time_ids is not None else None, [repeats[i] for i in ids]))
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
        if bool((shard.row_weights == shard.row_weights[0]).all()):  # no repeats: the plain draw, as ever
            rows = torch.randint(0, len(shard.mean), (batch_size,), generator=generator)
        else:
            rows = torch.multinomial(shard.row_weights, batch_size, replacement=True, generator=generator)
        eps = torch.randn(shard.mean[rows].shape, generator=generator).to(shard.mean.device)
        masks = shard.masks[rows.to(shard.masks.device)] if shard.masks is not None else None
        self.last_flipped = rows >= shard.num_images
        self.last_time_ids = shard.time_ids[rows.to(shard.time_ids.device)] if shard.time_ids is not None else None
        return shard.mean[rows] + shard.std[rows] * eps, shard.image_ids[rows], masks


def sdxl_time_ids(images, flip: bool) -> torch.Tensor:
    """SDXL's (original h, w, crop top, left, target h, w) per image, then (with flip) per mirror, whose crop starts
    at resized width − left − target width from its own left edge. The target is the image's own (bucket) size."""
    rows, mirrored = [], []
    for im in images:
        h, w = im.original_size
        top, left = im.crop_top_left
        target_h, target_w = im.pixels.shape[-2:]
        rows.append([h, w, top, left, target_h, target_w])
        mirrored.append([h, w, top, im.resized_size[1] - left - target_w, target_h, target_w])
    return torch.tensor(rows + (mirrored if flip else []), dtype=torch.float32)


# -- the loop --------------------------------------------------------------------------------------------------


def training_subsets(cfg: TrainConfig, method_cfg) -> list[Subset]:
    """The run's concepts: a --dataset file's subsets, or one from --images and the method's own flags."""
    if cfg.dataset and cfg.images:
        raise PersonalizeError("pass either --images (one concept) or --dataset (several), not both")
    if cfg.dataset:
        subsets = read_dataset(cfg.dataset)
        method = METHODS[cfg.method]
        if len(subsets) > 1 and not method.multi_concept:
            raise PersonalizeError(f"{cfg.method} learns one concept per run: train the subsets apart and compose them at generation")
        tokens = [subset_concept(s, method_cfg).token for s in subsets]
        if len(set(tokens)) != len(tokens) and cfg.method in ("textual-inversion", "batex"):
            raise PersonalizeError(f"--dataset {cfg.dataset}: every subset needs a token of its own (got {tokens})")
        return subsets
    if not cfg.images:
        raise PersonalizeError("--images is required: a folder with a few images of the concept (or --dataset FILE for several)")
    return [Subset(cfg.images, class_images=getattr(method_cfg, "class_images", None))]


def subset_concept(subset: Subset, method_cfg) -> Concept:
    """A subset's token, class word and init word; what it leaves out comes from the method's flags."""
    return Concept(subset.token or getattr(method_cfg, "token", "<concept>"),
                   subset.class_word or getattr(method_cfg, "class_word", None),
                   subset.init_word or getattr(method_cfg, "init_word", None))


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


def _train_only(stepped: list[str], groups: dict[str, list]) -> None:
    """Let gradients reach only the parameters of the groups a sub-step steps (peft's set_adapter re-enables every
    active adapter, so this runs before every sub-step)."""
    if len(groups) == 1:
        return
    own = {id(p) for group in stepped for p in groups[group]}
    for params in groups.values():
        for p in params:
            p.requires_grad_(id(p) in own)


def lr_factor(shape: str, warmup: int, steps: int):
    """The learning rate's factor at training step s: linear warm-up over `warmup` steps, then constant, or a
    linear / cosine decay to 0 at `steps` (diffusers' get_scheduler shapes)."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if shape == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, steps - warmup))
        return 1.0 - progress if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _check_options(cfg: TrainConfig) -> None:
    """Numbers a run cannot use fail before any loading (0 is a value, never "use the default")."""
    for name, minimum in (("steps", 0), ("lr", 0), ("batch_size", 1), ("resolution", 8), ("checkpointing_steps", 1),
                          ("noise_offset", 0), ("unmasked_weight", 0), ("ema_decay", 0), ("lr_warmup_steps", 0)):
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise PersonalizeError(f"--{name.replace('_', '-')} {value}: must be at least {minimum}")
    if cfg.snr_gamma is not None and cfg.snr_gamma <= 0:
        raise PersonalizeError(f"--snr-gamma {cfg.snr_gamma}: must be positive (5 is usual)")
    if cfg.ema_decay >= 1:
        raise PersonalizeError(f"--ema-decay {cfg.ema_decay}: must be below 1 (0.999 is usual; 0 turns EMA off)")
    if cfg.export_ema and not cfg.ema_decay:
        raise PersonalizeError("--export-ema needs --ema-decay (the weights to export are its moving average)")
    method = METHODS[cfg.method]
    if cfg.buckets and method.uses_images:
        raise PersonalizeError(f"--buckets does not apply to {cfg.method}: it encodes its training image itself, at one size")
    if cfg.bucket_max_ratio < 1 or cfg.bucket_max_upscale <= 0:
        raise PersonalizeError("--bucket-max-ratio must be at least 1 and --bucket-max-upscale positive")
    for option, wanted in (("snr_gamma", cfg.snr_gamma), ("masked", cfg.masked_loss)):
        if wanted and option not in method.loss_options:
            flag = "--snr-gamma" if option == "snr_gamma" else "--masked-loss"
            raise PersonalizeError(f"{flag} does not apply to {cfg.method}: its loss takes only "
                                   f"{', '.join(method.loss_options)} (see its documentation)")


def loss_options(cfg: TrainConfig) -> LossOptions:
    return LossOptions(cfg.noise_offset, cfg.snr_gamma, cfg.masked_loss, cfg.unmasked_weight)


class ParameterEMA:
    """Exponential moving average of the trained parameters: ema ← d·ema + (1 − d)·θ after every training step."""

    def __init__(self, method: Method, decay: float):
        trained = {id(p) for group in method.param_groups().values() for p in group}
        self.params = {k: p for k, p in method.named_parameters() if id(p) in trained}
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    def load(self, shadow: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.to(self.params[k].device).float() for k, v in shadow.items()}

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA weights in place of the live ones for the block (the export), the live ones back afterwards."""
        live = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(live[k])


class StepLog:
    """Every logged value of every step, one JSON line per step in OUTPUT/logs.jsonl: plottable with no service."""

    def __init__(self, output: Path, start: int):
        self.path = output / LOG_FILE
        kept = []
        if self.path.exists():  # a resumed run drops what the killed one logged after its checkpoint
            kept = [line for line in self.path.read_text().splitlines() if line and _logged_step(line) <= start]
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line of a killed run: dropped


def _given(value, default):
    """`value` unless it was not given (None); never `value or default`, which turns 0 into the default."""
    return default if value is None else value


def train(cfg: TrainConfig, method_cfg) -> Path:
    """Train one concept; return the output folder (artefacts, previews, config, checkpoints)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    _require_tracker(cfg.report_to)
    _check_options(cfg)
    if not cfg.output:
        raise PersonalizeError("--output is required: the folder where the run writes its files")
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process: a second run in it (a bench, the UI, tests) with another
    # precision would be refused. Reset it; the process group (PartialState) of a multi-process launch stays.
    if AcceleratorState._shared_state:  # (only then: resetting a state that does not exist yet loses the launch's)
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # else a multi-process launch on a machine without GPUs runs each alone
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(cfg.output),
    )
    with accelerator.main_process_first():  # one process decides about (and writes) the folder; files are written once
        output = prepare_output(cfg) if accelerator.is_main_process else Path(cfg.output)
    set_seed(cfg.seed)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)

    backbone = load_backbone(cfg.model, model_config=cfg.model_config)
    backbone.freeze()
    backbone.to(device, weight_dtype)
    resolution = _given(cfg.resolution, backbone.default_resolution)
    method_cls = METHODS[cfg.method]
    subsets = training_subsets(cfg, method_cfg)
    concepts = [subset_concept(s, method_cfg) for s in subsets]
    wants_masks = method_cls.needs_masks or cfg.masked_loss
    buckets = Buckets(resolution, backbone.size_step, cfg.bucket_max_ratio, cfg.bucket_max_upscale) if cfg.buckets else None
    images, image_concepts, captions, repeats = [], [], [], []
    for index, (subset, concept) in enumerate(zip(subsets, concepts)):
        loaded = load_image_folder(subset.images, resolution, masks=wants_masks, masks_dir=getattr(method_cfg, "masks", None),
                                   buckets=buckets)
        images += loaded
        image_concepts += [index] * len(loaded)
        repeats += [subset.repeats] * len(loaded)
        captions += [subset.prompt_for(im, method_cls.reads_caption_files, concept.token, concept.class_word) for im in loaded]
    masks = [im.mask for im in images] if wants_masks else None
    cache = LatentCache(backbone, [im.pixels for im in images], cfg.flip, device, masks,
                        sdxl_time_ids(images, cfg.flip) if backbone.is_sdxl else None, repeats)
    with accelerator.main_process_first():  # the main process draws missing class images, the others then read them
        class_cache, class_concepts = class_image_cache(cfg, method_cfg, subsets, concepts, backbone, output, resolution, device)

    if buckets:
        log.info("aspect-ratio buckets (width x height): %s", ", ".join(f"{im.path.name} {im.pixels.shape[2]}x{im.pixels.shape[1]}" for im in images))
    pixels = torch.stack([im.pixels for im in images]) if method_cls.uses_images else None
    method = method_cls(method_cfg, backbone, captions=captions, images=pixels, concepts=concepts,
                        image_concepts=image_concepts, class_concepts=class_concepts).to(device)
    if cfg.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    if _given(cfg.cache_text_embeddings, not method.trains_text_side):
        if method.trains_text_side:
            raise PersonalizeError(f"--cache-text-embeddings: {cfg.method} trains through the text encoder (its embeddings change every step)")
        backbone.cache_prompt_embeddings = True
    steps = _given(cfg.steps, method.default_steps)
    lr = _given(cfg.lr, method.default_lr)
    scale_lr = _given(cfg.scale_lr, method.scales_lr)
    weight_decay = getattr(method_cfg, "weight_decay", 0.0)
    optimizers, schedulers = {}, {}
    groups = method.param_groups()
    rates = method.learning_rates(lr)

    def batch_size(group: str) -> int:  # --batch-size wins over the method's per-group sizes
        return _given(cfg.batch_size, method.batch_size(group) or 4)

    optimizer_class = _optimizer_class(cfg.optimizer, device)
    for group in groups:
        rate = rates.get(group, lr) * (batch_size(group) * accelerator.num_processes if scale_lr else 1)
        optimizer = optimizer_class(method.optimizer_groups(group, rate), weight_decay=weight_decay)
        schedulers[group] = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.lr_scheduler, cfg.lr_warmup_steps, steps))
        optimizers[group] = accelerator.prepare_optimizer(optimizer)
    if accelerator.is_main_process:
        write_resolved_config(output, cfg, method_cfg)

    generator = torch.Generator().manual_seed(cfg.seed)  # the same on every process: see `shard` below
    shard = (accelerator.process_index, accelerator.num_processes)
    ema = ParameterEMA(method, cfg.ema_decay) if cfg.ema_decay else None
    options = loss_options(cfg)
    start = 0
    resume_from = _find_resume(output, cfg.resume) if cfg.resume else None
    if resume_from is not None:
        start = load_checkpoint(resume_from, method, optimizers, schedulers, generator, ema)
        log.info("resumed from %s (step %d)", resume_from, start)
    if cfg.report_to != "none":
        _init_trackers(accelerator, cfg)
    if accelerator.is_main_process:
        _write_run(output, status="running", step=start, steps=steps)

    prompts = cfg.validation_prompts or method.validation_prompts()
    step_log = StepLog(output, start) if accelerator.is_main_process else None
    progress = tqdm(total=steps, initial=start, desc=f"{cfg.method}", disable=not accelerator.is_main_process, dynamic_ncols=True)
    logs: dict[str, float] = {}
    for step in range(start, steps):
        method.begin_step(step)
        for substep in method.schedule(step):
            stepped = method.substep_groups(substep)
            _train_only(stepped, groups)  # after begin_step: nothing may re-enable another group's gradients
            n = batch_size(stepped[0])
            # Every process draws the whole global batch and keeps its share (here and in every draw a method makes
            # per row, see Batch.shard): 2 processes × batch B train exactly what 1 process × batch 2B trains.
            mine = slice(shard[0] * n, (shard[0] + 1) * n)
            latents, rows, masks = (None if x is None else x[mine] for x in cache.sample(n * shard[1], generator))
            time_ids, flipped = (None if x is None else x[mine] for x in (cache.last_time_ids, cache.last_flipped))
            class_latents, class_rows = ((x[mine] for x in class_cache.sample(n * shard[1], generator)[:2])
                                         if class_cache else (None, None))
            with accelerator.autocast():
                batch = Batch(latents, rows, generator, class_latents, masks, time_ids, flipped, options, class_rows, shard)
                loss, group_logs = method.loss(batch, substep)
            if not torch.isfinite(loss):
                _stop_non_finite(output, step, steps, f"the loss became {loss.item()}")
            logs.update({f"{substep}/{k}" if substep != "main" else k: v for k, v in group_logs.items()})
            if not loss.requires_grad:  # nothing to learn yet (e.g. a feature loss against an empty queue): no update
                continue
            accelerator.backward(loss)
            if not all(torch.isfinite(p.grad).all() for group in stepped for p in groups[group] if p.grad is not None):
                _stop_non_finite(output, step, steps, "a gradient became inf/NaN")  # before any weight changes
            for group in stepped:
                _average_gradients(accelerator, optimizers[group])
                optimizers[group].step()
            for optimizer in optimizers.values():  # no gradient may leak into another group's next sub-step
                optimizer.zero_grad(set_to_none=True)
        logs.update({f"lr/{group}": optimizer.param_groups[0]["lr"] for group, optimizer in optimizers.items()})
        with warnings.catch_warnings():  # a group with no update yet (Dis²Booth's delta in warm-up) still follows the step
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            for scheduler in schedulers.values():  # the rate is a function of the training step, whatever the sub-steps
                scheduler.step()
        if ema is not None:
            ema.update()
        progress.update(1)
        progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if not k.startswith("lr/")})
        done = step + 1
        if accelerator.is_main_process:
            step_log.write(done, logs)
        if cfg.report_to != "none":
            accelerator.log(logs, step=done)
        # The last step checkpoints too, so a finished run can be resumed to more steps.
        if accelerator.is_main_process and (done % cfg.checkpointing_steps == 0 or done == steps):
            save_checkpoint(output, done, method, optimizers, schedulers, generator, cfg.checkpoints_total_limit, ema)
            _write_run(output, status="running", step=done, steps=steps)
        if accelerator.is_main_process and cfg.validation_steps and done % cfg.validation_steps == 0 and done < steps:
            _validate(backbone, cfg, prompts, output, done, resolution)
    progress.close()

    if accelerator.is_main_process:
        with ema.swapped_in() if cfg.export_ema else contextlib.nullcontext():
            files = method.save(output, steps)
            _validate(backbone, cfg, prompts, output, steps, resolution)
        _write_run(output, status="finished", step=steps, steps=steps, artefacts=[f.name for f in files])
        for f in files:
            log.info("wrote %s", f)
    accelerator.end_training()
    return output


def _stop_non_finite(output: Path, step: int, steps: int, what: str) -> None:
    """Stop before a non-finite value reaches the weights: nothing is written, the last checkpoint stays the newest."""
    last = checkpoint_dirs(output)
    where = f"the last good checkpoint is {last[-1]} (continue with --resume latest)" if last else "no checkpoint was written yet"
    message = (f"{what} at step {step + 1}; the weights were not updated and {where}. Try a lower --lr, "
               f"--mixed-precision bf16 instead of fp16 (or no), or a smaller --noise-offset")
    _write_run(output, status="failed", step=step, steps=steps, error=message)
    raise PersonalizeError(message)


def _optimizer_class(name: str, device):
    """AdamW, or bitsandbytes' 8-bit AdamW (CUDA only; a clear error elsewhere)."""
    if name == "adamw":
        return torch.optim.AdamW
    if torch.device(device).type != "cuda":
        raise PersonalizeError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit kernels); use --optimizer adamw here")
    try:
        import bitsandbytes
    except ImportError as exc:
        raise PersonalizeError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from exc
    return bitsandbytes.optim.AdamW8bit


def _average_gradients(accelerator, optimizer) -> None:
    """Data parallelism without wrapping the method in DDP: average the few trainable gradients across GPUs."""
    if accelerator.num_processes == 1:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")


def _require_tracker(name: str) -> None:
    import importlib.util

    if name != "none" and importlib.util.find_spec(name) is None:  # accelerate would silently drop the tracker
        raise PersonalizeError(f"--report-to {name} needs its package: pip install {name}")


def _init_trackers(accelerator, cfg: TrainConfig) -> None:
    try:
        config = {k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("personalize", config=config, init_kwargs={"wandb": {"dir": str(accelerator.project_dir)}})
    except (ImportError, ModuleNotFoundError, ValueError) as exc:
        raise PersonalizeError(f"--report-to {cfg.report_to} needs its package: pip install {cfg.report_to} ({exc})") from exc


def _validate(backbone, cfg: TrainConfig, prompts: list[str], output: Path, step: int, resolution: int) -> None:
    """Preview grid: rows are prompts, columns seeds; drawn by the same sampler as `personalize generate`."""
    if not prompts or cfg.num_validation_images < 1:
        return
    seeds = [cfg.seed + i for i in range(cfg.num_validation_images)]
    images = generate_images(backbone, prompts, seeds, steps=cfg.inference_steps, guidance=cfg.guidance,
                             resolution=resolution, batch_size=min(len(seeds), 4))
    save_png(make_grid(images, len(seeds)), output / "validation" / f"step-{step:06d}.png")
