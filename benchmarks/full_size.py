"""Real-size training cost: seconds per step and peak memory of every method on SD 1.5 / SD 2.1 / SDXL.

The models are `random:sd15`, `random:sd21`, `random:sdxl` (the real architectures' configs shipped with the
package, seeded random weights, built once into the cache; see `personalize.architectures`), so the numbers are
those of the real networks without a download. Every configuration runs in a fresh Python process that calls
`personalize train` (the CLI's own `cli.main`), so each peak is its own:

- seconds per step: the time between consecutive steps' log lines (a wrapper around the trainer's per-step
  `StepLog.write`, after a CUDA synchronize), median and IQR over the steps after the first `--warmup`;
  the trainer's checkpoint (written after the last step) and previews (`--num-validation-images 0`) are outside;
- peak memory: on a GPU `torch.cuda.max_memory_allocated()` over the whole run (weights + activations + optimiser);
  on a CPU the process's peak RSS (`ru_maxrss`, which includes loading the fp16 files into fp32, usually the
  largest moment) and the peak RSS from the end of the first step to the end of the last (the high-water mark
  VmHWM reset after step 1: the training footprint, activations of the backward pass included);
- `floor`: the least a step can cost on the same model, precision and size — the text encoder(s) forward from a
  token-embedding output that requires grad, the UNet forward, MSE, backward through both (frozen weights, as in
  Textual Inversion and BaTex; `benchmarks/step_cost.py` has the same floor for the tiny models). `× floor` is a
  configuration's median over the floor's median of the same architecture, size, precision and checkpointing.

Configurations: method × architecture (each at its resolution) × precision × gradient checkpointing off/on
(× optimizer × text-embedding cache when asked). Options the installed trainer does not have yet
(`--gradient-checkpointing`, `--optimizer`, `--cache-text-embeddings`) are skipped with a note, as are fp16 on a
CPU and the 8-bit optimizer without CUDA. The method settings are the targets' (DreamBooth-LoRA rank 64;
Dis²Booth's defaults, rank 64 and 1 anchor + 5 delta sub-steps per step, after 1 warm-up step; SingleInsert's
Stage II after 1 Stage I step), batch size 1, 2 training images (+ mirrors) with masks.

Usage:
    python benchmarks/full_size.py                          # the GPU matrix: all methods, SD 1.5 @ 512 and SDXL @ 1024,
                                                            #   precision no/fp16/bf16, checkpointing off/on
    OMP_NUM_THREADS=1 python benchmarks/full_size.py --archs sd15 --resolution 128 --precisions no bf16 \\
        --methods floor textual-inversion dreambooth-lora --steps 6        # a CPU subset
    python benchmarks/full_size.py --check                  # every method x sd15/sd21/sdxl, 2 steps at 64 px: trains
                                                            #   and exports (correctness, not speed)
Options: --json PATH (rows, default benchmarks/results/full_size-<time>.json), --markdown PATH, --timeout S.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("floor", "textual-inversion", "batex", "dreambooth-lora", "dis2booth", "singleinsert")
NATIVE = {"sd15": 512, "sd21": 768, "sdxl": 1024}
GPU_ARCHS = ("sd15", "sdxl")
OPTIONAL_FLAGS = {"checkpointing": "gradient_checkpointing", "optimizer": "optimizer", "cache_text": "cache_text_embeddings"}
GIB = 1024 ** 3

# Targets for a GPU (CUDA max_memory_allocated) and for the step's overhead; checked against the rows, never in tests.
OVERHEAD_TARGET = 1.10  # a method's step over the floor's, for the methods whose step is the floor's work plus bookkeeping
MEMORY_TARGETS = [  # (what, architecture, resolution, methods, GiB)
    ("SDXL 1024 batch 1 DreamBooth-LoRA rank 64", "sdxl", 1024, ("dreambooth-lora",), 12),
    ("SDXL 1024 batch 1 Dis²Booth", "sdxl", 1024, ("dis2booth",), 16),
    ("SD 1.5 512 batch 1 TI / BaTex", "sd15", 512, ("textual-inversion", "batex"), 6),
]


def method_args(method: str, steps: int, rank: int) -> list[str]:
    return {
        "textual-inversion": ["--init-word", "cat"],
        "batex": ["--init-word", "cat"],
        "dreambooth-lora": ["--class-word", "cat", "--rank", str(rank)],
        "dis2booth": ["--class-word", "cat", "--warmup-steps", "1"],
        "singleinsert": ["--class-word", "cat", "--stage1-steps", "1", "--stage2-steps", str(max(1, steps - 1))],
    }[method]


# -- the child process -------------------------------------------------------------------------------------------


def status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB: VmRSS (now), VmHWM (the high-water mark)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0), so that VmHWM measures from now on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def floor_run(cfg: dict, mark) -> None:
    """The floor's steps on the same model, precision and size as the trainer would run them (see the module doc)."""
    import torch

    from personalize.backbone import load_backbone

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg["precision"], torch.float32)
    backbone = load_backbone(f"random:{cfg['arch']}")
    backbone.freeze()
    backbone.to(device, dtype)
    if cfg.get("checkpointing"):  # as the trainer does: UNet and text encoders, in training mode
        if hasattr(backbone, "enable_gradient_checkpointing"):
            backbone.enable_gradient_checkpointing()
        else:
            backbone.unet.enable_gradient_checkpointing()
            backbone.unet.train()
    generator = torch.Generator().manual_seed(0)
    b, side = cfg["batch_size"], cfg["resolution"] // backbone.vae_scale
    latents = torch.randn((b, backbone.unet.config.in_channels, side, side), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, backbone.noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    noisy = backbone.add_noise(latents, noise, timesteps).to(device)
    target = backbone.target(latents, noise, timesteps).to(device)
    timesteps = timesteps.to(device)
    ids = backbone.tokenize(["a photo of a cat"] * b)
    for encoder in backbone.text_encoders:
        encoder.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.detach().requires_grad_(True))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for _ in range(cfg["steps"]):
        with autocast:
            prompt, pooled = backbone.encode_prompt(ids)
            prediction = backbone.unet_forward(noisy, timesteps, prompt, pooled)
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
        mark()


