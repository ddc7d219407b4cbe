"""The one training loop, for every method.

Read `train` top to bottom: load the base model and images, encode each image (and its mirror) once with the VAE,
build the method and one optimiser per parameter group, then step. Each step samples a batch from the cached
latent distributions, asks the method for its loss on each parameter group its schedule names, and steps that
group's optimiser. Every random draw goes through one `torch.Generator` that checkpoints save, so a run stopped
(Ctrl-C, SIGTERM) or killed and resumed continues exactly.

What the loop uses lives where its concern lives: images in `data`, their cached latents in `latents`, SDXL's
size/crop conditioning in `backbone`, the run folder, checkpoints, EMA and the step log in `checkpoints`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbone import load_backbone
from .checkpoints import (ParameterEMA, StepLog, StopOnSignal, TrainingState, TrainingStopped, checkpoint_dirs, find_resume,
                          load_checkpoint, prepare_output, refuse_changed_options, run_options, save_checkpoint,
                          write_resolved_config, write_run)
from .data import Buckets, Subset, TrainImage, load_image_folder, read_dataset
from .errors import PersonalizeError
from .generate import generate_images, make_grid, save_png
from .latents import LatentCache, class_image_cache
from .losses import LossOptions
from .methods import METHODS, Batch, Concept, Method

log = logging.getLogger("personalize")


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
                                                                 "rates are absolute)", "method_default": "scales_lr"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps of the learning rate", "aliases": ["--lr_warmup_steps"]})
    lr_scheduler: str = field(default="constant", metadata={"help": "learning-rate shape after the warm-up (diffusers' names)",
                                                            "choices": ["constant", "linear", "cosine"], "aliases": ["--lr_scheduler"]})
    resolution: int | None = field(default=None, metadata={"help": "training image size (default: the model's native size)"})
    flip: bool | None = field(default=None, metadata={
        "help": "also train on mirrored images; --no-flip for a subject that is not its own mirror image: lettering, a "
                "logo, a one-way pattern (default: the method's, recorded in config.yaml: off for DreamBooth-LoRA, as "
                "diffusers' and kohya's DreamBooth scripts; on where the method's reference code flips)",
        "method_default": "flips"})
    batch_draw: str = field(default="independent", metadata={
        "help": "how a batch picks its images: independent draws (an image can come twice in a batch) or distinct images "
                "while the bucket has enough, each mirrored with probability 1/2 where the run flips (one batch of "
                "diffusers' or kohya's shuffled epochs)", "choices": ["independent", "distinct"]})
    latent_draw: str = field(default="every-step", metadata={
        "help": "how a training image's latent is drawn from the VAE's posterior: afresh every step (z = mean + std·ε, "
                "as diffusers' scripts) or once, when the images are encoded (kohya's --cache_latents)",
        "choices": ["every-step", "once"]})
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
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "clip the norm of the gradients each update applies to this (diffusers' and kohya's --max_grad_norm, "
                "default 1.0 there; 0: no clipping, this project's default, with which every benchmark ran)",
        "aliases": ["--max_grad_norm"]})
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


# -- the training story ----------------------------------------------------------------------------------------


def train(cfg: TrainConfig, method_cfg) -> Path:
    """Train one concept (several with --dataset); return the output folder (artefacts, previews, config, checkpoints)."""
    from accelerate.utils import set_seed

    check_run(cfg, method_cfg)  # fails in a second, before anything is loaded
    cfg = replace(cfg, flip=_given(cfg.flip, METHODS[cfg.method].flips))  # config.yaml records what ran, not "the default"
    accelerator = _accelerator(cfg)
    with accelerator.main_process_first():  # one process decides about (and writes) the folder; files are written once
        output = prepare_output(cfg) if accelerator.is_main_process else Path(cfg.output)
    options = run_options(cfg, method_cfg)
    resume_from = find_resume(output, cfg.resume) if cfg.resume else None
    if resume_from is not None:  # before minutes of loading: a resumed run must be the run it continues
        refuse_changed_options(resume_from, options)
    set_seed(cfg.seed)

    # Set-up: the frozen base model, the images encoded once, the method, one optimiser per parameter group.
    device = accelerator.device
    backbone = load_backbone(cfg.model, model_config=cfg.model_config)
    backbone.freeze()
    backbone.to(device, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32))
    resolution = _given(cfg.resolution, backbone.default_resolution)
    data = training_images(cfg, method_cfg, backbone, resolution)
    cache = LatentCache(backbone, [im.pixels for im in data.images], cfg.flip, device, data.masks,
                        backbone.training_time_ids(data.images, cfg.flip), data.repeats, distinct=cfg.batch_draw == "distinct",
                        draw_once=cfg.seed if cfg.latent_draw == "once" else None)
    with accelerator.main_process_first():  # the main process draws missing class images, the others then read them
        class_cache, class_concepts = class_image_cache(cfg, method_cfg, data.subsets, data.concepts, backbone, output,
                                                        resolution, device)
    method = build_method(cfg, method_cfg, backbone, data, class_concepts, device)
    steps = _given(cfg.steps, method.default_steps)
    groups = method.param_groups()  # taken once, here: a method may switch gradients on later, never regroup
    batch_sizes = {group: _given(cfg.batch_size, method.batch_size(group) or 4) for group in groups}
    optimizers, schedulers = make_optimizers(cfg, method_cfg, method, batch_sizes, steps, accelerator)
    state = TrainingState(method, optimizers, schedulers,
                          torch.Generator().manual_seed(cfg.seed),  # the same on every process: see `Batch.shard`
                          ParameterEMA(method, cfg.ema_decay) if cfg.ema_decay else None)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, state)
        log.info("resumed from %s (step %d)", resume_from, start)
    main = accelerator.is_main_process
    if main:
        write_resolved_config(output, options)  # after the check: the options that ran, never a refused one
        write_run(output, status="running", step=start, steps=steps)
    if cfg.report_to != "none":
        _init_trackers(accelerator, cfg)

    # The loop: a step, its log line, a checkpoint every --checkpointing-steps and at the end (so a finished run can
    # be resumed to more steps), previews every --validation-steps; Ctrl-C or SIGTERM stops at a step's end, saved.
    prompts = cfg.validation_prompts or method.validation_prompts()
    step_log = StepLog(output, start) if main else None
    progress = tqdm(total=steps, initial=start, desc=f"{cfg.method}", disable=not main, dynamic_ncols=True)
    loop = Loop(accelerator, state, groups, batch_sizes, cache, class_cache, loss_options(cfg), output, steps,
                cfg.max_grad_norm)
    logs: dict[str, float] = {}  # a sub-step that does not run this step keeps its last value in the log
    with StopOnSignal() as stop:
        for step in range(start, steps):
            loop.step(step, logs)
            progress.update(1)
            progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if not k.startswith("lr/")})
            done = step + 1
            if main:
                step_log.write(done, logs)
            if cfg.report_to != "none":
                accelerator.log(logs, step=done)
            stopping = stop.requested(accelerator)
            if main and (done % cfg.checkpointing_steps == 0 or done == steps or stopping):
                save_checkpoint(output, done, state, options, cfg.checkpoints_total_limit)
                write_run(output, status="stopped" if stopping else "running", step=done, steps=steps)
            if stopping:
                accelerator.wait_for_everyone()  # no process leaves before the checkpoint is whole
                accelerator.end_training()
                raise TrainingStopped(f"stopped at step {done} of {steps} with a checkpoint in {output / 'checkpoints'}")
            if main and cfg.validation_steps and done % cfg.validation_steps == 0 and done < steps:
                _validate(backbone, cfg, prompts, output, done, resolution)
    progress.close()

    if main:
        with state.ema.swapped_in() if cfg.export_ema else contextlib.nullcontext():
            files = method.save(output, steps)
            _validate(backbone, cfg, prompts, output, steps, resolution)
        write_run(output, status="finished", step=steps, steps=steps, artefacts=[f.name for f in files])
        for f in files:
            log.info("wrote %s", f)
    accelerator.end_training()
    return output


@dataclass
class Loop:
    """What one training step needs: the method, its optimisers and the generator (`state`, which checkpoints save),
    its parameter groups, and the latent caches it draws batches from."""

    accelerator: object
    state: TrainingState
    groups: dict[str, list[torch.nn.Parameter]]
    batch_sizes: dict[str, int]  # images per sub-step, by the (first) group it updates
    cache: LatentCache
    class_cache: LatentCache | None
    loss_options: LossOptions
    output: Path
    steps: int
    max_grad_norm: float = 0.0

    def step(self, step: int, logs: dict[str, float]) -> None:
        """One training step: each sub-step of the method's schedule draws a batch, takes its loss and steps the
        optimisers of the groups it updates; then every rate follows the step, and the EMA the weights."""
        method, optimizers = self.state.method, self.state.optimizers
        method.begin_step(step)
        for substep in method.schedule(step):
            stepped = method.substep_groups(substep)
            _train_only(stepped, self.groups)  # after begin_step: nothing may re-enable another group's gradients
            batch = self.draw_batch(self.batch_sizes[stepped[0]])
            with self.accelerator.autocast():
                loss, group_logs = method.loss(batch, substep)
            if not torch.isfinite(loss):
                _stop_non_finite(self.output, step, self.steps, f"the loss became {loss.item()}")
            logs.update({f"{substep}/{k}" if substep != "main" else k: v for k, v in group_logs.items()})
            if not loss.requires_grad:  # nothing to learn yet (e.g. a feature loss against an empty queue): no update
                continue
            self.accelerator.backward(loss)
            if not all(torch.isfinite(p.grad).all() for group in stepped for p in self.groups[group] if p.grad is not None):
                _stop_non_finite(self.output, step, self.steps, "a gradient became inf/NaN")  # before any weight changes
            for group in stepped:
                _average_gradients(self.accelerator, optimizers[group])
            if self.max_grad_norm:  # after averaging, so every process clips the same gradient (as diffusers' scripts)
                torch.nn.utils.clip_grad_norm_([p for g in stepped for p in self.groups[g]], self.max_grad_norm)
            for group in stepped:
                optimizers[group].step()
            for optimizer in optimizers.values():  # no gradient may leak into another group's next sub-step
                optimizer.zero_grad(set_to_none=True)
        logs.update({f"lr/{group}": optimizer.param_groups[0]["lr"] for group, optimizer in optimizers.items()})
        with warnings.catch_warnings():  # a group with no update yet (Dis²Booth's delta in warm-up) still follows the step
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            for scheduler in self.state.schedulers.values():  # the rate is a function of the training step, whatever the sub-steps
                scheduler.step()
        if self.state.ema is not None:
            self.state.ema.update()

    def draw_batch(self, n: int) -> Batch:
        """`n` rows for this process. Every process draws the whole global batch and keeps its share (here and in every
        draw a method makes per row, see Batch.shard): 2 processes × batch B train exactly what 1 process × batch 2B trains."""
        shard = (self.accelerator.process_index, self.accelerator.num_processes)
        generator = self.state.generator
        mine = slice(shard[0] * n, (shard[0] + 1) * n)
        latents, rows, masks = (None if x is None else x[mine] for x in self.cache.sample(n * shard[1], generator))
        time_ids, flipped = (None if x is None else x[mine] for x in (self.cache.last_time_ids, self.cache.last_flipped))
        class_latents, class_rows = ((x[mine] for x in self.class_cache.sample(n * shard[1], generator)[:2])
                                     if self.class_cache else (None, None))
        return Batch(latents, rows, generator, class_latents, masks, time_ids, flipped, self.loss_options, class_rows, shard)


# -- set-up ------------------------------------------------------------------------------------------------------


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    _require_tracker(cfg.report_to)
    # accelerate keeps one global state per process: a second run in it (a bench, the UI, tests) with another
    # precision would be refused. Reset it; the process group (PartialState) of a multi-process launch stays.
    if AcceleratorState._shared_state:  # (only then: resetting a state that does not exist yet loses the launch's)
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # else a multi-process launch on a machine without GPUs runs each alone
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(cfg.output),
    )


@dataclass
class TrainingImages:
    """The run's concepts and their images, each with its concept, caption (the training prompt) and repeats."""

    subsets: list[Subset]
    concepts: list[Concept]
    images: list[TrainImage]
    image_concepts: list[int]
    captions: list[str | None]
    repeats: list[int]
    masks: list[torch.Tensor] | None  # foreground masks, when the method or --masked-loss wants them


