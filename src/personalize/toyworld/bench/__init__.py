"""`personalize bench`: the papers' tables in miniature on the toy model, judged by the toy judge.

One file per paper's claims (`batex.py`, `singleinsert.py`, `dis2booth.py`), the model's own gates
(`base_model.py`), the learning-rate sweep (`sweep.py`) and what they share (`common.py`): settings, runs,
sampling with the same seeds for every row, measuring) and `stats.py`, the one place where "A beats B" becomes held /
reversed / inside noise (concept means, exact two-sided sign test over concepts, Holm within a paper, bootstrap
interval). Writes OUTPUT/bench.json (every row, the verdicts, the chosen rates), OUTPUT/bench.md
(tables and verdicts), OUTPUT/grids/*.png (samples per row) and OUTPUT/*.png plots; partial results are written
after every suite, so a long bench that dies keeps what it measured.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ...errors import PersonalizeError
from ...export import atomic_write
from .base_model import suite_base_model
from .batex import suite_embeddings
from . import stats
from .common import (BENCH_LR, BenchConfig, concept_traits, method_rate, preview_curve, render_set, saturated,
                     select_runs, steps_to_converge, subject_of, summarise)
from .dis2booth import EQUAL_UPDATES, SCAN, scan_label, suite_dis2booth_scan, suite_distribution
from .singleinsert import suite_singleinsert
from .sweep import suite_lr_sweep

SUITES = {
    "base-model": suite_base_model,
    "lr-sweep": suite_lr_sweep,
    "embeddings": suite_embeddings,
    "init-word": lambda cfg, judge, work: suite_embeddings(cfg, judge, work, "init-word"),
    "basis-size": lambda cfg, judge, work: suite_embeddings(cfg, judge, work, "basis-size"),
    "distance": lambda cfg, judge, work: suite_embeddings(cfg, judge, work, "distance"),
    "singleinsert": suite_singleinsert,
    "distribution": suite_distribution,
    "dis2booth-scan": suite_dis2booth_scan,
}
# Which paper's family a suite's claims belong to: Holm's correction runs over the claims of one paper.
PAPER_OF_SUITE = {"embeddings": "BaTex", "init-word": "BaTex", "basis-size": "BaTex", "distance": "BaTex",
                  "singleinsert": "SingleInsert", "distribution": "Dis²Booth", "dis2booth-scan": "Dis²Booth"}
CLAIMS = [  # (suite, metric, A, B, higher is better): each paper's "A beats B", tested over concepts (stats.py)
    ("embeddings", "text_alignment", "batex", "textual-inversion", True),
    ("embeddings", "image_alignment", "batex", "textual-inversion", True),
    ("embeddings", "edit_keeps_concept", "batex", "textual-inversion", True),
    ("init-word", "image_alignment", "batex", "textual-inversion", True),
    # Table 4 (d = 768): image alignment rises from M = 96 = d/8 (0.59) to M = 576 = 3d/4 (0.66); here d = 128
    ("basis-size", "image_alignment", "batex M=96", "batex M=16", True),
    # Figure 7: dot and cosine beat L2 on text alignment; dot slightly beats cosine
    ("distance", "text_alignment", "batex dot", "batex l2", True),
    ("distance", "text_alignment", "batex cosine", "batex l2", True),
    ("distance", "text_alignment", "batex dot", "batex cosine", True),
    # SingleInsert Table 2 (Stage II; CLIP-I-b = leakage): each loss lowers leakage (baseline 0.981, + L_fg 0.768,
    # + L_bg 0.591, + L_sm 0.465) and L_sm restores editing (CLIP-T 0.251 -> 0.316); Table 1: Stage II edits slightly
    # less than Stage I (CLIP-T 0.311 vs 0.317) and its ESR beats TI+DB's (0.825 vs 0.480)
    ("singleinsert", "background_leakage", "singleinsert: +L_fg", "singleinsert: baseline", False),
    ("singleinsert", "background_leakage", "singleinsert: +L_fg +L_bg", "singleinsert: +L_fg", False),
    ("singleinsert", "background_leakage", "singleinsert: full (+L_sm)", "singleinsert: +L_fg +L_bg", False),
    ("singleinsert", "text_alignment", "singleinsert: full (+L_sm)", "singleinsert: +L_fg +L_bg", True),
    ("singleinsert", "background_leakage", "singleinsert: full (+L_sm)", "singleinsert: baseline", False),
    ("singleinsert", "text_alignment", "singleinsert: full (+L_sm)", "singleinsert: stage I only", False),
    ("singleinsert", "edit_keeps_concept", "singleinsert: full (+L_sm)", "textual-inversion + LoRA (1 image)", True),
    ("singleinsert", "clean_foreground", "singleinsert: full (+L_sm)", "textual-inversion (1 image)", True),
    # Table 3: the ViT-B/32 encoder edges the CNN (CLIP-I-f 0.857 vs 0.839, ESR 0.845 vs 0.820; pretrained there,
    # both from scratch here)
    ("singleinsert", "foreground_alignment", "singleinsert: full, ViT encoder (from scratch)", "singleinsert: full (+L_sm)", True),
    ("singleinsert", "esr", "singleinsert: full, ViT encoder (from scratch)", "singleinsert: full (+L_sm)", True),
    # Dis²Booth Table 1: FID below DreamBooth-LoRA's and TI's at LPIPS as high; its ablations are the paper's design
    # arguments (no table): each feature loss helps, synchronous training is unstable
    ("distribution", "frechet", "dis2booth", "dreambooth-lora", False),
    ("distribution", "diversity", "dis2booth", "dreambooth-lora", True),
    ("distribution", "frechet", "dis2booth", EQUAL_UPDATES, False),
    ("distribution", "frechet", "dis2booth", "textual-inversion", False),
    ("distribution", "frechet", "dis2booth", "dis2booth: no contextual loss", False),
    ("distribution", "frechet", "dis2booth", "dis2booth: no delta loss", False),
    ("distribution", "frechet", "dis2booth", "dis2booth: synchronous", False),
    # eq. 14's weights: the paper fixes λ = 1e-5, γ = 1e-6 and scans nothing; does any larger cell of the scan do
    # better on closeness to the category (Fréchet) or on diversity?
    *(("dis2booth-scan", metric, scan_label(*SCAN[0]), scan_label(*cell), higher)
      for cell in SCAN[1:] for metric, higher in (("frechet", False), ("diversity", True))),
]

__all__ = ["SUITES", "BenchConfig", "bench", "concept_traits", "preview_curve", "render_set", "select_runs",
           "steps_to_converge", "subject_of", "summarise"]


def bench(cfg: BenchConfig) -> list[Path]:
    from ..judge import ToyJudge

    if not cfg.output:
        raise PersonalizeError("--output is required: the folder for bench.json, bench.md and grids/")
    unknown = set(cfg.suite) - set(SUITES)
    if unknown:
        raise PersonalizeError(f"unknown --suite {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}")
    judge = ToyJudge.load()
    output = Path(cfg.output)
    work = output / "runs"
    rows: list[dict] = merged_rows(cfg)
    measured: set[str] = set()  # the row labels this bench measured (not merged), against --methods
    extra: dict = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for suite in cfg.suite:
        suite_started = time.monotonic()
        result = SUITES[suite](cfg, judge, work / suite)
        if suite == "lr-sweep":
            result, extra["chosen_rates"] = result
        rows = _unique(rows + result)
        measured |= {row["method"] for row in result}
        extra.setdefault("suite_minutes", {})[suite] = round((time.monotonic() - suite_started) / 60, 1)
        _write(output, cfg, rows, started, extra)  # after every suite: a long bench that dies keeps what it measured
    if not cfg.keep_runs:
        shutil.rmtree(work, ignore_errors=True)
    written = _write(output, cfg, rows, started, extra)
    unknown = [label for label in cfg.methods if label not in measured]
    if unknown:  # a mistyped label would otherwise end "successfully" with no row of it
        raise PersonalizeError(f"--methods {', '.join(map(repr, unknown))}: no row of --suite {' '.join(cfg.suite)} has this label "
                               f"(the log above lists each suite's rows); {written[0]} holds the rows that were measured")
    return written


# What must agree for two benches' rows to share a table: the model, how it is sampled and how long runs train.
MERGE_MUST_MATCH = ("model", "samples", "edit_samples", "inference_steps", "guidance", "steps")


def merged_rows(cfg: BenchConfig) -> list[dict]:
    """The rows of --merge's bench.json files, refusing a file measured on another model, sampling or rates."""
    rows: list[dict] = []
    for name in cfg.merge:
        path = Path(name)
        try:
            earlier = json.loads(path.read_text())
            earlier_cfg = BenchConfig(**{k: v for k, v in earlier["config"].items() if k in BenchConfig.__dataclass_fields__})
            earlier_rows = earlier["rows"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PersonalizeError(f"--merge {path}: not a bench.json this version can read ({error})") from error
        differ = [k for k in MERGE_MUST_MATCH if getattr(earlier_cfg, k) != getattr(cfg, k)]
        differ += [f"rate of {m}" for m in BENCH_LR if method_rate(earlier_cfg, m) != method_rate(cfg, m)]
        if differ:
            raise PersonalizeError(f"--merge {path}: measured with other settings ({', '.join(differ)}); its rows would not compare")
        rows += earlier_rows
    return _unique(rows)


def _unique(rows: list[dict]) -> list[dict]:
    """One row per (suite, method, concept, seed, lr): the first measured (an untrained row every bench repeats, e.g.).
    The rate is part of the key: the lr-sweep's rows differ by it alone."""
    seen, out = set(), []
    for row in rows:
        key = (row["suite"], row["method"], row["concept"], row["seed"], row.get("lr"))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def verdicts(rows: list[dict], claims: list[tuple] | None = None) -> list[dict]:
    """Each claim whose two rows share a concept, decided by `stats` (concept means, two-sided sign test, Holm over
    the claims of one paper the rows can test, bootstrap interval); a metric on which every run of both rows reads
    the same value (1.00, say) is reported as not separating them, whatever other rows read."""
    measured = []
    for suite, metric, a, b, higher in CLAIMS if claims is None else claims:
        result = stats.compare(rows, metric, a, b, higher, suite)
        if result["concepts"]:
            measured.append({"suite": suite, **result})
    out = stats.decide(measured, lambda c: PAPER_OF_SUITE.get(c["suite"], c["suite"]))
    for result in out:
        if saturated([r for r in rows if r["method"] in (result["a"], result["b"])], result["metric"], result["suite"]):
            result["verdict"] = "does not separate the rows (saturated)"  # e.g. both obey every edit
    return out


def format_claim(c: dict) -> list[str]:
    """A verdict's cells: concepts (runs), wins-losses-ties over concepts, mean difference [95 % interval], p, p
    after Holm, verdict. The difference is signed so that > 0 favours the claim's A."""
    low, high = c["interval"]
    return [f"{c['concepts']} ({c['runs_a']}+{c['runs_b']})", f"{c['wins']}-{c['losses']}-{c['ties']}",
            f"{c['mean_difference']:+.3g} [{low:+.3g}, {high:+.3g}]", f"{c['p']:.2g}", f"{c['p_holm']:.2g}", c["verdict"]]


CLAIM_HEADER = ["claim", "concepts (runs A+B)", "wins-losses-ties (concepts)", "mean difference [95 % CI]", "p",
                "p (Holm)", "verdict"]


def _write(output: Path, cfg: BenchConfig, rows: list[dict], started: str, extra: dict) -> list[Path]:
    claims = verdicts(rows)
    payload = {"started": started, "config": asdict(cfg), "rows": rows, "verdicts": claims, **extra}
    json_file = atomic_write(output / "bench.json", lambda t: t.write_text(json.dumps(payload, indent=1, default=str)))
    md = f"# personalize bench ({started})\n\nsettings: {json.dumps(asdict(cfg))}\n" + summarise(rows)
    if claims:
        md += ("\n### claims (each concept's runs averaged; exact two-sided sign test over concepts; Holm within a paper;"
               " held / reversed at p (Holm) < 0.05)\n\n| " + " | ".join(CLAIM_HEADER) + " |\n" + "|---" * len(CLAIM_HEADER) + "|\n")
        md += "".join("| " + " | ".join([c["claim"], *format_claim(c)]) + " |\n" for c in claims)
    if extra.get("chosen_rates"):
        md += f"\nchosen learning rates: {json.dumps(extra['chosen_rates'])}\n"
    md_file = atomic_write(output / "bench.md", lambda t: t.write_text(md))
    files = [json_file, md_file]
    if any(r["suite"] == "embeddings" and "curve" in r for r in rows):
        files.append(plot_alignment_curves(rows, output / "embeddings-curves.png"))
    return files


def plot_alignment_curves(rows: list[dict], path: Path) -> Path:
    """BaTex's claim as curves: image and text alignment along training, TI and BaTex, mean ± one std over runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    for method, colour in (("textual-inversion", "tab:blue"), ("batex", "tab:orange")):
        runs = [r["curve"] for r in rows if r["suite"] == "embeddings" and r["method"] == method and "curve" in r]
        if not runs:
            continue
        steps = sorted(int(s) for s in runs[0])
        for ax, key in zip(axes[:2], ("image_alignment", "text_alignment")):
            values = np.array([[run[str(s)][key] for s in steps] for run in runs])
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, color=colour, label=f"{method} (N={len(runs)})")
            ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.2)
            ax.set_xlabel("training step")
            ax.set_ylabel(key.replace("_", " "))
        image = np.array([[run[str(s)]["image_alignment"] for s in steps] for run in runs]).mean(0)
        text = np.array([[run[str(s)]["text_alignment"] for s in steps] for run in runs]).mean(0)
        axes[2].plot(text, image, "o-", color=colour, label=method)
        for s, x, y in zip(steps, text, image):
            axes[2].annotate(str(s), (x, y), fontsize=7)
    axes[2].set_xlabel("text alignment")
    axes[2].set_ylabel("image alignment")
    axes[2].set_title("the trade-off along training (labels: steps)")
    for ax in axes:
        ax.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return path
