"""The one training loop, for every method.

Read top to bottom: load the base model and images, encode each image (and its mirror) once with the VAE,
build the method, then step. Each step samples a batch from the cached latent distributions, asks the method
for its loss on each parameter group its schedule names, and steps that group's optimiser. Every random draw
goes through one `torch.Generator` that checkpoints save, so a run killed and resumed continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .backbone import load_backbone
from .data import load_image_folder
from .errors import PersonalizeError
from .export import atomic_write
from .generate import generate_images, make_grid, save_png
from .methods import METHODS, Batch, Method

log = logging.getLogger("personalize")
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"


def default_model() -> str:
    """The model used when --model is not given: $PERSONALIZE_MODEL, else the shipped toy model."""
    return os.environ.get("PERSONALIZE_MODEL") or "toy"


@dataclass
class TrainConfig:
    """Options of the loop itself; each method adds its own (see its config dataclass)."""

    method: str = field(default="textual-inversion", metadata={"help": "what to train", "choices": sorted(METHODS)})
    model: str = field(
        default_factory=default_model,
        metadata={"help": "base model: toy | tiny | tiny-v | tiny-xl | diffusers folder | .safetensors/.ckpt | hub id "
                          "($PERSONALIZE_MODEL, else toy)",
                  "aliases": ["--pretrained_model_name_or_path"]},
    )
    model_config: str | None = field(default=None, metadata={"help": "diffusers folder with the configs of a single-file checkpoint"})
    images: str | None = field(default=None, metadata={"help": "folder of training images", "aliases": ["--instance_data_dir"]})
    output: str | None = field(default=None, metadata={"help": "folder for checkpoints, previews and artefacts", "aliases": ["--output_dir"]})
    steps: int | None = field(default=None, metadata={"help": "training steps (default: the method's)", "aliases": ["--max_train_steps"]})
    batch_size: int = field(default=4, metadata={"help": "images per step", "aliases": ["--train_batch_size"]})
    lr: float | None = field(default=None, metadata={"help": "learning rate before scaling (default: the method's)", "aliases": ["--learning_rate"]})
    scale_lr: bool = field(default=True, metadata={"help": "multiply the learning rate by batch size × processes (as diffusers' --scale_lr)"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps of the learning rate"})
    resolution: int | None = field(default=None, metadata={"help": "training image size (default: the model's native size)"})
    flip: bool = field(default=True, metadata={"help": "also train on mirrored images"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    checkpointing_steps: int = field(default=500, metadata={"help": "save a resumable checkpoint every N steps", "aliases": ["--checkpointing_steps"]})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "keep only the newest N checkpoints"})
    validation_steps: int | None = field(default=None, metadata={"help": "preview images every N steps (default: at the end only)"})
    validation_prompts: list[str] | None = field(default=None, metadata={"help": "preview prompts (default: the method's)"})
    num_validation_images: int = field(default=2, metadata={"help": "preview images per prompt (seeds seed, seed+1, ...)"})
    inference_steps: int = field(default=30, metadata={"help": "sampler steps of previews"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance of previews"})
    mixed_precision: str = field(default="no", metadata={"help": "run the frozen networks in half precision", "choices": ["no", "fp16", "bf16"]})
    report_to: str = field(default="none", metadata={"help": "log losses to", "choices": ["none", "tensorboard"]})
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


def save_checkpoint(output: Path, step: int, method: Method, optimizers, schedulers, generator, limit: int) -> Path:
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


def load_checkpoint(path: Path, method: Method, optimizers, schedulers, generator) -> int:
    method.load_trainable_state(load_file(str(path / "trainable.safetensors")))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    method.load_extra_state(state.get("method", {}))
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


class LatentCache:
    """Each training image (and its mirror) encoded once; a batch samples z = mean + std·ε from the cache.

    Foreground masks, when given, are kept at the latent grid (area-averaged, so edge cells are fractional) and
    mirrored with their images.
    """

    def __init__(self, backbone, pixels: torch.Tensor, flip: bool, device, masks: torch.Tensor | None = None,
                 time_ids: torch.Tensor | None = None):
        if flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
            masks = torch.cat([masks, masks.flip(-1)]) if masks is not None else None
        self.time_ids = time_ids.to(device) if time_ids is not None else None  # one row per cached row
        means, stds = zip(*(backbone.encode_images(chunk) for chunk in pixels.split(8)))
        self.mean, self.std = torch.cat(means).to(device), torch.cat(stds).to(device)
        self.masks = None
        if masks is not None:
            self.masks = torch.nn.functional.interpolate(masks.float(), size=self.mean.shape[-2:], mode="area").to(device)
        self.num_images = len(pixels) // (2 if flip else 1)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        rows = torch.randint(0, len(self.mean), (batch_size,), generator=generator)
        self.last_rows = rows
        eps = torch.randn(self.mean[rows].shape, generator=generator).to(self.mean.device)
        masks = self.masks[rows.to(self.masks.device)] if self.masks is not None else None
        return self.mean[rows] + self.std[rows] * eps, rows % self.num_images, masks

    def time_ids_of(self, rows: torch.Tensor) -> torch.Tensor | None:
        return self.time_ids[rows.to(self.time_ids.device)] if self.time_ids is not None else None


def sdxl_time_ids(images, resolution: int, flip: bool) -> torch.Tensor:
    """SDXL's (original h, w, crop top, left, R, R) per cached row: each image, then (with flip) its mirror,
    whose crop starts at resized width − left − R from its own left edge."""
    rows, mirrored = [], []
    for im in images:
        h, w = im.original_size
        top, left = im.crop_top_left
        resized_width = round(w * resolution / min(h, w))
        rows.append([h, w, top, left, resolution, resolution])
        mirrored.append([h, w, top, resized_width - left - resolution, resolution, resolution])
    return torch.tensor(rows + (mirrored if flip else []), dtype=torch.float32)


# -- the loop --------------------------------------------------------------------------------------------------


def class_image_cache(cfg: TrainConfig, method_cfg, backbone, output: Path, resolution: int, device):
    """DreamBooth's prior preservation: class images drawn by the base model (before any LoRA), cached as latents."""
    if not getattr(method_cfg, "prior_preservation", False):
        return None
    folder = Path(method_cfg.class_images or output / "class_images")
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    missing = method_cfg.num_class_images - len(have)
    if missing > 0:
        prompt = method_cfg.resolved(method_cfg.class_prompt)
        log.info("generating %d class images for %r into %s", missing, prompt, folder)
        for i in tqdm(range(len(have), method_cfg.num_class_images), desc="class images", dynamic_ncols=True):
            (image,) = generate_images(backbone, [prompt], [cfg.seed + 10_000 + i], steps=cfg.inference_steps,
                                       guidance=cfg.guidance, resolution=resolution)
            save_png(image, folder / f"class-{i:05d}.png")
    images = load_image_folder(folder, resolution)[: method_cfg.num_class_images]
    return LatentCache(backbone, torch.stack([im.pixels for im in images]), cfg.flip, device)