def training_images(cfg: TrainConfig, method_cfg, backbone, resolution: int) -> TrainingImages:
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
    if buckets:
        log.info("aspect-ratio buckets (width x height): %s", ", ".join(f"{im.path.name} {im.pixels.shape[2]}x{im.pixels.shape[1]}" for im in images))
    masks = [im.mask for im in images] if wants_masks else None
    return TrainingImages(subsets, concepts, images, image_concepts, captions, repeats, masks)


def build_method(cfg: TrainConfig, method_cfg, backbone, data: TrainingImages, class_concepts: list[int] | None, device) -> Method:
    """The method on its images; then what it allows of gradient checkpointing and cached prompt embeddings."""
    method_cls = METHODS[cfg.method]
    pixels = torch.stack([im.pixels for im in data.images]) if method_cls.uses_images else None
    method = method_cls(method_cfg, backbone, captions=data.captions, images=pixels, concepts=data.concepts,
                        image_concepts=data.image_concepts, class_concepts=class_concepts).to(device)
    if cfg.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    if _given(cfg.cache_text_embeddings, not method.trains_text_side):
        if method.trains_text_side:
            raise PersonalizeError(f"--cache-text-embeddings: {cfg.method} trains through the text encoder (its embeddings change every step)")
        backbone.cache_prompt_embeddings = True
    return method


