"""Command line: `personalize train | generate`. Thin: parses flags, then calls the library.

Flags come from the config dataclasses through `configs.py` (shared with the web UI), so every option is
documented once, where it is declared.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .configs import add_dataclass_flags, build_configs, preset_description, preset_names, read_preset
from .errors import PersonalizeError, PlaceholderTaken


# -- verbs ----------------------------------------------------------------------------------------------------


def cmd_train(argv: list[str]) -> int:
    from .trainer import train

    train_cfg, method_cfg = build_configs(argv)
    output = train(train_cfg, method_cfg)
    print(f"done: artefacts and previews in {output}")
    return 0


def cmd_generate(argv: list[str]) -> int:
    from .backbone import load_backbone, sampling_device
    from .concepts import renamed
    from .generate import SAMPLERS, generate_images, install_concept, make_grid, run_settings, save_png

    p = argparse.ArgumentParser(prog="personalize generate", description="Draw prompts with one or more learned concepts.")
    p.add_argument("--model", "--pretrained_model_name_or_path", default=None,
                   help="base model the concepts were trained on (default: the first run folder's, else $PERSONALIZE_MODEL or toy)")
    p.add_argument("--model-config", default=None, help="diffusers folder with the configs of a single-file checkpoint")
    p.add_argument("--concept", action="append", default=[], help="run folder, embedding file or LoRA file (repeatable)")
    p.add_argument("--lora-scale", action="append", type=float, default=[], help="scale of each --concept's LoRA, in order (default 1)")
    p.add_argument("--token", action="append", default=[],
                   help="placeholder to give each --concept's embedding, in order ('' or none: the file's own); "
                        "e.g. two runs trained with the same token: --token '' --token '<other>'")
    p.add_argument("--prompt", action="append", required=True, help="prompt using the concept's token (repeatable)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's recommended, else 30)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's recommended, else 7.5)")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="sampler, from the model's own noise schedule (default: the scheduler the model ships with)")
    p.add_argument("--output", "--output_dir", required=True, help="folder for the PNGs and grid.png")
    a = p.parse_args(argv)
    run = {} if a.model or not a.concept else run_settings(a.concept[0])  # default: the model the run trained on
    from .trainer import default_model

    backbone = load_backbone(a.model or run.get("model") or default_model(), model_config=a.model_config or run.get("model_config"))
    if len(a.token) > len(a.concept):
        raise PersonalizeError(f"{len(a.token)} --token for {len(a.concept)} --concept: give one per --concept, in order")
    scales = a.lora_scale + [1.0] * (len(a.concept) - len(a.lora_scale))
    tokens = a.token + [""] * (len(a.concept) - len(a.token))
    for i, (concept, scale, token) in enumerate(zip(a.concept, scales, tokens)):
        try:
            print(f"loaded {install_concept(backbone, concept, token=token or None, lora_scale=scale)} from {concept}")
            settings = run_settings(concept)
            if settings and not token:  # the method says how its prompts name the concept ("sks dog", "<concept>")
                from .methods import run_subject

                print(f"  prompts name it as: {run_subject(settings)!r}")
        except PlaceholderTaken as exc:  # the advice must name generate's own way out: --token in --concept order
            advice = " ".join(["--token ''"] * i + [f"--token '{renamed(exc.placeholder)}'"])
            raise PersonalizeError(f"--concept {concept}: the placeholder {exc.placeholder!r} is taken (a word of the "
                                   f"tokenizer, or an earlier --concept's); rename it at load: {advice}") from exc
    backbone.to(sampling_device())
    seeds = [a.seed + i for i in range(a.num_images)]
    images = generate_images(backbone, a.prompt, seeds, steps=a.steps, guidance=a.guidance,
                             resolution=a.resolution, negative_prompt=a.negative_prompt, sampler=a.sampler)
    out = Path(a.output)
    for i, image in enumerate(images):
        save_png(image, out / f"{i // len(seeds):02d}-{seeds[i % len(seeds)]}.png")
    zoom = max(1, 128 // images[0].width)  # the toy model's 32 px images: a grid a person can see (pixels kept sharp)
    tiles = [im.resize((im.width * zoom, im.height * zoom), resample=0) for im in images] if zoom > 1 else images
    save_png(make_grid(tiles, len(seeds)), out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    from .evaluate.runner import EvalConfig, evaluate

    p = argparse.ArgumentParser(prog="personalize evaluate",
                                description="Draw a paper's evaluation prompts with trained concepts and score them.")
    add_dataclass_flags(p, EvalConfig, set())
    cfg = EvalConfig(**vars(p.parse_args(argv)))
    files = evaluate(cfg)
    print("report: " + ", ".join(str(f) for f in files))
    return 0


def cmd_bench(argv: list[str]) -> int:
    from .toyworld.bench import BenchConfig, bench

    p = argparse.ArgumentParser(prog="personalize bench", description="The papers' tables in miniature on the toy model.")
    add_dataclass_flags(p, BenchConfig, set())
    files = bench(BenchConfig(**vars(p.parse_args(argv))))
    print("bench: " + ", ".join(str(f) for f in files))
    return 0


def cmd_mask(argv: list[str]) -> int:
    from .masking import make_masks

    p = argparse.ArgumentParser(prog="personalize mask", description="Foreground masks (NAME.mask.png) with GroundingDINO + SAM.")
    p.add_argument("--images", required=True, help="folder of images; masks are written beside them")
    p.add_argument("--class-word", required=True, help="what to segment, e.g. face")
    p.add_argument("--grounding-dino", default=None, help="GroundingDINO folder or cached hub id (e.g. IDEA-Research/grounding-dino-tiny)")
    p.add_argument("--sam", default=None, help="SAM folder or cached hub id (e.g. facebook/sam-vit-base)")
    p.add_argument("--box-threshold", type=float, default=0.3)
    p.add_argument("--allow-download", action="store_true", help="let transformers fetch missing weights from the hub")
    p.add_argument("--overwrite", action="store_true", help="replace existing masks")
    a = p.parse_args(argv)
    written = make_masks(a.images, a.class_word, a.grounding_dino, a.sam, a.box_threshold, a.allow_download, a.overwrite)
    print(f"wrote {len(written)} masks")
    return 0


def cmd_toyworld(argv: list[str]) -> int:
    from dataclasses import asdict

    from .toyworld.base_model import ToyTrainingConfig

    p = argparse.ArgumentParser(prog="personalize toyworld", description="The toy world: its base model and its judge.")
    sub = p.add_subparsers(dest="what", required=True)
    defaults = asdict(ToyTrainingConfig())
    for name, help_text in (("train-vae", "stage 1: train the VAE into OUTPUT/vae and gate it on the judge"),
                            ("train-base", "both stages: the VAE (unless OUTPUT/vae passed its gate), then UNet + text encoder")):
        stage = sub.add_parser(name, help=help_text)
        stage.add_argument("--output", required=True, help="the model folder (diffusers layout)")
        for key, value in defaults.items():
            stage.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value, dest=key, help=f"(default: {value})")
        stage.add_argument("--resume", action="store_true", help="continue the stage's checkpoint in OUTPUT")
    sub.choices["train-base"].add_argument(
        "--stop-after-minutes", type=float, default=None,
        help="end the UNet stage at the first step past this wall time and save it (training.json records the step)")
    sub.choices["train-base"].add_argument(
        "--init-from", default=None, help="continue from this model folder's UNet and text encoder instead of random weights")
    judge = sub.add_parser("train-judge", help="train the attribute judge on fresh renders")
    judge.add_argument("--output", default=None, help="default: the package's toyworld/weights/judge.safetensors")
    judge.add_argument("--steps", type=int, default=4000)
    judge.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.what == "train-judge":
        from .toyworld.judge import WEIGHTS_DIR, train_judge

        accuracy = train_judge(a.output or WEIGHTS_DIR / "judge.safetensors", steps=a.steps, seed=a.seed)
        print("judge accuracy on 1000 fresh renders: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
        return 0
    cfg = ToyTrainingConfig(**{k: getattr(a, k) for k in defaults})
    if a.what == "train-vae":
        from .toyworld.base_model import VAE_GATE, gate_passed, train_vae

        report = train_vae(a.output, cfg, resume=a.resume)
        verdict = "passed" if gate_passed(report) else "FAILED"
        print(f"VAE gate {verdict} (judge on reconstructions of 1000 fresh renders, need >= {VAE_GATE} each): "
              + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
        return 0 if gate_passed(report) else 1
    from .toyworld.base_model import train_base

    out = train_base(a.output, cfg, resume=a.resume, stop_after_minutes=a.stop_after_minutes, init_from=a.init_from)
    print(f"toy base model written to {out}")
    return 0


def cmd_plot(argv: list[str]) -> int:
    from .plot import plot_run

    p = argparse.ArgumentParser(prog="personalize plot", description="Draw a run's loss and learning-rate curves (from its logs.jsonl) to a PNG.")
    p.add_argument("run", help="a run folder written by personalize train")
    p.add_argument("--output", default=None, help="PNG file (default: RUN/curves.png)")
    p.add_argument("--smooth", type=int, default=20, help="moving-average window of the loss, in steps")
    a = p.parse_args(argv)
    print(f"wrote {plot_run(a.run, a.output, a.smooth)}")
    return 0


def cmd_presets(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="personalize presets", description="List the presets of `personalize train --preset`.").parse_args(argv)
    for name in preset_names():
        values = ", ".join(f"{k}={v}" for k, v in read_preset(name).items())
        print(f"{name}\n    {preset_description(name)}\n    {values}")
    return 0


def cmd_ui(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="personalize ui", description="The whole flow in a browser: images in, concept out "
                                "(every action runs, and shows, its personalize command).")
    p.add_argument("--workspace", default=".", help="the only folder the UI reads and writes: uploads/, runs/ (default: here)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--auth", default=None, help="USER:PASSWORD asked by the browser (HTTP Basic) before anything is shown")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest image file an upload may be")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--allow-host", action="append", default=[], help="another host name the browser may use to reach "
                   "the UI (a reverse proxy's; repeatable); any other Host header is refused (DNS rebinding)")
    p.add_argument("--model-dir", action="append", default=[], help="a model folder or file, or a folder of them, outside "
                   "the workspace that the page may use as --model (repeatable)")
    a = p.parse_args(argv)
    from .ui.guards import parse_auth  # (no third-party imports: a bad --auth is refused at once)

    auth = parse_auth(a.auth) if a.auth else None
    try:
        from .ui.app import serve
    except ImportError as exc:
        raise PersonalizeError(f"personalize ui needs its extra: pip install 'personalize[ui]' ({exc})") from exc
    try:
        serve(a.workspace, a.host, a.port, auth, a.max_upload_mb, show=not a.no_browser, allow_hosts=tuple(a.allow_host),
              model_dirs=tuple(a.model_dir))
    except KeyboardInterrupt:
        pass
    print("personalize ui stopped; jobs it started go on (a new `personalize ui` shows them)")
    return 0


VERBS = {"train": cmd_train, "generate": cmd_generate, "evaluate": cmd_evaluate, "bench": cmd_bench, "mask": cmd_mask, "toyworld": cmd_toyworld,
         "plot": cmd_plot, "presets": cmd_presets, "ui": cmd_ui}


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        dlog.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported: no torchvision notices
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print("usage: personalize {train,generate,evaluate,bench,mask,toyworld,plot,presets,ui} [options]   (personalize VERB --help for its options)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_libraries()
    try:
        return VERBS[argv[0]](argv[1:])
    except PersonalizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or the trainer's TrainingStopped (Ctrl-C / SIGTERM, checkpoint saved)
        print(f"{exc or 'interrupted'}: continue with --resume latest", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