def child(cfg: dict) -> dict:
    import torch

    from personalize import cli, trainer

    cuda = torch.cuda.is_available()
    marks, hwm, before_reset = [], [], [0.0]

    def mark():
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if len(marks) == 1:  # from the end of the first step on: the training footprint, not loading's
            before_reset[0] = peak_rss_mib()  # resetting VmHWM may reset ru_maxrss too
            hwm.append(None if not reset_peak_rss() else status_mib("VmHWM"))
        elif hwm[0] is not None:
            hwm.append(status_mib("VmHWM"))

    start = time.perf_counter()
    error = None
    if cfg["method"] == "floor":
        try:
            floor_run(cfg, mark)
        except Exception as exc:  # noqa: BLE001 - a failed configuration is a row, not the end of the benchmark
            error = f"{type(exc).__name__}: {exc}"
    else:
        original = trainer.StepLog.write

        def write(self, step, values):
            mark()
            return original(self, step, values)

        trainer.StepLog.write = write
        out = Path(cfg["output"])
        args = ["train", "--method", cfg["method"], "--model", f"random:{cfg['arch']}", "--images", cfg["images"],
                "--output", str(out), "--resolution", str(cfg["resolution"]), "--batch-size", str(cfg["batch_size"]),
                "--steps", str(cfg["steps"]), "--num-validation-images", "0", "--checkpointing-steps", str(cfg["steps"]),
                "--mixed-precision", cfg["precision"], "--overwrite",
                *(["--gradient-checkpointing"] if cfg.get("checkpointing") else []),
                *(["--optimizer", cfg["optimizer"]] if cfg.get("optimizer", "adamw") != "adamw" else []),
                *({"on": ["--cache-text-embeddings"], "off": ["--no-cache-text-embeddings"]}.get(cfg.get("cache_text"), [])),
                *method_args(cfg["method"], cfg["steps"], cfg["rank"])]
        try:
            code = cli.main(args)
        except SystemExit as exc:
            code = exc.code
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        if code != 0 or run.get("status") != "finished":
            error = f"personalize train exited {code}, run status {run.get('status')!r}"
        else:
            cfg["artefacts"] = run.get("artefacts")
    wall = time.perf_counter() - start
    durations = [b - a for a, b in zip(marks, marks[1:])][max(0, cfg["warmup"] - 1):]  # steps after the first `warmup`
    row = {**cfg, "status": "failed" if error else "ok", "note": error or cfg.get("note", ""), "wall_s": round(wall, 1),
           "timed_steps": len(durations), "step_s": [round(d, 4) for d in durations],
           "peak_rss_mib": round(max(before_reset[0], peak_rss_mib())), "steps_peak_rss_mib": round(hwm[-1]) if hwm and hwm[-1] else None,
           "device": torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} torch threads)"}
    if durations:
        q = statistics.quantiles(durations, n=4) if len(durations) > 1 else [durations[0]] * 3
        row.update(median_s=round(statistics.median(durations), 4), iqr_s=[round(q[0], 4), round(q[2], 4)])
    if cuda:
        row["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    return row


# -- the parent ----------------------------------------------------------------------------------------------------


def training_images(folder: Path, count: int) -> str:
    """`count` of the repository's example cat photos, each with an ellipse mask (SingleInsert needs one)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted((REPO / "examples" / "cat").glob("*.jpg"))[:count]:
        image = Image.open(src).convert("RGB")
        image.save(folder / src.name)
        mask = Image.new("L", image.size, 0)
        w, h = image.size
        ImageDraw.Draw(mask).ellipse((w * 0.2, h * 0.15, w * 0.8, h * 0.9), fill=255)
        mask.save(folder / f"{src.stem}.mask.png")
    return str(folder)


def trainer_options() -> set[str]:
    """The option names of the installed trainer (its config dataclass's fields)."""
    sys.path.insert(0, str(REPO / "src"))
    from personalize.trainer import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def skip_reason(cfg: dict, options: set[str], cuda: bool) -> str | None:
    if cfg["precision"] == "fp16" and not cuda:
        return "fp16 needs a GPU (CPU: no, bf16)"
    if cfg["method"] == "floor":
        return None
    for key, option in OPTIONAL_FLAGS.items():
        if cfg.get(key) not in (None, False, "adamw", "default") and option not in options:
            return f"--{option.replace('_', '-')} is not in this trainer yet"
    if cfg.get("optimizer") == "adamw8bit" and not cuda:
        return "adamw8bit needs bitsandbytes and CUDA"
    return None


def plan(args) -> list[dict]:
    rows = []
    for arch in args.archs:
        resolution = args.resolution or NATIVE[arch]
        for precision in args.precisions:
            for checkpointing in args.checkpointing:
                for optimizer in args.optimizers:
                    for cache_text in args.cache_text:
                        for method in args.methods:
                            if method == "floor" and (optimizer != "adamw" or cache_text != "default"):
                                continue  # the floor has no optimiser and no text-embedding cache
                            rows.append({"method": method, "arch": arch, "resolution": resolution, "precision": precision,
                                         "checkpointing": checkpointing == "on", "optimizer": optimizer,
                                         "cache_text": cache_text, "batch_size": args.batch_size,
                                         "steps": args.steps, "warmup": args.warmup, "rank": args.rank})
    return rows


def run_child(cfg: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="full-size-") as tmp:
        cfg = {**cfg, "output": str(Path(tmp) / "run")}
        result = Path(tmp) / "result.json"
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import full_size; "
                f"json.dump(full_size.child(json.loads(sys.argv[1])), open(sys.argv[2], 'w'))")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg), str(result)], env=env, timeout=timeout,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {**cfg, "status": "failed", "note": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {**cfg, "status": "failed", "note": f"exit {proc.returncode}: {' | '.join(tail)}",
                    "wall_s": round(time.perf_counter() - start, 1)}
        return json.loads(result.read_text())


def add_floor_ratios(rows: list[dict]) -> None:
    key = lambda r: (r["arch"], r["resolution"], r["precision"], r["checkpointing"], r["batch_size"])  # noqa: E731
    floors = {key(r): r["median_s"] for r in rows if r["method"] == "floor" and r.get("median_s")}
    for r in rows:
        if r.get("median_s") and key(r) in floors and r["method"] != "floor":
            r["x_floor"] = round(r["median_s"] / floors[key(r)], 3)


def markdown(rows: list[dict]) -> str:
    cuda = any("cuda_max_allocated_mib" in r for r in rows)
    memory = "CUDA max allocated MiB" if cuda else "peak RSS MiB | peak RSS of steps 2+ MiB"
    lines = [f"| arch | px | method | precision | grad. ckpt | optimizer | text cache | s/step (median) | IQR s | × floor | {memory} | wall s | note |",
             "|---|---:|---|---|---|---|---|---:|---:|---:|" + ("---:|" if cuda else "---:|---:|") + "---:|---|"]
    for r in rows:
        mem = str(r.get("cuda_max_allocated_mib", "")) if cuda else f"{r.get('peak_rss_mib', '')} | {r.get('steps_peak_rss_mib') or ''}"
        iqr = f"{r['iqr_s'][0]:.2f}–{r['iqr_s'][1]:.2f}" if r.get("iqr_s") else ""
        median = f"{r['median_s']:.2f}" if r.get("median_s") else ""
        note = r.get("note", "") if r.get("status") != "ok" else ""
        if r.get("status") == "skipped":
            note = f"skipped: {note}"
        lines.append(f"| {r['arch']} | {r['resolution']} | {r['method']} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} "
                     f"| {r['optimizer']} | {r['cache_text']} | {median} | {iqr} | {r.get('x_floor', '')} "
                     f"| {mem} | {r.get('wall_s', '')} | {note} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> str:
    """Each target against the rows that measure it (memory targets only with CUDA numbers)."""
    out = []
    measured = [r for r in rows if r.get("x_floor") and r["method"] in ("textual-inversion", "batex")]
    if measured:
        worst = max(measured, key=lambda r: r["x_floor"])
        out.append(f"- step overhead ≤ {OVERHEAD_TARGET}× floor (TI, BaTex): worst {worst['x_floor']}× ({worst['method']}, "
                   f"{worst['arch']} {worst['resolution']} px, {worst['precision']}, ckpt {'on' if worst['checkpointing'] else 'off'}) "
                   f"— {'met' if worst['x_floor'] <= OVERHEAD_TARGET else 'NOT met'}")
    else:
        out.append(f"- step overhead ≤ {OVERHEAD_TARGET}× floor (TI, BaTex): not measured")
    for what, arch, resolution, methods, gib in MEMORY_TARGETS:
        hits = [r for r in rows if r["arch"] == arch and r["resolution"] == resolution and r["method"] in methods
                and r["batch_size"] == 1 and r.get("cuda_max_allocated_mib")]
        if not hits:
            out.append(f"- {what} ≤ {gib} GB (CUDA max allocated): not measured (needs a GPU run at {resolution} px)")
            continue
        best = min(hits, key=lambda r: r["cuda_max_allocated_mib"])
        got = best["cuda_max_allocated_mib"] * 2 ** 20 / GIB
        out.append(f"- {what} ≤ {gib} GB: best {got:.1f} GiB ({best['method']}, {best['precision']}, ckpt "
                   f"{'on' if best['checkpointing'] else 'off'}) — {'met' if got <= gib else 'NOT met'}")
    return "\n".join(out)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    import diffusers
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", choices=sorted(NATIVE), default=None, help="default: sd15 sdxl (--check: all three)")
    p.add_argument("--resolution", type=int, default=None, help="one size for every architecture (default: each one's native)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--precisions", nargs="+", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--optimizers", nargs="+", choices=["adamw", "adamw8bit"], default=["adamw"])
    p.add_argument("--cache-text", nargs="+", choices=["default", "off", "on"], default=["default"],
                   help="--cache-text-embeddings: the trainer's default (on where the method trains nothing on the text side), off, on")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=12, help="training steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--rank", type=int, default=64, help="DreamBooth-LoRA's rank (the memory target's)")
    p.add_argument("--images", type=int, default=2, help="training images (each also mirrored)")
    p.add_argument("--check", action="store_true", help="correctness: every method x architecture, 2 steps at 64 px, precision no")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if args.check:
        args.archs = args.archs or ["sd15", "sd21", "sdxl"]
        args.resolution, args.steps, args.warmup = args.resolution or 64, 2, 1
        args.precisions, args.checkpointing = args.precisions or ["no"], ["off"]
        args.methods = args.methods or [m for m in METHODS if m != "floor"]
    args.archs = args.archs or list(GPU_ARCHS)
    args.methods = args.methods or list(METHODS)
    args.precisions = args.precisions or (["no", "fp16", "bf16"] if cuda else ["no", "bf16"])
    if args.warmup < 1 or args.steps <= args.warmup:
        p.error("need --steps > --warmup >= 1 (a step's time is the gap after the previous step)")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    args.json = args.json or REPO / "benchmarks" / "results" / f"full_size-{stamp}.json"
    args.json.parent.mkdir(parents=True, exist_ok=True)

    options = trainer_options()
    about = machine()
    print(f"# {about}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="full-size-images-") as tmp:
        images = training_images(Path(tmp) / "images", args.images)
        for cfg in plan(args):
            cfg["images"] = images
            reason = skip_reason(cfg, options, cuda)
            label = (f"{cfg['arch']} {cfg['resolution']}px {cfg['method']} {cfg['precision']} ckpt={'on' if cfg['checkpointing'] else 'off'}"
                     f" opt={cfg['optimizer']} text-cache={cfg['cache_text']}")
            if reason:
                rows.append({**cfg, "status": "skipped", "note": reason})
                print(f"{label}: skipped ({reason})", flush=True)
            else:
                row = run_child(cfg, args.timeout)
                rows.append(row)
                print(f"{label}: {row['status']} median {row.get('median_s')} s/step, peak RSS {row.get('peak_rss_mib')} MiB, "
                      f"CUDA {row.get('cuda_max_allocated_mib')} MiB, wall {row.get('wall_s')} s {row.get('note', '')}", flush=True)
            add_floor_ratios(rows)
            for r in rows:
                r.pop("images", None), r.pop("output", None)
            args.json.write_text(json.dumps({"machine": about, "args": {k: str(v) for k, v in vars(args).items()},
                                             "rows": rows}, indent=1))
    report = f"{about}\n\n{markdown(rows)}\n\nTargets:\n{targets(rows)}\n"
    print("\n" + report)
    if args.markdown:
        args.markdown.write_text(report)
    print(f"rows: {args.json}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