def make_optimizers(cfg: TrainConfig, method_cfg, method: Method, batch_sizes: dict[str, int], steps: int,
                    accelerator) -> tuple[dict, dict]:
    """One optimiser per parameter group at its (scaled) rate, each with the rate's schedule over the run's steps."""
    lr = _given(cfg.lr, method.default_lr)
    scale_lr = _given(cfg.scale_lr, method.scales_lr)
    weight_decay = getattr(method_cfg, "weight_decay", 0.0)
    rates = method.learning_rates(lr)
    optimizer_class = _optimizer_class(cfg.optimizer, accelerator.device)
    optimizers, schedulers = {}, {}
    for group in batch_sizes:
        rate = rates.get(group, lr) * (batch_sizes[group] * accelerator.num_processes if scale_lr else 1)
        optimizer = optimizer_class(method.optimizer_groups(group, rate), weight_decay=weight_decay)
        schedulers[group] = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.lr_scheduler, cfg.lr_warmup_steps, steps))
        optimizers[group] = accelerator.prepare_optimizer(optimizer)
    return optimizers, schedulers


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


# -- the step's parts and the checks ---------------------------------------------------------------------------


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
    if not cfg.output:
        raise PersonalizeError("--output is required: the folder where the run writes its files")
    if cfg.lr is not None and cfg.lr <= 0:  # Adam's update is lr·m/√v: at 0 every step leaves the weights as they are
        raise PersonalizeError(f"--lr {cfg.lr}: must be positive; a rate of 0 trains nothing (leave --lr out for "
                               f"the method's own rate)")
    for name, minimum in (("steps", 0), ("batch_size", 1), ("resolution", 8), ("checkpointing_steps", 1),
                          ("noise_offset", 0), ("unmasked_weight", 0), ("ema_decay", 0), ("lr_warmup_steps", 0),
                          ("max_grad_norm", 0)):
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


