"""The results tables of benchmarks/README.md, generated from the committed raw rows (benchmarks/results/).

    python benchmarks/tables.py            # rewrite every generated region of benchmarks/README.md and README.md
    python benchmarks/tables.py --check    # exit 1 and name the regions that differ (tests/test_bench_tables.py)

A generated region sits between `<!-- begin generated: NAME -->` and `<!-- end generated: NAME -->`; everything
outside the regions is prose and is left alone. Two kinds of table:

- rows: mean ± std over runs of each row (its concepts, its runs, where and when it ran);
- claims: each claim decided by `personalize.toyworld.bench.stats` (each concept's runs averaged, exact two-sided
  sign test over concepts, Holm over every claim of the same paper in these tables, 95 % bootstrap interval of the
  mean concept difference) — the same module `personalize bench` writes its verdicts with.

Rows of different days or devices are never paired: every row is tagged with the day (the results folder, or an
override below for rows a file copied from another day) and the device it ran on, and a claim whose runs span more
than one is shown as "not paired" with no verdict (and is no member of its paper's family).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from personalize.toyworld.bench import stats  # noqa: E402
from personalize.toyworld.bench.common import saturated  # noqa: E402

README = HERE / "README.md"
PROJECT_README = HERE.parent / "README.md"  # its "against the alternatives" table is generated too
RESULTS = HERE / "results"
PEERS_12 = "peers-12-2026-12-08"  # the pairs whose 3-concept means left a lead open, on the bench's 12 concepts
# Rows a file holds that were measured on another day (its "note" says so).
DAY_OF_ROWS = {("toy-2026-12-06/distribution-equal-updates.json", "dis2booth"): "2026-12-05",
               ("toy-2026-12-06/distribution-equal-updates.json", "dis2booth: synchronous"): "2026-12-05"}
PAPER_OF_SUITE = {"embeddings": "BaTex", "init-word": "BaTex", "basis-size": "BaTex", "distance": "BaTex",
                  "singleinsert": "SingleInsert", "singleinsert-composition": "SingleInsert",
                  "distribution": "Dis²Booth", "dis2booth-scan": "Dis²Booth"}
COLUMN = {"image_alignment": "image alignment", "text_alignment": "text alignment", "edit_keeps_concept": "edit keeps concept",
          "feature_similarity": "judge-feature similarity", "foreground_alignment": "foreground alignment",
          "background_leakage": "background leakage ↓", "clean_foreground": "clean foreground", "diversity": "diversity ↑",
          "esr": "toy ESR", "frechet": "judge-feature Fréchet ↓", "keeps_trait": "keeps the common trait",
          "updates": "updates", "train_seconds": "train s (median)", "both_drawn": "both concepts drawn",
          "two_objects": "two objects drawn"}


@dataclass
class Claim:
    text: str  # what the README calls it
    paper: str  # what the paper reports (a citation, not a measurement)
    metric: str
    a: str
    b: str
    higher_is_better: bool = True


@dataclass
class Table:
    name: str  # the README region
    files: list[str]  # under benchmarks/results/
    suite: str
    rows: list[str] = field(default_factory=list)  # the rows table's methods, in order (empty: no rows table)
    columns: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)  # (empty: no claims table)
    only: dict = field(default_factory=dict)  # only the rows with these values (e.g. {"held_out": True})
    # A row of this table that is another suite's row run once: {label: (suite, method)}, for a configuration two
    # suites share (BaTex's defaults are the basis-size suite's M = 3d/4 and the distance suite's dot product)
    same_as: dict = field(default_factory=dict)


SI_COLUMNS = ["foreground_alignment", "background_leakage", "clean_foreground", "text_alignment", "edit_keeps_concept",
              "diversity", "esr", "train_seconds"]
D2B_COLUMNS = ["frechet", "diversity", "keeps_trait", "updates", "train_seconds"]
EMB12 = "toy-2026-12-07/embeddings-12.json"
BATEX_COLUMNS = ["image_alignment", "text_alignment", "edit_keeps_concept", "feature_similarity", "train_seconds"]
EQ = "dreambooth-lora: as many updates as dis2booth"
SCAN_PAPER, SCAN_CELLS = "dis2booth λ=1e-05 γ=1e-06", ["dis2booth λ=0.001 γ=0.0001", "dis2booth λ=0.1 γ=0.01", "dis2booth λ=1 γ=1"]
SI_FULL, TI1, TIL = "singleinsert: full (+L_sm)", "textual-inversion (1 image)", "textual-inversion + LoRA (1 image)"
SI_STAGE_ONE, SI_VIT = "singleinsert: stage I only", "singleinsert: full, ViT encoder (from scratch)"

BATEX_CLAIMS = [  # Tables 2 and 5 of the BaTex paper, as the embeddings suite's rows read them
    Claim("better text alignment than TI", "Tables 2 / 5: CLIP-T 0.76 vs 0.70, 0.75 vs 0.66", "text_alignment", "batex", "textual-inversion"),
    Claim("… at equal or better image alignment", "Tables 2 / 5: 0.74 vs 0.74, 0.76 vs 0.76", "image_alignment", "batex", "textual-inversion"),
    Claim("edits keep the concept", "(Table 5's editing prompts)", "edit_keeps_concept", "batex", "textual-inversion")]
INIT_WORD_CLAIMS = [Claim("BaTex beats TI with a less related init word", "Tables 6 / 7: BaTex image 0.88 → 0.88; TI 0.89 → 0.86",
                          "image_alignment", "batex", "textual-inversion")]
INIT_WORD_COLUMNS = ["image_alignment", "text_alignment", "edit_keeps_concept", "train_seconds"]
BASIS_ROWS = ["batex M=16", "batex M=96", "batex M=512"]  # d/8, 3d/4 (the default), 4d at the toy model's d = 128
BASIS_CLAIMS = [  # Table 4
    Claim("image alignment rises from M = d/8 to 3d/4", "Table 4: 0.59 (M = 96) → 0.66 (M = 576)", "image_alignment", "batex M=96", "batex M=16"),
    Claim("… and gains nothing beyond 3d/4 (3d/4 ahead of 4d)", "0.66 at M = 672", "image_alignment", "batex M=96", "batex M=512"),
    Claim("text alignment slightly higher at M = 3d/4 than d/8", "Table 4: 0.77 → 0.80", "text_alignment", "batex M=96", "batex M=16")]
DISTANCE_ROWS = ["batex dot", "batex cosine", "batex l2"]  # dot is the default
DISTANCE_CLAIMS = [  # Figure 7
    Claim("dot beats L2 on text alignment", "Figure 7: dot above L2", "text_alignment", "batex dot", "batex l2"),
    Claim("cosine beats L2 on text alignment", "Figure 7: cosine above L2", "text_alignment", "batex cosine", "batex l2"),
    Claim("dot slightly beats cosine", "\"slightly better\"", "text_alignment", "batex dot", "batex cosine")]
# BaTex's defaults (M = 3d/4, the dot product) are the embeddings suite's "batex" run, read once on 12 concepts (a rerun
# of one of its runs as "batex M=96" on 2026-12-07 gave every figure of it bit for bit)
BATEX_DEFAULT = ("embeddings", "batex")
# issue 26: the paper's "fewer training steps" as a paired claim, on the 12 bench concepts × 2 seeds: both methods
# trained 100 steps (`--steps 100`: at a constant rate the weights of a 300-step run's step 100), one day
E100 = "toy-2026-12-08/embeddings-100-steps-12.json"
CONVERGENCE_CLAIM = Claim("converges faster: ahead of TI on image alignment at step 100 of 300",
                          "§1 / Figure 1: \"requires fewer training steps\"", "image_alignment", "batex", "textual-inversion")
SCAN_COLUMNS = ["frechet", "diversity", "keeps_trait", "train_seconds"]
SCAN_CLAIMS = [Claim(f"the paper's weights beat {cell.split(' ', 1)[1]} ({COLUMN[m]})", "the paper scans nothing", m, SCAN_PAPER, cell, m != "frechet")
               for cell in SCAN_CELLS for m in ("frechet", "diversity")]

STAGE_ONE_CLAIM = Claim("Stage II edits slightly less than Stage I", "Table 1: CLIP-T 0.311 vs 0.317", "text_alignment", SI_FULL,
                        SI_STAGE_ONE, False)
SI_CLAIMS = [  # Tables 1 and 2 of the SingleInsert paper, as the 2.1 rows read them
    Claim("L_fg lowers background leakage", "Table 2, Stage II: CLIP-I-b 0.981 → 0.768", "background_leakage", "singleinsert: +L_fg", "singleinsert: baseline", False),
    Claim("L_bg lowers it further", "CLIP-I-b 0.768 → 0.591", "background_leakage", "singleinsert: +L_fg +L_bg", "singleinsert: +L_fg", False),
    Claim("L_sm lowers it further", "CLIP-I-b 0.591 → 0.465", "background_leakage", SI_FULL, "singleinsert: +L_fg +L_bg", False),
    Claim("L_sm restores editing", "CLIP-T 0.251 → 0.316, ESR 0.655 → 0.810", "text_alignment", SI_FULL, "singleinsert: +L_fg +L_bg"),
    Claim("the full method leaks less than plain reconstruction", "CLIP-I-b 0.981 → 0.465", "background_leakage", SI_FULL, "singleinsert: baseline", False),
    STAGE_ONE_CLAIM,
    Claim("edits keep the concept better than TI+DB", "Table 1: ESR 0.825 vs 0.480", "edit_keeps_concept", SI_FULL, TIL),
    Claim("a cleaner foreground than TI", "Table 1: CLIP-I-f 0.857 vs 0.758", "clean_foreground", SI_FULL, TI1)]
SI12 = "toy-2026-12-07/singleinsert-12.json"
SI12_ROWS = [TI1, TIL, "singleinsert: baseline", "singleinsert: +L_fg", "singleinsert: +L_fg +L_bg", SI_FULL]
SI12_COLUMNS = [c for c in SI_COLUMNS if c != "esr"]
# The same claims without the Stage-I row's (not run), and L_sm's editing also on the column that does not saturate.
SI12_CLAIMS = [c for c in SI_CLAIMS if c is not STAGE_ONE_CLAIM]
SI12_CLAIMS.insert(4, Claim("(ours) … and edits that keep the concept", "(the column text alignment saturates here)",
                            "edit_keeps_concept", SI_FULL, "singleinsert: +L_fg +L_bg"))
VIT_CLAIMS = [  # Table 3 (a pretrained ViT-B/32 against a pretrained CNN; here both from scratch, see the suite's docstring)
    Claim("the ViT encoder edges the CNN on foreground fidelity", "Table 3: CLIP-I-f 0.857 vs 0.839 (pretrained)",
          "foreground_alignment", SI_VIT, SI_FULL),
    Claim("… and on editability", "Table 3: ESR 0.845 vs 0.820", "esr", SI_VIT, SI_FULL)]
COMPOSITION_CLAIMS = [
    Claim("two concepts trained apart compose better than with TI+LoRA", "\"beyond BreakAScene\" (no table)", "both_drawn", SI_FULL, TIL),
    Claim("… and better than with TI", "(no table)", "both_drawn", SI_FULL, TI1)]
# issue 26: Stage I, the encoders and the compositions on the 12 bench concepts × 2 seeds, one day, with ESR; the
# full method, TI and TI+LoRA ran again beside them (one process per seed: a composition needs both concepts' runs)
SI12_MORE = "toy-2026-12-08/singleinsert-stage-encoder-compositions-12.json"
SI_OFFICIAL_REFERENCE = "singleinsert: official semantic reference"
OFFICIAL_REFERENCE_CLAIM = Claim("(ours) the official semantic reference differs from the paper's", "—", "edit_keeps_concept",
                                 SI_OFFICIAL_REFERENCE, SI_FULL)
D2B_CLAIMS = [  # Table 1 of the Dis²Booth paper, as the distribution suite's rows read it
    Claim("closer to the category than DreamBooth-LoRA", "Table 1: FID 27.63 vs 32.50, 58.15 vs 112.27", "frechet", "dis2booth", "dreambooth-lora", False),
    Claim("more diverse than DreamBooth-LoRA", "LPIPS 0.5356 vs 0.5276, 0.5189 vs 0.5022", "diversity", "dis2booth", "dreambooth-lora"),
    Claim("closer to the category than Textual Inversion", "FID 27.63 vs 55.48, 58.15 vs 94.91", "frechet", "dis2booth", "textual-inversion", False),
    Claim("(not a paper claim) keeps the shared trait more than DreamBooth-LoRA", "—", "keeps_trait", "dis2booth", "dreambooth-lora")]
D2B_ABLATION_CLAIMS = [  # the paper's three ablations (§3; it gives no ablation table)
    Claim("ℓ_con helps (Fréchet)", "no ablation table (§3)", "frechet", "dis2booth", "dis2booth: no contextual loss", False),
    Claim("ℓ_delta helps (Fréchet)", "no ablation table", "frechet", "dis2booth", "dis2booth: no delta loss", False),
    Claim("asynchronous beats synchronous training (Fréchet)", "§3: synchronous \"can lead to … collapse\"", "frechet", "dis2booth", "dis2booth: synchronous", False)]
D2B_FOLDED_CLAIMS = [  # ours: the paper's Algorithm 1 against folding its Delta sub-steps into one
    Claim("(ours) Algorithm 1's schedule beats the folded one (Fréchet)", "—", "frechet", "dis2booth", "dis2booth: folded schedule", False),
    Claim("(ours) … on the shared trait", "—", "keeps_trait", "dis2booth", "dis2booth: folded schedule")]
# Dis²Booth makes 1,000 optimizer updates in 120 iterations where DreamBooth-LoRA makes 120: the comparisons at equal cost
AT_EQUAL_UPDATES = ("Dis²Booth beats DreamBooth-LoRA, 1,000 updates each", "not in the paper", "dis2booth", EQ)
MORE_UPDATES = ("DreamBooth-LoRA: 1,000 beats 120 updates", "not in the paper", EQ, "dreambooth-lora")
SYNCHRONOUS_VS_DB = ("synchronous Dis²Booth beats DreamBooth-LoRA, 120 updates each", "not in the paper",
                     "dis2booth: synchronous", "dreambooth-lora")


def on_three_columns(comparisons: list[tuple]) -> list[Claim]:
    """Each (text, paper, A, B) on the distribution suite's three quality columns (Fréchet lower is better)."""
    return [Claim(f"{text} ({COLUMN[m]})", paper, m, a, b, m != "frechet")
            for text, paper, a, b in comparisons for m in ("frechet", "diversity", "keeps_trait")]


