"""Dis²Booth's claims in miniature (Table 1 and its ablations): learning a varied category.

A category is 30 reference renders sharing one trait (`world.CATEGORIES`), the rest random. Rows: the base model
prompted with the class word, the floor (as many fresh real renders as generated images: Fréchet distances are
comparable only at the same N), Textual Inversion, DreamBooth-LoRA (at the same iterations, and at as many optimizer
updates as Dis²Booth makes: `Dis2Booth.updates_per_run`), Dis²Booth with Algorithm 1, each of its losses ablated,
the synchronous ablation, and the folded schedule. Columns: judge-feature Fréchet distance to 128 held-out renders
of the category (the toy FID), judge-feature diversity (the toy LPIPS-DIV), share keeping the common trait,
optimizer updates. `dis2booth-scan`: λ and γ (eq. 14) over four decades, on each category (`--concepts`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...evaluate import toy as T
from ..world import CATEGORIES
from .common import (LOG, BenchConfig, Sampler, chosen_concepts, load_model, method_rate, render_set, run_seeds, run_slug, save_grid, select_runs,
                     subject_of, train_run)

DIS2BOOTH_STEPS = 120  # iterations: 40 warm-up + 80 of Algorithm 1 (12 updates each at k = 5)
EQUAL_UPDATES = "dreambooth-lora: as many updates as dis2booth"  # the count is the row's `updates` column


def _category(work: Path, name: str, traits: dict, n_generated: int):
    folder = work / name / "reference"
    render_set(folder, 30, seed=3, **traits)
    heldout = render_set(work / name / "heldout", 128, seed=4, **traits)
    real = render_set(work / name / "real", n_generated, seed=5, **traits)
    return folder, heldout, real


def _row(judge, images, heldout, traits) -> dict[str, float]:
    return {"frechet": T.judge_frechet(judge, images, heldout), "diversity": T.diversity(judge, images),
            "keeps_trait": T.concept_rate(judge.predict(images), traits), "n_generated": len(images)}


def _measure(cfg, judge, work, name, traits, heldout, n_generated, label, method, method_cfg, steps, updates) -> list[dict]:
    rows = []
    for seed in run_seeds(cfg):
        out = work / name / f"{run_slug(label)}-{seed}"
        subject = subject_of(method, method_cfg)
        seconds = train_run(cfg, out, method, method_cfg, work / name / "reference", steps, seed, lr=method_rate(cfg, method))
        images = Sampler(cfg)(load_model(cfg, [out]), f"a {subject}", n_generated)
        save_grid(images, Path(cfg.output) / "grids" / f"distribution-{name}-{out.name}.png")
        rows.append({"suite": "distribution", "method": label, "concept": name, "seed": seed, "train_seconds": seconds,
                     "updates": updates, **_row(judge, images, heldout, traits)})
        LOG.info("%s", rows[-1])
    return rows


def suite_distribution(cfg: BenchConfig, judge, work: Path) -> list[dict]:
    from ...methods import Dis2Booth, Dis2BoothConfig, DreamBoothLoraConfig, TextualInversionConfig

    rows, n_generated = [], max(cfg.samples, 2)
    for _, (name, traits) in chosen_concepts(cfg, CATEGORIES.items()):
        class_word = traits.get("shape", "shape")
        _, heldout, real = _category(work, name, traits, n_generated)
        base = Sampler(cfg)(load_model(cfg), f"a {class_word}", n_generated)
        rows.append({"suite": "distribution", "method": "base: class word", "concept": name, "seed": 0, **_row(judge, base, heldout, traits)})
        rows.append({"suite": "distribution", "method": "real renders (the floor)", "concept": name, "seed": 0,
                     **_row(judge, real, heldout, traits)})
        steps = DIS2BOOTH_STEPS if cfg.steps is None else cfg.steps
        d2b = Dis2BoothConfig(class_word=class_word, warmup_steps=steps // 3)
        updates = Dis2Booth.updates_per_run(d2b, steps)
        ti_steps = 300 if cfg.steps is None else cfg.steps
        runs = [
            ("textual-inversion", "textual-inversion", TextualInversionConfig(init_word=class_word), ti_steps, ti_steps),
            ("dreambooth-lora", "dreambooth-lora", DreamBoothLoraConfig(class_word=class_word), steps, steps),
            (EQUAL_UPDATES, "dreambooth-lora", DreamBoothLoraConfig(class_word=class_word),
             updates, updates),
            ("dis2booth", "dis2booth", d2b, steps, updates),
            ("dis2booth: no contextual loss", "dis2booth", replace(d2b, contextual_loss=False), steps,
             Dis2Booth.updates_per_run(replace(d2b, contextual_loss=False), steps)),
            ("dis2booth: no delta loss", "dis2booth", replace(d2b, delta_loss=False), steps,
             Dis2Booth.updates_per_run(replace(d2b, delta_loss=False), steps)),
            ("dis2booth: synchronous", "dis2booth", replace(d2b, synchronous=True), steps,
             Dis2Booth.updates_per_run(replace(d2b, synchronous=True), steps)),
            ("dis2booth: folded schedule", "dis2booth", replace(d2b, schedule="folded"), steps,
             Dis2Booth.updates_per_run(replace(d2b, schedule="folded"), steps)),
        ]
        for label, method, method_cfg, run_steps, run_updates in select_runs(cfg, "distribution", runs):
            rows += _measure(cfg, judge, work, name, traits, heldout, n_generated, label, method, method_cfg, run_steps, run_updates)
    return rows


SCAN = ((1e-5, 1e-6), (1e-3, 1e-4), (1e-1, 1e-2), (1.0, 1.0))  # (λ, γ): the paper's, then ×100 each


def scan_label(lam: float, gamma: float) -> str:
    """The scan row of one (λ, γ) cell, as bench.md and the claims name it."""
    return f"dis2booth λ={lam:g} γ={gamma:g}"


def suite_dis2booth_scan(cfg: BenchConfig, judge, work: Path) -> list[dict]:
    from ...methods import Dis2Booth, Dis2BoothConfig

    rows, n_generated = [], max(cfg.samples, 2)
    steps = DIS2BOOTH_STEPS if cfg.steps is None else cfg.steps
    for _, (name, traits) in chosen_concepts(cfg, CATEGORIES.items()):  # the protocol's ≥ 3 categories × ≥ 3 seeds per cell
        class_word = traits.get("shape", "shape")
        _, heldout, _ = _category(work, name, traits, n_generated)
        for lam, gamma in SCAN:
            d2b = Dis2BoothConfig(class_word=class_word, warmup_steps=steps // 3, contextual_loss_weight=lam, delta_loss_weight=gamma)
            label = scan_label(lam, gamma)
            if select_runs(cfg, "dis2booth-scan", [(label,)]):
                for row in _measure(cfg, judge, work, name, traits, heldout, n_generated, label, "dis2booth", d2b, steps,
                                    Dis2Booth.updates_per_run(d2b, steps)):
                    rows.append({**row, "suite": "dis2booth-scan", "lambda": lam, "gamma": gamma})
    return rows