def check_run(cfg: TrainConfig, method_cfg) -> None:
    """Everything a run can be refused for without loading anything: the loop's numbers, the concepts (--images or
    --dataset) and the method's own options. `train` calls it first; the web UI calls it before it starts a job."""
    _check_options(cfg)
    subsets = training_subsets(cfg, method_cfg)
    METHODS[cfg.method].check(method_cfg, [subset_concept(s, method_cfg) for s in subsets])


def loss_options(cfg: TrainConfig) -> LossOptions:
    return LossOptions(cfg.noise_offset, cfg.snr_gamma, cfg.masked_loss, cfg.unmasked_weight)


def _given(value, default):
    """`value` unless it was not given (None); never `value or default`, which turns 0 into the default."""
    return default if value is None else value


def _stop_non_finite(output: Path, step: int, steps: int, what: str) -> None:
    """Stop before a non-finite value reaches the weights: nothing is written, the last checkpoint stays the newest."""
    last = checkpoint_dirs(output)
    where = f"the last good checkpoint is {last[-1]} (continue with --resume latest)" if last else "no checkpoint was written yet"
    message = (f"{what} at step {step + 1}; the weights were not updated and {where}. Try a lower --lr, "
               f"--mixed-precision bf16 instead of fp16 (or no), or a smaller --noise-offset")
    write_run(output, status="failed", step=step, steps=steps, error=message)
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
