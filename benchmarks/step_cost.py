"""What one training step of Textual Inversion and BaTex costs, against the least such a step can cost.

Measured on a built-in tiny model (`--model tiny`, `tiny-v` or `tiny-xl`) at one batch size and resolution, with
torch's default thread count. Four configurations:

- `floor`: one text-encoder forward+backward and one UNet forward+backward, nothing else (see `floor_step`);
- `textual-inversion`, `batex`: the trainer's step, exactly (`cache.sample` -> `method.loss` -> backward ->
  optimizer.step -> scheduler.step -> zero_grad), with the library's own LatentCache, method and AdamW;
- `ti-no-cache`: the same Textual Inversion step, but the batch's latents come from running the VAE encoder on
  the batch's images every step (pixels -> vae.encode -> latent_dist.sample() * scaling_factor under no_grad,
  as diffusers' example scripts do) instead of sampling the cached latent distributions.

Two measurements, each in fresh Python processes started by this script:

1. own process: each configuration alone in a fresh process (`--rounds` times, rotated round-robin): warm-up,
   then `--steps` timed steps -> median ms/step, its phases (batch / forward+loss / backward / optimizer+zero_grad)
   and peak RSS (ru_maxrss) when ready to step and at the end — each configuration's own peak;
2. interleaved: one process builds all four configurations (each on its own freshly loaded backbone) and runs
   `--paired-steps` cycles of one step of each, in rotating order. Consecutive steps see the same state of the
   machine, so the ratio of each cycle (TI/floor, BaTex/floor, no-cache/cached) cancels the machine's slow and
   fast spells; the reported ratios are the medians of those per-cycle ratios. On a shared or virtual CPU, whole
   processes run up to ±30 % slower or faster than one another, so the ratios of the own-process medians are
   printed too but are not the headline figures.

Usage:
    PYTHONPATH=src python benchmarks/step_cost.py [--model tiny] [--batch-size 4] [--resolution 32]
                                                  [--warmup 5] [--steps 30] [--json out.json]
    PYTHONPATH=src python benchmarks/step_cost.py --profile textual-inversion   # torch.profiler, 10 steps
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

CONFIGS = ("floor", "textual-inversion", "batex", "ti-no-cache")
PHASES = ("batch", "forward", "backward", "optimizer")
REPO = Path(__file__).resolve().parent.parent


def peak_rss_mib() -> float:
    """ru_maxrss is in KiB on Linux (bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def training_images(n: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """`n` image-like tensors [3, R, R] in [-1, 1]: smooth colour fields plus some texture (what the VAE sees)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=g) * 2 - 1
    smooth = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bicubic", align_corners=False)
    texture = 0.15 * torch.randn((n, 3, resolution, resolution), generator=g)
    return (smooth + texture).clamp(-1, 1)


# -- the step functions --------------------------------------------------------------------------------------------


def floor_step(backbone, args):
    """The floor: the compute that any method training text-side vectors through a frozen model cannot avoid.

    Per step, exactly: (1) the text encoder(s) run forward on fixed, pre-tokenised prompt ids [B, 77], with the
    token-embedding output replaced by a *leaf tensor that requires grad* (a forward hook on the input-embedding
    module), so the backward pass really goes through every text-encoder layer back to its input, as it does
    for a learned token vector; (2) the UNet runs forward on fixed noisy latents [B, 4, R/2, R/2] at fixed
    timesteps, conditioned on those embeddings (plus pooled text and default time ids for tiny-xl); (3) MSE
    against a fixed target; (4) backward. All weights stay frozen (as in TI/BaTex), so backward computes
    activation gradients only, along the same graph as the methods'. Not included: tokenisation, concept
    injection (ConceptEmbedding), noise/timestep sampling and add_noise (precomputed once), latent sampling,
    any optimiser, loss.item().
    """
    generator = torch.Generator().manual_seed(0)
    latent = args.resolution // backbone.vae_scale
    latents = torch.randn((args.batch_size, backbone.unet.config.in_channels, latent, latent), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, backbone.noise_scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
    noisy = backbone.add_noise(latents, noise, timesteps)
    target = backbone.target(latents, noise, timesteps)
    prompt_ids = backbone.tokenize(["a photo of a cat"] * args.batch_size)
    for encoder in backbone.text_encoders:
        encoder.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.detach().requires_grad_(True))

    def step(times: dict):
        t0 = time.perf_counter()
        prompt_embeds, pooled = backbone.encode_prompt(prompt_ids)
        prediction = backbone.unet_forward(noisy, timesteps, prompt_embeds, pooled)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        times["batch"].append(0.0)
        times["forward"].append(t1 - t0)
        times["backward"].append(t2 - t1)
        times["optimizer"].append(0.0)

    return step, {"backbone": backbone}


def method_step(backbone, args, method_name: str, cached: bool):
    """The trainer's per-step lines (trainer.train, one parameter group, mixed precision 'no'), reusing its classes."""
    from personalize.methods import METHODS, Batch
    from personalize.latents import LatentCache

    images = training_images(args.num_images, args.resolution)
    rows_total = 2 * len(images)  # with mirrors (a step costs the same without: a batch is a batch)
    time_ids = backbone.default_time_ids(rows_total, args.resolution) if backbone.is_sdxl else None  # uncropped squares
    cache = LatentCache(backbone, images, True, "cpu", None, time_ids)
    cls = METHODS[method_name]
    method = cls(cls.config_class(init_word="cat"), backbone)
    lr = cls.default_lr * args.batch_size  # scale_lr, one process
    params = method.param_groups()["main"]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=method.config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 1))
    generator = torch.Generator().manual_seed(0)
    pixels_with_flips = torch.cat([images, images.flip(-1)])
    vae, scale = backbone.vae, backbone.vae.config.scaling_factor

    def step(times: dict):
        t0 = time.perf_counter()
        if cached:
            latents, rows, masks = cache.sample(args.batch_size, generator)
            time_ids_rows = cache.last_time_ids
        else:  # diffusers' example scripts: encode the batch's (possibly flipped) pixels with the VAE every step
            picked = torch.randint(0, rows_total, (args.batch_size,), generator=generator)
            with torch.no_grad():
                latents = vae.encode(pixels_with_flips[picked]).latent_dist.sample(generator) * scale
            rows, masks = picked % len(images), None
            time_ids_rows = time_ids[picked] if time_ids is not None else None
        t1 = time.perf_counter()
        loss, _ = method.loss(Batch(latents, rows, generator, None, masks, time_ids_rows), "main")
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()}")
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[phase].append(seconds)

    return step, {"backbone": backbone, "cache": cache, "method": method, "optimizer": optimizer}