D2B6, D2B6_ABLATIONS, D2B6_MORE = ("toy-2026-12-07/distribution-6.json", "toy-2026-12-07/distribution-6-ablations.json",
                                   "toy-2026-12-07/distribution-6-equal-updates-folded.json")

TABLES = [
    Table("batex-2.1", ["toy-2026-11-27/embeddings.json"], "embeddings",
          ["base: full description", "base: init word only", "textual-inversion", "batex"], BATEX_COLUMNS, BATEX_CLAIMS),
    # issue 26: the same claims on the 12 bench concepts (world.BENCH_CONCEPTS), then the rows of each group
    Table("batex-12-concepts", [EMB12], "embeddings", ["textual-inversion", "batex"], BATEX_COLUMNS, BATEX_CLAIMS),
    Table("batex-12-held-out", [EMB12], "embeddings", ["textual-inversion", "batex"], BATEX_COLUMNS,
          only={"held_out": True}),
    Table("batex-12-nameable", [EMB12], "embeddings", ["textual-inversion", "batex"], BATEX_COLUMNS,
          only={"held_out": False}),
    Table("batex-init-word-2.1", ["toy-2026-11-27/init-word.json"], "init-word",
          ["textual-inversion", "batex"], INIT_WORD_COLUMNS, INIT_WORD_CLAIMS),
    Table("batex-basis-size-2.1", ["toy-2026-12-05/basis-size.json"], "basis-size",
          BASIS_ROWS, BATEX_COLUMNS, BASIS_CLAIMS),
    Table("batex-distance-2.1", ["toy-2026-12-05/distance.json"], "distance",
          DISTANCE_ROWS, BATEX_COLUMNS, DISTANCE_CLAIMS),
    # issue 26: init word, basis size and distance on the 12 bench concepts × 2 seeds
    Table("batex-init-word-12-concepts", ["toy-2026-12-07/init-word-12.json"], "init-word", ["textual-inversion", "batex"],
          INIT_WORD_COLUMNS, INIT_WORD_CLAIMS),
    Table("batex-basis-size-12-concepts", ["toy-2026-12-07/basis-size-12.json", EMB12], "basis-size", BASIS_ROWS, BATEX_COLUMNS,
          BASIS_CLAIMS, same_as={"batex M=96": BATEX_DEFAULT}),
    Table("batex-distance-12-concepts", ["toy-2026-12-07/distance-12.json", EMB12], "distance", DISTANCE_ROWS, BATEX_COLUMNS,
          DISTANCE_CLAIMS, same_as={"batex dot": BATEX_DEFAULT}),
    Table("batex-100-steps-12-concepts", [E100], "embeddings", ["textual-inversion", "batex"], BATEX_COLUMNS, [CONVERGENCE_CLAIM]),
    Table("singleinsert-2.1", ["toy-2026-11-27/singleinsert.json"], "singleinsert",
          [TI1, TIL, "singleinsert: baseline", "singleinsert: +L_fg", "singleinsert: +L_fg +L_bg", SI_FULL, SI_STAGE_ONE],
          SI_COLUMNS, SI_CLAIMS),
    # issue 26: the loss ablation and Table 1's comparisons on the 12 bench concepts, at the predicted vector's new
    # default norm (5 × the vocabulary's mean; the 2.1 rows above ran at 1 ×); no Stage-I row (its claim reads text
    # alignment, 1.00 in every SingleInsert run) and no ESR (--no-esr)
    Table("singleinsert-12-concepts", [SI12], "singleinsert", SI12_ROWS, SI12_COLUMNS, SI12_CLAIMS),
    Table("singleinsert-12-held-out", [SI12], "singleinsert", SI12_ROWS, SI12_COLUMNS, only={"held_out": True}),
    Table("singleinsert-12-nameable", [SI12], "singleinsert", SI12_ROWS, SI12_COLUMNS, only={"held_out": False}),
    # issue 26: the official code's L_sm reference on the 12 bench concepts × 2 seeds, against the full method's rows above
    Table("singleinsert-reference-12-concepts", ["toy-2026-12-07/singleinsert-reference-12.json", SI12], "singleinsert",
          [SI_FULL, SI_OFFICIAL_REFERENCE], SI12_COLUMNS, [OFFICIAL_REFERENCE_CLAIM]),
    Table("singleinsert-encoder-reference-2.1", ["toy-2026-12-06/singleinsert-encoder-reference-compositions.json"], "singleinsert",
          [SI_FULL, SI_VIT, SI_OFFICIAL_REFERENCE, TIL],
          SI_COLUMNS[:2] + ["clean_foreground", "edit_keeps_concept", "diversity", "esr", "feature_similarity", "train_seconds"], [
              *VIT_CLAIMS, OFFICIAL_REFERENCE_CLAIM]),
    Table("singleinsert-compositions-2.1", ["toy-2026-12-06/singleinsert-encoder-reference-compositions.json", "toy-2026-11-27/singleinsert.json"],
          "singleinsert-composition", [SI_FULL, TIL, TI1], ["both_drawn", "two_objects"], COMPOSITION_CLAIMS),
    Table("singleinsert-stage-encoder-12-concepts", [SI12_MORE], "singleinsert", [TI1, TIL, SI_FULL, SI_STAGE_ONE, SI_VIT], SI_COLUMNS,
          [STAGE_ONE_CLAIM, Claim("(ours) … on edits that keep the concept", "(the column text alignment saturates here)",
                                  "edit_keeps_concept", SI_FULL, SI_STAGE_ONE, False), *VIT_CLAIMS]),
    Table("singleinsert-compositions-12-concepts", [SI12_MORE], "singleinsert-composition", [SI_FULL, TIL, TI1],
          ["both_drawn", "two_objects"], COMPOSITION_CLAIMS),
    Table("dis2booth-2.1", ["toy-2026-11-27/distribution.json"], "distribution",
          ["base: class word", "real renders (the floor)", "textual-inversion", "dreambooth-lora", EQ, "dis2booth"], D2B_COLUMNS, D2B_CLAIMS),
    # issue 26: Table 1's comparisons on the 6 categories of world.CATEGORIES (the 3 above and 3 more) × 2 seeds
    Table("dis2booth-6-categories", [D2B6], "distribution",
          ["base: class word", "real renders (the floor)", "textual-inversion", "dreambooth-lora", "dis2booth"], D2B_COLUMNS, D2B_CLAIMS),
    Table("dis2booth-ablations-6-categories", [D2B6, D2B6_ABLATIONS], "distribution",
          ["dis2booth", "dis2booth: no contextual loss", "dis2booth: no delta loss", "dis2booth: synchronous", "dreambooth-lora"],
          D2B_COLUMNS, D2B_ABLATION_CLAIMS + on_three_columns([SYNCHRONOUS_VS_DB])),
    Table("dis2booth-ablations-2.1", ["toy-2026-12-05/distribution-ablations.json"], "distribution",
          ["dis2booth", "base: class word", "real renders (the floor)", "dis2booth: no contextual loss", "dis2booth: no delta loss",
           "dis2booth: synchronous", "dis2booth: folded schedule"], D2B_COLUMNS, [
              *D2B_ABLATION_CLAIMS, *D2B_FOLDED_CLAIMS]),
    Table("dis2booth-scan-2.1", ["toy-2026-12-05/dis2booth-scan.json"], "dis2booth-scan",
          [SCAN_PAPER, *SCAN_CELLS], SCAN_COLUMNS, SCAN_CLAIMS),
    Table("dis2booth-equal-updates-2.1", ["toy-2026-12-06/distribution-equal-updates.json"], "distribution",
          ["dis2booth", "dis2booth: synchronous", "dreambooth-lora", EQ, "base: class word", "real renders (the floor)"], D2B_COLUMNS,
          on_three_columns([("Dis²Booth beats DreamBooth-LoRA, 120 updates", "Table 1's comparison", "dis2booth", "dreambooth-lora"),
                            AT_EQUAL_UPDATES, MORE_UPDATES, SYNCHRONOUS_VS_DB])),
    # issue 26: the scan on the 6 categories × 2 seeds; the paper's cell is the distribution suite's Dis²Booth run
    Table("dis2booth-scan-6-categories", ["toy-2026-12-07/dis2booth-scan-6.json", D2B6], "dis2booth-scan", [SCAN_PAPER, *SCAN_CELLS],
          SCAN_COLUMNS, SCAN_CLAIMS, same_as={SCAN_PAPER: ("distribution", "dis2booth")}),
    # issue 26: the equal-updates comparisons and our folded schedule on the 6 categories × 2 seeds
    Table("dis2booth-equal-updates-6-categories", [D2B6, D2B6_MORE], "distribution",
          ["dis2booth", "dreambooth-lora", EQ, "dis2booth: folded schedule"], D2B_COLUMNS,
          on_three_columns([AT_EQUAL_UPDATES, MORE_UPDATES]) + D2B_FOLDED_CLAIMS),
]


