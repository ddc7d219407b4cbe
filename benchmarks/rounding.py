"""How float rounding grows during training: Dis²Booth against DreamBooth-LoRA on the toy model.

Why: one Dis²Booth bench run ends at judge-feature Fréchet 1789 with one torch thread and 2361 with two (same
seed, same code), while DreamBooth-LoRA given the same 1,000 updates moves ≤ 2.4 % across devices
(benchmarks/README.md, "Ablations"). The thread count changes only the order of float additions (reductions in
matmuls and convolutions), so the two runs differ by rounding alone; this script measures how that difference
grows, update by update, and which part of Algorithm 1 makes it grow.

What: each configuration is trained twice with `personalize train` on the same images and seed, once with one
torch thread (OMP_NUM_THREADS=1) and once with two, writing a checkpoint every step (every few steps for long
runs). Per checkpoint it compares the two runs' trainable weights (checkpoint `trainable.safetensors`):

- `rel_w`: ‖W1 − W2‖ / ‖W1‖ over all trainable tensors; also per adapter (anchor / delta) and LoRA A vs B;
- `rel_dw`: the same for the effective update ΔW = Σ_adapters w·B·A of every module (w = 1 for the warm-up
  adapter, α = β = 0.5 after the split), over all modules; `rel_dw_max` / `worst_module`: the worst module;
  `rel_dw_qk`, `rel_dw_vo`: over the attention query+key modules, and over value+output;
- `updates`: optimiser updates so far, counted as `Dis2Booth.updates_per_run` counts them (nominal: in the first
  Algorithm-1 iteration the feature sub-steps find empty queues and make no update).

The first configuration is also run a second time with one thread (`pair = 1 vs 1 thread`): it must be
bit-identical, so that every difference of the 1-vs-2 pair is rounding from the thread count.
The report fits the growth rate of log10(rel_dw) against updates (decades per 100 updates) in the first
`warmup` updates and after them, over points below 5 % (before the difference saturates).

Usage (2 CPU cores: training runs one at a time under `nice -n 15`):
    python benchmarks/rounding.py                              # all configurations, rows + report
    python benchmarks/rounding.py --configs dis2booth dreambooth-lora-r64
    python benchmarks/rounding.py --report benchmarks/results/rounding-2026-12-07   # only rewrite rounding.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

RESULTS = Path(__file__).parent / "results" / "rounding-2026-12-07"

# name -> (method, extra CLI flags, Dis2BoothConfig fields); dreambooth-lora rows train as many steps as the
# Dis²Booth run (Algorithm 1) makes updates.
CONFIGS = {
    "dis2booth": ("dis2booth", [], {}),
    "dreambooth-lora-r64": ("dreambooth-lora", ["--rank", "64"], None),
    "no-feature-losses": ("dis2booth", ["--no-contextual-loss", "--no-delta-loss"], {"contextual_loss": False, "delta_loss": False}),
    "synchronous": ("dis2booth", ["--synchronous"], {"synchronous": True}),
    # Algorithm 1's schedule with λ = γ = 0: every feature sub-step still steps its adapter's AdamW, with a zero
    # gradient (a pure momentum step), so this separates "extra optimiser steps" from "what the feature losses compute"
    "feature-weights-0": ("dis2booth", ["--contextual-loss-weight", "0", "--delta-loss-weight", "0"],
                          {"contextual_loss_weight": 0.0, "delta_loss_weight": 0.0}),
    "no-contextual": ("dis2booth", ["--no-contextual-loss"], {"contextual_loss": False}),
    "no-delta": ("dis2booth", ["--no-delta-loss"], {"delta_loss": False}),
    "folded": ("dis2booth", ["--schedule", "folded"], {"schedule": "folded"}),
    "dreambooth-lora-r4": ("dreambooth-lora", ["--rank", "4"], None),
}


def make_images(folder: Path) -> str:
    """The first Dis²Booth bench category, rendered as `suite_distribution` renders it; returns its class word."""
    from personalize.toyworld.bench.common import render_set
    from personalize.toyworld.world import CATEGORIES

    name, traits = next(iter(CATEGORIES.items()))
    if not folder.exists():
        render_set(folder, 30, seed=3, **traits)
    return traits.get("shape", "shape")


def d2b_config(args, fields: dict):
    from personalize.methods import Dis2BoothConfig

    return Dis2BoothConfig(warmup_steps=args.warmup_steps, **fields)


def plan(args, name: str) -> tuple[str, list[str], int, callable, tuple]:
    """(method, flags, steps, updates(step), adapter weights(step)) of one configuration."""
    from personalize.methods import Dis2Booth

    method, flags, fields = CONFIGS[name]
    if method == "dreambooth-lora":
        steps = Dis2Booth.updates_per_run(d2b_config(args, {}), args.steps)
        return method, flags, steps, (lambda s: s), (lambda s: {"default": 1.0})
    cfg = d2b_config(args, fields)
    flags = flags + ["--warmup-steps", str(args.warmup_steps)]
    return (method, flags, args.steps, lambda s: Dis2Booth.updates_per_run(cfg, s),
            lambda s: {"anchor": 1.0, "delta": 0.0} if s <= args.warmup_steps else {"anchor": 0.5, "delta": 0.5})


def train(args, name: str, threads: int, out: Path, images: Path, class_word: str) -> float:
    """One run; returns its CPU seconds (user + system of the child)."""
    method, flags, steps, _, _ = plan(args, name)
    every = max(1, math.ceil(steps / 60))
    cmd = ["nice", "-n", "15", "personalize", "train", "--method", method, "--model", "toy", "--images", str(images),
           "--class-word", class_word, "--steps", str(steps), "--lr", str(args.lr), "--batch-size", "4", "--seed", str(args.seed),
           "--mixed-precision", "no", "--num-validation-images", "0", "--checkpointing-steps", str(every),
           "--checkpoints-total-limit", "1000", "--output", str(out), "--overwrite", *flags]
    # PASSIVE: idle OpenMP threads sleep instead of spinning (same results bit for bit, checked; far less CPU on a busy machine)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"[{time.strftime('%H:%M:%S')}] {name}, {threads} thread(s): {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def split(state: dict[str, torch.Tensor]) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """{(adapter, module index): (A, B)}: parameters `lora_params.<adapter>__unet__<i>` alternate A, B per module."""
    modules = {}
    for key, value in state.items():
        adapter, _, index = key.removeprefix("lora_params.").split("__")
        modules.setdefault((adapter, int(index) // 2), [None, None])[int(index) % 2] = value.double()
    return {k: tuple(v) for k, v in modules.items()}


def module_names() -> list[str]:
    """The LoRA modules in checkpoint order (module i holds parameters 2i, 2i+1): peft's order on the toy UNet."""
    from personalize.backbone import load_backbone
    from personalize.lora import UNET_TARGETS, add_lora

    unet = load_backbone("toy").unet
    add_lora(unet, "probe", 4, None, UNET_TARGETS)
    return [n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A.probe." in n]


def compare(run1: Path, run2: Path, updates, weights) -> list[dict]:
    names = module_names()
    kind = lambda i: "qk" if names[i].endswith(("to_q", "to_k")) else "vo"  # attention logits vs values/output
    rows = []
    for ckpt in sorted((run1 / "checkpoints").glob("step-*")):
        step = int(ckpt.name.removeprefix("step-"))
        m1 = split(load_file(str(ckpt / "trainable.safetensors")))
        m2 = split(load_file(str(run2 / "checkpoints" / ckpt.name / "trainable.safetensors")))
        diff, norm = {}, {}
        dw_diff, dw_norm, dw_worst, worst = 0.0, 0.0, 0.0, ""
        by_kind = {"qk": [0.0, 0.0], "vo": [0.0, 0.0]}
        for (adapter, i), (a1, b1) in m1.items():
            a2, b2 = m2[(adapter, i)]
            for part, t1, t2 in (("A", a1, a2), ("B", b1, b2)):
                for group in ("all", adapter, f"{adapter}_{part}"):
                    diff[group] = diff.get(group, 0.0) + float((t1 - t2).square().sum())
                    norm[group] = norm.get(group, 0.0) + float(t1.square().sum())
        w = weights(step)
        for i in sorted({i for _, i in m1}):
            e1 = sum(w[a] * m1[(a, i)][1] @ m1[(a, i)][0] for a in w)
            e2 = sum(w[a] * m2[(a, i)][1] @ m2[(a, i)][0] for a in w)
            d, n = float((e1 - e2).square().sum()), float(e1.square().sum())
            dw_diff, dw_norm = dw_diff + d, dw_norm + n
            by_kind[kind(i)][0] += d
            by_kind[kind(i)][1] += n
            if n and math.sqrt(d / n) > dw_worst:
                dw_worst, worst = math.sqrt(d / n), names[i]
        row = {"step": step, "updates": updates(step), "identical": diff["all"] == 0.0,
               "rel_w": math.sqrt(diff["all"] / norm["all"]), "rel_dw": math.sqrt(dw_diff / dw_norm) if dw_norm else 0.0,
               "rel_dw_max": dw_worst, "worst_module": worst, "norm_dw": math.sqrt(dw_norm),
               **{f"rel_dw_{k}": math.sqrt(d / n) if n else 0.0 for k, (d, n) in by_kind.items()}}
        row.update({f"rel_w_{g}": math.sqrt(diff[g] / norm[g]) if norm[g] else 0.0 for g in diff if g != "all"})
        rows.append(row)
    return rows


# -- report ----------------------------------------------------------------------------------------------------


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log10(d) against updates, ×100: decades per 100 updates."""
    pts = [(u, math.log10(d)) for u, d in points if 0 < d < 0.05]
    if len(pts) < 3:
        return None
    mu, md = sum(u for u, _ in pts) / len(pts), sum(d for _, d in pts) / len(pts)
    suu = sum((u - mu) ** 2 for u, _ in pts)
    return 100 * sum((u - mu) * (d - md) for u, d in pts) / suu if suu else None


def fmt(x: float | None) -> str:
    return "—" if x is None else ("0" if x == 0 else f"{x:.1e}")


def report(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    head = [f"# Rounding growth: 1 vs 2 torch threads, same seed ({meta['date']}, this CPU)", "",
            "Made by " + ", then ".join(f"`{c}`" for c in meta["commands"]) + " (raw rows `rows.jsonl`, runs `runs.jsonl`).",
            f"Toy model, `{meta['images']}`, class word `{meta['class_word']}`, batch 4, lr {meta['lr']} "
            f"(scaled ×4 by --scale-lr), seed {meta.get('seed', 0)}, {meta['steps']} Dis²Booth steps with {meta['warmup_steps']} "
            "warm-up steps; dreambooth-lora rows train as many steps as Algorithm 1 makes updates.",
            *([meta["note"]] if "note" in meta else []), "",
            "## Relative difference of the effective LoRA update ΔW = Σ w·B·A (all modules), by optimiser updates", ""]
    text = tables(folder)
    (folder / "rounding.md").write_text("\n".join(head) + "\n" + text)
    print("\n".join(head) + "\n" + text)


def tables(folder: Path) -> str:
    """The two tables of the report (benchmarks/tables.py puts them in benchmarks/README.md), from the raw rows."""
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines() if line.strip()]
    runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines() if line.strip()] \
        if (folder / "runs.jsonl").exists() else []
    meta = json.loads((folder / "meta.json").read_text())
    warm, marks = meta["warmup_updates"], meta["marks"]
    rows.sort(key=lambda r: (list(CONFIGS).index(r["config"]), r["pair"], r["updates"]))
    pairs = list(dict.fromkeys((r["config"], r["pair"]) for r in rows))
    by_module = all("worst_module" in r for r in rows)  # rows of the first version of compare() lack the per-module split
    out = ["| config | pair | " + " | ".join(f"≤{m} upd." for m in marks) + " | end |",
           "|---|---|" + "---|" * (len(marks) + 1)]
    for config, pair in pairs:
        sel = [r for r in rows if r["config"] == config and r["pair"] == pair]
        cells = []
        for m in marks:
            before = [r for r in sel if r["updates"] <= m]
            cells.append(f"{fmt(before[-1]['rel_dw'])} ({before[-1]['updates']})" if before else "—")
        cells.append(f"{fmt(sel[-1]['rel_dw'])} ({sel[-1]['updates']})")
        out.append(f"| {config} | {pair} | " + " | ".join(cells) + " |")
    out += ["", "Each cell: the relative difference at the last checkpoint at or before that many updates (its update count "
            "in brackets); 0 = bit-identical.", "",
            "## Growth", "",
            f"Rate: least-squares slope of log10(rel ΔW) per 100 updates, over the first {warm} updates (the warm-up) and "
            "after them, on points < 5 %. Burst: the first checkpoint where rel ΔW exceeds 10× its value at the end of "
            "the warm-up. q/k: the attention query and key modules (they set the softmax logits); v/o: value and output.", "",
            f"| config | pair | rate, first {warm} upd. | rate after | burst at (updates) |"
            + (" rel ΔW at end: q/k / v/o | worst module at end |" if by_module else "")
            + " rel W at end: A / B (per adapter) | ‖ΔW‖ at end | CPU s (runs) |",
            "|---|---|---|---|---|" + ("---|---|" if by_module else "") + "---|---|---|"]
    for config, pair in pairs:
        sel = [r for r in rows if r["config"] == config and r["pair"] == pair]
        early = slope([(r["updates"], r["rel_dw"]) for r in sel if r["updates"] <= warm])
        late = slope([(r["updates"], r["rel_dw"]) for r in sel if r["updates"] >= warm])
        base = ([r["rel_dw"] for r in sel if r["updates"] <= warm] or [0.0])[-1]
        burst = next((r["updates"] for r in sel if base and r["rel_dw"] > 10 * base), None)
        end = sel[-1]
        adapters = [a for a in ("anchor", "delta", "default") if f"rel_w_{a}_A" in end]
        parts = "; ".join(f"{a} {fmt(end[f'rel_w_{a}_A'])} / {fmt(end[f'rel_w_{a}_B'])}" for a in adapters)
        qk = f"{fmt(end.get('rel_dw_qk'))} / {fmt(end.get('rel_dw_vo'))}"
        worst = f"{end.get('worst_module', '?')} ({fmt(end['rel_dw_max'])})"
        cpu = sum(r["cpu_s"] for r in runs if r["config"] == config and r["threads"] in pair_threads(pair))
        module_cells = f" {qk} | {worst} |" if by_module else ""
        out.append(f"| {config} | {pair} | {fmt_rate(early)} | {fmt_rate(late)} | {burst if burst else 'none'} |"
                   f"{module_cells} {parts} | {end['norm_dw']:.3g} | {cpu:.0f} |")
    total = sum(r["cpu_s"] for r in runs)
    out += ["", f"Total CPU of the training runs: {total:.0f} s ({total / 60:.1f} min)."]
    return "\n".join(out)


def pair_threads(pair: str) -> tuple:
    return ("1b",) if pair == "1 vs 1 thread" else (1, 2)


def fmt_rate(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


# -- main ------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=60, help="Dis²Booth steps (iterations)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4, help="before --scale-lr's ×4 (the 2.1 sweep's rate of both methods, "
                   "results/toy-2026-11-27/lr-sweep.json, with which the bench's Dis²Booth rows ran)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/rounding", help="scratch: images and run folders")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--no-repeat", action="store_true", help="skip the 1-vs-1-thread identity check of the first config")
    p.add_argument("--reuse", action="store_true", help="compare finished runs already in --work instead of training them")
    p.add_argument("--keep", action="store_true", help="keep the run folders (else their checkpoints are deleted)")
    p.add_argument("--report", metavar="DIR", help="only rewrite DIR/rounding.md from DIR's rows")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # this process only reads checkpoints; the training runs set their own threads
    if args.report:
        return report(Path(args.report))
    work, folder = Path(args.work), Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    images = work / "cat"
    class_word = make_images(images)
    from personalize.methods import Dis2Booth

    warm = Dis2Booth.updates_per_run(d2b_config(args, {}), args.warmup_steps)
    total = Dis2Booth.updates_per_run(d2b_config(args, {}), args.steps)
    command = "python benchmarks/rounding.py " + " ".join(sys.argv[1:] if argv is None else argv)
    old = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
    (folder / "meta.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "commands": list(dict.fromkeys(old.get("commands", []) + [command])),
        "images": str(images), "class_word": class_word, "lr": args.lr, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "warmup_updates": warm, "seed": args.seed, "marks": sorted({warm, 50, 100, 200, 300, 400, total} - {0}),
        "torch": torch.__version__}, indent=1))
    for name in args.configs:
        _, _, _, updates, weights = plan(args, name)
        runs = {t: work / "runs" / f"{name}-t{t}" for t in ([1, 2] + (["1b"] if name == args.configs[0] and not args.no_repeat else []))}
        old_runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines() if line.strip()] \
            if (folder / "runs.jsonl").exists() else []
        new_runs, new_rows = [], []
        for tag, out in runs.items():
            if args.reuse and json.loads((out / "run.json").read_text()).get("status") == "finished":
                cpu = next((r["cpu_s"] for r in old_runs if r["config"] == name and r["threads"] == tag), 0.0)
            else:
                cpu = train(args, name, 2 if tag == 2 else 1, out, images, class_word)
            new_runs.append({"config": name, "threads": tag, "cpu_s": round(cpu, 1), "output": str(out)})
        for tag, pair in ((2, "1 vs 2 threads"), ("1b", "1 vs 1 thread")):
            if tag in runs:
                new_rows += [{"config": name, "pair": pair, **r} for r in compare(runs[1], runs[tag], updates, weights)]
        for file, new in (("runs.jsonl", new_runs), ("rows.jsonl", new_rows)):  # replace this config's earlier rows
            old = [json.loads(line) for line in (folder / file).read_text().splitlines() if line.strip()] \
                if (folder / file).exists() else []
            kept = [r for r in old if r["config"] != name]
            (folder / file).write_text("".join(json.dumps(r) + "\n" for r in kept + new))
        if not args.keep:
            for out in runs.values():
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
        report(folder)


if __name__ == "__main__":
    main()