def _train_only(method: Method, group: str, groups: dict[str, list]) -> None:
    """Let gradients reach only `group`'s parameters (peft's set_adapter re-enables every active adapter)."""
    if len(groups) == 1:
        return
    own = {id(p) for p in groups[group]}
    for params in groups.values():
        for p in params:
            p.requires_grad_(id(p) in own)


def train(cfg: TrainConfig, method_cfg) -> Path:
    """Train one concept; return the output folder (artefacts, previews, config, checkpoints)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    _require_tracker(cfg.report_to)
    output = prepare_output(cfg)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(output),
    )
    set_seed(cfg.seed)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)

    backbone = load_backbone(cfg.model, model_config=cfg.model_config)
    backbone.freeze()
    backbone.to(device, weight_dtype)
    resolution = cfg.resolution or backbone.default_resolution
    method_cls = METHODS[cfg.method]
    if not cfg.images:
        raise PersonalizeError("--images is required: a folder with a few images of the concept")
    images = load_image_folder(cfg.images, resolution, masks=method_cls.needs_masks, masks_dir=getattr(method_cfg, "masks", None))
    masks = torch.stack([im.mask for im in images]) if method_cls.needs_masks else None
    cache = LatentCache(backbone, torch.stack([im.pixels for im in images]), cfg.flip, device, masks,
                        sdxl_time_ids(images, resolution, cfg.flip) if backbone.is_sdxl else None)
    class_cache = class_image_cache(cfg, method_cfg, backbone, output, resolution, device)

    method = method_cls(method_cfg, backbone, captions=[im.caption for im in images], images=torch.stack([im.pixels for im in images])).to(device)
    steps = cfg.steps or method.default_steps
    lr = (cfg.lr or method.default_lr) * (cfg.batch_size * accelerator.num_processes if cfg.scale_lr else 1)
    weight_decay = getattr(method_cfg, "weight_decay", 0.0)
    optimizers, schedulers = {}, {}
    groups = method.param_groups()
    rates = method.learning_rates(lr)
    for group in groups:
        optimizer = torch.optim.AdamW(method.optimizer_groups(group, rates.get(group, lr)), weight_decay=weight_decay)
        warmup = max(cfg.lr_warmup_steps, 1)
        schedulers[group] = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        optimizers[group] = accelerator.prepare_optimizer(optimizer)
    write_resolved_config(output, cfg, method_cfg)

    generator = torch.Generator().manual_seed(cfg.seed)
    start = 0
    resume_from = _find_resume(output, cfg.resume) if cfg.resume else None
    if resume_from is not None:
        start = load_checkpoint(resume_from, method, optimizers, schedulers, generator)
        log.info("resumed from %s (step %d)", resume_from, start)
    if cfg.report_to != "none":
        _init_trackers(accelerator, cfg)
    _write_run(output, status="running", step=start, steps=steps)

    prompts = cfg.validation_prompts or method.validation_prompts()
    progress = tqdm(total=steps, initial=start, desc=f"{cfg.method}", disable=not accelerator.is_main_process, dynamic_ncols=True)
    logs: dict[str, float] = {}
    for step in range(start, steps):
        for group in method.schedule(step):
            _train_only(method, group, groups)
            latents, rows, masks = cache.sample(cfg.batch_size, generator)
            class_latents = class_cache.sample(cfg.batch_size, generator)[0] if class_cache else None
            with accelerator.autocast():
                batch = Batch(latents, rows, generator, class_latents, masks, cache.time_ids_of(cache.last_rows))
                loss, group_logs = method.loss(batch, group)
            if not torch.isfinite(loss):
                raise PersonalizeError(
                    f"the loss became {loss.item()} at step {step + 1}; try a lower --lr, --mixed-precision no "
                    f"(or bf16 instead of fp16), or resume from an earlier checkpoint"
                )
            accelerator.backward(loss)
            _average_gradients(accelerator, optimizers[group])
            optimizers[group].step()
            schedulers[group].step()
            for optimizer in optimizers.values():  # no gradient may leak into another group's next sub-step
                optimizer.zero_grad(set_to_none=True)
            logs.update({f"{group}/{k}" if group != "main" else k: v for k, v in group_logs.items()})
        progress.update(1)
        progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        if cfg.report_to != "none":
            accelerator.log(logs, step=step + 1)
        done = step + 1
        # The last step checkpoints too, so a finished run can be resumed to more steps.
        if accelerator.is_main_process and (done % cfg.checkpointing_steps == 0 or done == steps):
            save_checkpoint(output, done, method, optimizers, schedulers, generator, cfg.checkpoints_total_limit)
            _write_run(output, status="running", step=done, steps=steps)
        if accelerator.is_main_process and cfg.validation_steps and done % cfg.validation_steps == 0 and done < steps:
            _validate(backbone, cfg, prompts, output, done, resolution)
    progress.close()

    if accelerator.is_main_process:
        files = method.save(output, steps)
        _validate(backbone, cfg, prompts, output, steps, resolution)
        _write_run(output, status="finished", step=steps, steps=steps, artefacts=[f.name for f in files])
        for f in files:
            log.info("wrote %s", f)
    accelerator.end_training()
    return output


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
        accelerator.init_trackers("personalize", config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})
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