# -- rows ---------------------------------------------------------------------------------------------------------


def _device(row: dict) -> str:
    device = row.get("device") or "CPU"  # files without the field all ran on this project's CPU machine
    return "H200" if device.startswith("H200") else "CPU" if device.startswith("CPU") else device.split(" ")[0]


def load_rows(name: str) -> list[dict]:
    """A raw-row file's rows, each tagged with `origin`: the day (the folder's date, or DAY_OF_ROWS) and device."""
    folder_day = re.search(r"\d{4}-\d{2}-\d{2}", name).group(0)
    rows = json.loads((RESULTS / name).read_text())["rows"]
    return [{**r, "origin": f"{DAY_OF_ROWS.get((name, r['method']), folder_day)} {_device(r)}"} for r in rows]


def _table_rows(table: Table) -> list[dict]:
    """The rows of the table's suite from its files; a method is taken from the first file that has it. A `same_as`
    row is the other suite's row under this table's label."""
    out, seen = [], set()
    alias = {source: label for label, source in table.same_as.items()}
    for name in table.files:
        rows = [{**r, "suite": table.suite, "method": alias[(r["suite"], r["method"])]} if (r["suite"], r["method"]) in alias else r
                for r in load_rows(name)]
        rows = [r for r in rows if r["suite"] == table.suite and all(r.get(k) == v for k, v in table.only.items())]
        fresh = {r["method"] for r in rows} - seen
        out += [r for r in rows if r["method"] in fresh]
        seen |= fresh
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(values: list[float], metric: str) -> str:
    if not values:
        return "—"
    if metric == "train_seconds":
        return f"{statistics.median(values):.0f}"
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    if metric == "updates" or (spread == 0 and float(mean).is_integer() and mean > 1):
        return f"{mean:.0f}"
    digits = 0 if abs(mean) >= 100 else 3
    return f"{mean:.{digits}f}" if spread == 0 else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def rows_table(table: Table, rows: list[dict]) -> str:
    head = ["row", "concepts", "runs", *(COLUMN[c] for c in table.columns), "ran (day, device)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method in table.rows:
        group = [r for r in rows if r["method"] == method]
        if not group:
            continue
        cells = [_cell([float(r[c]) for r in group if _number(r.get(c))], c) for c in table.columns]
        origins = ", ".join(sorted({r["origin"] for r in group}))
        lines.append(f"| {method} | {len({r['concept'] for r in group})} | {len(group)} | " + " | ".join(cells) + f" | {origins} |")
    return "\n".join(lines)


# -- claims -------------------------------------------------------------------------------------------------------


def _short(value: float | None, sign: str = "", scale: float | None = None) -> str:
    """Rates and similarities to 3 decimals, Fréchet distances (≥ 100, or on a scale ≥ 100) to whole numbers."""
    if value is None:
        return "—"
    value = round(value, 9) + 0.0  # no "-0.000" from float noise
    return f"{value:{sign}.0f}" if abs(value if scale is None else scale) >= 100 else f"{value:{sign}.3f}"


def _difference(c: dict) -> str:
    """The mean concept difference (> 0 favours A) and its bootstrap interval, on one scale."""
    low, high = c["interval"]
    scale = max(abs(c["mean_difference"]), abs(low), abs(high))
    return "{} [{}, {}]".format(*(_short(v, "+", scale) for v in (c["mean_difference"], low, high)))


def all_comparisons() -> dict[tuple[str, int], dict]:
    """Every claim of every table, decided together: Holm runs over the claims of one paper that can be paired."""
    measured, unpaired = [], {}
    for table in TABLES:
        rows = _table_rows(table)
        for i, claim in enumerate(table.claims):
            c = {**stats.compare(rows, claim.metric, claim.a, claim.b, claim.higher_is_better, table.suite),
                 "suite": table.suite, "key": (table.name, i)}
            origins = sorted({r["origin"] for r in rows if r["method"] in (claim.a, claim.b)})
            if len(origins) > 1:
                unpaired[c["key"]] = {**c, "verdict": f"not paired: rows of {' and '.join(origins)}", "p_holm": None}
            elif c["concepts"]:
                c["saturated"] = saturated([r for r in rows if r["method"] in (claim.a, claim.b)], claim.metric, table.suite)
                measured.append(c)
    decided = stats.decide(measured, lambda c: PAPER_OF_SUITE[c["suite"]])
    for c in decided:
        if c["saturated"]:
            c["verdict"] = "does not separate the rows (saturated)"
    return {**{c["key"]: c for c in decided}, **unpaired}


def claims_table(table: Table, decided: dict) -> str:
    head = ["claim", "paper", "ours: A vs B (concept means)", "concepts (runs A+B)", "wins-losses-ties (concepts)",
            "mean difference [95 % CI]", "p", "p (Holm)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for i, claim in enumerate(table.claims):
        c = decided.get((table.name, i))
        if c is None or not c["concepts"]:
            lines.append(f"| {claim.text} | {claim.paper} | no rows | — | — | — | — | — | — |")
            continue
        holm = "—" if c["p_holm"] is None else f"{c['p_holm']:.2g}"
        lines.append(f"| {claim.text} | {claim.paper} | {COLUMN[claim.metric]} {_short(c['mean_a'])} vs {_short(c['mean_b'])} | "
                     f"{c['concepts']} ({c['runs_a']}+{c['runs_b']}) | {c['wins']}-{c['losses']}-{c['ties']} | "
                     f"{_difference(c)} | {c['p']:.2g} | {holm} | **{c['verdict']}** |")
    return "\n".join(lines)


def at_a_glance(decided: dict) -> str:
    head = ["paper", "claim", "raw rows", "concepts", "mean difference [95 % CI]", "p (Holm)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for table in TABLES:
        for i, claim in enumerate(table.claims):
            c = decided.get((table.name, i))
            if c is None or not c["concepts"]:
                continue
            holm = "—" if c["p_holm"] is None else f"{c['p_holm']:.2g}"
            files = ", ".join(f"`{f.replace('.json', '')}`" for f in table.files)
            lines.append(f"| {PAPER_OF_SUITE[table.suite]} | {claim.text} | {files} | {c['concepts']} | "
                         f"{_difference(c)} | {holm} | {c['verdict']} |")
    return "\n".join(lines)


def regions() -> dict[str, str]:
    """Every generated region's text, by name."""
    import peers  # benchmarks/peers.py: its per-run table, from its own raw rows
    import rounding  # benchmarks/rounding.py and sensitivity.py: their tables, from their raw rows
    import sensitivity

    decided = all_comparisons()
    out = {"claims-at-a-glance-2.1": at_a_glance(decided),
           "peers-2026-12-07": peers.per_run_table(peers.read_rows(RESULTS / "peers-2026-12-07", "diffusers-ti")),
           "peers-dreambooth-lora-2026-12-07": peers.per_run_table(
               peers.read_rows(RESULTS / "peers-2026-12-07", "diffusers-dreambooth-lora")),
           "peers-batex-2026-12-07": peers.per_run_table(peers.read_rows(RESULTS / "peers-2026-12-07", "batex-official")),
           "peers-singleinsert-2026-12-07": peers.per_run_table(
               peers.read_rows(RESULTS / "peers-2026-12-07", "singleinsert-official")),
           "peers-base-2026-12-07": peers.base_table(peers.read_base(RESULTS / "peers-2026-12-07")),
           "peers-kohya-2026-12-07": "\n\n".join(peers.per_run_table(peers.read_rows(RESULTS / "peers-2026-12-07", pair))
                                                   for pair in ("kohya-ti", "kohya-lora")),
           "peers-verdicts-2026-12-07": peers.verdict_table(peers.read_rows(RESULTS / "peers-2026-12-07")),
           "peers-leads-2026-12-07": peers.means_table(peers.read_rows(RESULTS / "peers-2026-12-07"), ["kohya-lora", "batex-official"]),
           # kohya-lora's lead: the 2026-12-07 rows (ours, kohya's, its module coverage) and the 2026-12-08 hypotheses
           "peers-kohya-lora-leads-2026-12-08": peers.means_table(two_day_rows("kohya-lora"), ["kohya-lora"]),
           "peers-kohya-ti-leads-2026-12-08": peers.means_table(two_day_rows("kohya-ti"), ["kohya-ti"]),
           "peers-kohya-lora-2026-12-08": peers.per_run_table(two_day_rows("kohya-lora")),
           # the two pairs whose 3-concept means left a lead open, on the bench's 12 concepts (2 seeds)
           "peers-12-means-2026-12-08": peers.means_table(peers.read_rows(RESULTS / PEERS_12), ["batex-official", "kohya-lora"]),
           "peers-12-verdicts-2026-12-08": peers.verdict_table(peers.read_rows(RESULTS / PEERS_12)),
           "peers-12-batex-2026-12-08": peers.per_run_table(peers.read_rows(RESULTS / PEERS_12, "batex-official")),
           "peers-12-kohya-lora-2026-12-08": peers.per_run_table(peers.read_rows(RESULTS / PEERS_12, "kohya-lora")),
           "rounding-2026-12-07": rounding.tables(RESULTS / "rounding-2026-12-07"),
           "sensitivity-2026-12-07": sensitivity.table(RESULTS / "sensitivity-2026-12-07"),
           "peers-speed-2026-12-07": peers.speed_table(peers.read_speed(RESULTS / "peers-2026-12-07")),
           "against-the-alternatives": peers.alternatives_table([RESULTS / "peers-2026-12-07", RESULTS / PEERS_12],
                                                                "benchmarks/README.md#peers-peerspy")}
    for table in TABLES:
        rows = _table_rows(table)
        if table.rows:
            out[f"{table.name}-rows"] = rows_table(table, rows)
        if table.claims:
            out[f"{table.name}-claims"] = claims_table(table, decided)
    return out


def two_day_rows(pair: str) -> list[dict]:
    """A kohya pair's rows of 2026-12-07 (ours at the default and kohya's) with each hypothesis row of ours, of either
    day: a rerun of ours' first run of each pair on 2026-12-08 (`rerun-check.jsonl`) read every rate and norm the same."""
    import peers

    return [r for day in ("2026-12-07", "2026-12-08") for r in peers.read_rows(RESULTS / f"peers-{day}", pair)]


# -- the README ---------------------------------------------------------------------------------------------------

REGION = re.compile(r"(<!-- begin generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(\n<!-- end generated: (?P=name) -->)", re.S)


def rewrite(text: str, generated: dict[str, str]) -> tuple[str, list[str]]:
    """`text` with every generated region replaced; and the names of the regions whose text changed."""
    changed = []

    def replace(match):
        name = match.group("name")
        if name not in generated:
            raise SystemExit(f"region {name!r} is not one this script generates")
        if match.group("body") != generated[name]:
            changed.append(name)
        return match.group(1) + generated[name] + match.group(4)

    return REGION.sub(replace, text), changed


def missing_regions(text: str, generated: dict[str, str]) -> list[str]:
    found = {m.group("name") for m in REGION.finditer(text)}
    return sorted(set(generated) - found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a region differs from the raw rows")
    parser.add_argument("--readme", action="append", help="the files holding regions (default: benchmarks/README.md, README.md)")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.readme or (README, PROJECT_README)]
    generated = regions()
    texts = {path: rewrite(path.read_text(), generated) for path in paths}
    missing = missing_regions("".join(text for text, _ in texts.values()), generated)
    changed = [f"{path}: {name}" for path, (_, names) in texts.items() for name in names]
    if args.check:
        for name in changed:
            print(f"region {name} differs from what the raw rows give (run python benchmarks/tables.py)")
        for name in missing:
            print(f"region {name} is missing")
        return 1 if changed or missing else 0
    for path, (text, _) in texts.items():
        path.write_text(text)
    print(f"rewrote {len(changed)} region(s): {', '.join(changed) or 'none'}; missing: {', '.join(missing) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