def build_step(config: str, args):
    """(step function, the objects it uses) for one configuration, on a freshly loaded, frozen backbone."""
    from personalize.backbone import load_backbone

    backbone = load_backbone(args.model)
    backbone.freeze()
    if config == "floor":
        return floor_step(backbone, args)
    if config == "ti-no-cache":
        return method_step(backbone, args, "textual-inversion", cached=False)
    return method_step(backbone, args, config, cached=True)


def timed_steps(step, count: int) -> tuple[list[float], dict]:
    phases = {p: [] for p in PHASES}
    totals = []
    for _ in range(count):
        t0 = time.perf_counter()
        step(phases)
        totals.append(time.perf_counter() - t0)
    return totals, phases


def describe(totals: list[float], phases: dict | None = None) -> dict:
    quartiles = statistics.quantiles(totals, n=4) if len(totals) > 1 else [totals[0]] * 3
    out = {"median_s": statistics.median(totals), "p25_s": quartiles[0], "p75_s": quartiles[2], "steps_s": totals}
    if phases is not None:
        out["phases_median_s"] = {p: statistics.median(v) for p, v in phases.items()}
    return out


def run_worker(config: str, args) -> dict:
    """Build one configuration, warm up, time `args.steps` steps; in a fresh process (see main)."""
    torch.manual_seed(0)
    step, _ = build_step(config, args)
    rss_ready = peak_rss_mib()
    timed_steps(step, args.warmup)
    totals, phases = timed_steps(step, args.steps)
    return {"config": config, **describe(totals, phases), "peak_rss_ready_mib": rss_ready,
            "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


RATIOS = {  # name: (numerator, denominator)
    "ti_over_floor": ("textual-inversion", "floor"),
    "batex_over_floor": ("batex", "floor"),
    "no_cache_over_cached": ("ti-no-cache", "textual-inversion"),
}


def run_paired(args) -> dict:
    """All configurations in this process, one step of each per cycle (rotating order); per-cycle ratios."""
    steps = {}
    for config in CONFIGS:
        torch.manual_seed(0)
        steps[config] = build_step(config, args)[0]
    for config in CONFIGS:
        timed_steps(steps[config], args.warmup)
    totals = {config: [] for config in CONFIGS}
    for cycle in range(args.paired_steps):
        for config in CONFIGS[cycle % len(CONFIGS):] + CONFIGS[: cycle % len(CONFIGS)]:
            totals[config].extend(timed_steps(steps[config], 1)[0])
    ratios = {name: [a / b for a, b in zip(totals[num], totals[den])] for name, (num, den) in RATIOS.items()}
    saved = [a - b for a, b in zip(totals["ti-no-cache"], totals["textual-inversion"])]
    return {
        "configs": {config: describe(t) for config, t in totals.items()},
        "cache_saves_s": statistics.median(saved),  # median of the per-cycle differences
        "ratios": {name: {"median": statistics.median(r), "quartiles": statistics.quantiles(r, n=4), "per_cycle": r}
                   for name, r in ratios.items()},
    }


# -- profiling -----------------------------------------------------------------------------------------------------


def profile(config: str, args, steps: int = 10) -> None:
    """torch.profiler over `steps` steps after warm-up, with the step's parts labelled; prints ms per step of each.

    Labels are record_function ranges put around the library calls a step makes (forward only; the backward of the
    concept injection is listed by its autograd functions), so what is not the networks' own compute shows up.
    """
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    from personalize import losses
    from personalize.concepts import ConceptEmbedding

    torch.manual_seed(0)
    step, parts = build_step(config, args)
    times = {p: [] for p in PHASES}
    for _ in range(args.warmup):
        step(times)

    def label(owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def wrapped(*a, **k):
            with record_function(name):
                return original(*a, **k)

        setattr(owner, attr, wrapped)

    backbone = parts["backbone"]
    label(losses, "sample_noise", "part::sample_noise (randn + randint)")
    for attr in ("add_noise", "target", "encode_prompt", "unet_forward"):
        label(backbone, attr, f"part::backbone.{attr}")
    for encoder in backbone.text_encoders:
        embedding = encoder.get_input_embeddings()
        name = "ConceptEmbedding.forward" if isinstance(embedding, ConceptEmbedding) else "token embedding"
        label(embedding, "forward", f"part::{name}")
    if "cache" in parts:
        label(parts["cache"], "sample", "part::LatentCache.sample")
        label(parts["method"], "loss", "part::method.loss (whole forward)")
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(times)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    events = prof.key_averages()
    wall = sum(e.self_cpu_time_total for e in events) / steps / 1000
    print(f"{config}, {steps} profiled steps: {wall:.2f} ms of CPU time per step (profiler overhead included)")
    concept_backward = ("GatherBackward0", "WhereBackward0", "ExpandBackward0", "UnsqueezeBackward0", "BmmBackward0")
    for e in sorted(events, key=lambda e: e.key):
        interesting = e.key.startswith(("part::", "Optimizer.", "LambdaLR")) or (
            e.key.startswith("autograd::engine") and e.key.endswith(concept_backward))
        if interesting:
            print(f"  {e.key:70s} {e.cpu_time_total / steps / 1000:7.3f} ms/step  ({e.count // steps}×)")


# -- driver --------------------------------------------------------------------------------------------------------


def pool(config_runs: list[dict]) -> dict:
    """One configuration's own-process rounds together: medians over all timed steps, the highest peak RSS."""
    totals = [t for r in config_runs for t in r["steps_s"]]
    phases = {p: statistics.median(r["phases_median_s"][p] for r in config_runs) for p in PHASES}
    return {**describe(totals), "phases_median_s": phases,
            "peak_rss_ready_mib": max(r["peak_rss_ready_mib"] for r in config_runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in config_runs), "threads": config_runs[0]["threads"]}


def run_in_fresh_process(worker: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", worker, "--_result", str(result),
               "--model", args.model, "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--paired-steps", str(args.paired_steps),
               "--num-images", str(args.num_images)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
        subprocess.run(cmd, check=True, env=env)
        return json.loads(result.read_text())


def table(results: dict[str, dict], paired: dict) -> str:
    lines = [
        "| configuration | own process: median ms/step | IQR ms | batch | fwd+loss | backward | opt+zero_grad "
        "| interleaved: median ms/step | ratio (interleaved, median of per-cycle ratios) | peak RSS ready / end MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratio_of = {"textual-inversion": ("ti_over_floor", "× floor"), "batex": ("batex_over_floor", "× floor"),
                "ti-no-cache": ("no_cache_over_cached", "× TI cached")}
    for config in CONFIGS:
        r, ph = results[config], results[config]["phases_median_s"]
        if config in ratio_of:
            name, what = ratio_of[config]
            q = paired["ratios"][name]["quartiles"]
            ratio = f"**{paired['ratios'][name]['median']:.3f}**{what} (IQR {q[0]:.2f}–{q[2]:.2f})"
        else:
            ratio = "1 (the floor)"
        lines.append(
            f"| {config} | {r['median_s'] * 1e3:.1f} | {r['p25_s'] * 1e3:.1f}–{r['p75_s'] * 1e3:.1f} | "
            + " | ".join(f"{ph[p] * 1e3:.1f}" for p in PHASES)
            + f" | {paired['configs'][config]['median_s'] * 1e3:.1f} | {ratio}"
            + f" | {r['peak_rss_ready_mib']:.0f} / {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def summary(results: dict[str, dict], paired: dict) -> dict:
    own = {name: results[num]["median_s"] / results[den]["median_s"] for name, (num, den) in RATIOS.items()}
    return {
        **{name: paired["ratios"][name]["median"] for name in RATIOS},
        "target": 1.15,
        "cache_saves_ms_per_step": paired["cache_saves_s"] * 1e3,
        "vae_encode_batch_ms": results["ti-no-cache"]["phases_median_s"]["batch"] * 1e3,
        "cache_sample_batch_ms": results["textual-inversion"]["phases_median_s"]["batch"] * 1e3,
        "own_process_ratios": own,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "tiny-v", "tiny-xl"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (per configuration and process)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration in its own process")
    parser.add_argument("--rounds", type=int, default=1, help="own processes per configuration (rotated round-robin)")
    parser.add_argument("--paired-steps", type=int, default=60, help="cycles of the interleaved measurement (0: skip)")
    parser.add_argument("--num-images", type=int, default=5, help="training images (cached with their mirrors)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--profile", choices=CONFIGS, help="profile 10 steps of one configuration in this process instead")
    parser.add_argument("--_worker", choices=(*CONFIGS, "paired"), help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported (lazily, below)
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")
    if args.steps < 2 or args.rounds < 1 or args.paired_steps < 2:
        parser.error("--steps and --paired-steps must be at least 2, --rounds at least 1")

    if args._worker:
        result = run_paired(args) if args._worker == "paired" else run_worker(args._worker, args)
        Path(args._result).write_text(json.dumps(result))
        return 0
    if args.profile:
        profile(args.profile, args)
        return 0

    started = time.perf_counter()
    runs: dict[str, list[dict]] = {config: [] for config in CONFIGS}
    for round_ in range(args.rounds):  # rotated, so no configuration always runs first or after the same one
        for config in CONFIGS[round_ % len(CONFIGS):] + CONFIGS[: round_ % len(CONFIGS)]:
            print(f"[own process, round {round_ + 1}/{args.rounds}] {config} ...", file=sys.stderr, flush=True)
            runs[config].append(run_in_fresh_process(config, args))
    print(f"[interleaved] {args.paired_steps} cycles of {', '.join(CONFIGS)} ...", file=sys.stderr, flush=True)
    paired = run_in_fresh_process("paired", args)
    results = {config: pool(config_runs) for config, config_runs in runs.items()}
    info = {
        "model": args.model, "batch_size": args.batch_size, "resolution": args.resolution, "warmup": args.warmup,
        "steps": args.steps, "rounds": args.rounds, "paired_steps": args.paired_steps, "torch": torch.__version__,
        "threads": results["floor"]["threads"], "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(),
        "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(f"\nmodel {args.model}, batch {args.batch_size}, resolution {args.resolution}; own process: {args.rounds} × "
          f"({args.warmup} warm-up + {args.steps} timed steps); interleaved: {args.paired_steps} cycles; torch "
          f"{torch.__version__}, {info['threads']} threads, {'CUDA' if info['cuda'] else 'CPU only'}, {info['wall_s']} s\n")
    print(table(results, paired))
    s = summary(results, paired)
    own = s["own_process_ratios"]
    print(f"\nTI / floor = {s['ti_over_floor']:.3f}, BaTex / floor = {s['batex_over_floor']:.3f} (target ≤ {s['target']}); "
          f"no-cache / cached = {s['no_cache_over_cached']:.3f} (caching saves {s['cache_saves_ms_per_step']:.1f} ms/step; "
          f"getting the batch: VAE encode {s['vae_encode_batch_ms']:.2f} ms vs cache sample {s['cache_sample_batch_ms']:.2f} ms)"
          f"\n(ratios of the own-process medians, noisier: TI {own['ti_over_floor']:.2f}, BaTex {own['batex_over_floor']:.2f}, "
          f"no-cache {own['no_cache_over_cached']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "summary": s, "results": results, "runs": runs,
                                               "interleaved": paired}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
