"""Sensitivity: how far a bench row moves under changes that should not matter, beside the effects the claims judge.

Issue 26: one Dis²Booth run moved its Fréchet distance from 1789 to 2361 when torch used two threads instead of one
(same seed, same code) — more than the effect being judged. This measures the same for every method: per suite, two
rows a claim compares (concept 0, seed 0, the suite's settings and the 2.1 sweep's rates), run as bench processes

- `1 thread`: both rows in one process, one torch thread (the bench's usual setting);
- `2 threads`: the same with two torch threads (the float additions of every matmul and convolution split
  differently: rounding alone);
- `alone`: the row that ran second, in a process of its own, one thread (run order / process state: must equal the
  `1 thread` row bit for bit if every run seeds all it draws).

The report sets the moves beside the spread between the committed rows' three seeds on the same concept and beside
the pair's difference (the effect a claim judges, over concepts) on that concept.

    python benchmarks/sensitivity.py --work /tmp/sensitivity            # runs (about an hour on 2 cores), then report
    python benchmarks/sensitivity.py --report                           # only the table, from the committed rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sensitivity-2026-12-07"
RATES = HERE / "results" / "toy-2026-11-27" / "lr-sweep.json"

# suite -> (the two rows a claim compares, A first: the claim says A beats B; metrics; committed rows with 3 seeds)
PLAN = {
    "embeddings": (("batex", "textual-inversion"), ("image_alignment", "text_alignment", "edit_keeps_concept",
                                                     "feature_similarity"),
                   "toy-2026-11-27/embeddings.json"),
    "singleinsert": (("singleinsert: full (+L_sm)", "textual-inversion + LoRA (1 image)"),
                     ("background_leakage", "text_alignment", "edit_keeps_concept", "feature_similarity"),
                     "toy-2026-11-27/singleinsert.json"),
    "distribution": (("dis2booth", "dreambooth-lora"), ("frechet", "diversity", "keeps_trait"),
                     "toy-2026-11-27/distribution.json"),
}
VARIANTS = ("1 thread", "2 threads", "alone")


def bench(suite: str, methods: list[str], threads: int, out: Path, finished_only: bool = False) -> list[dict]:
    """One bench process (concept 0, seed 0); its rows. A finished one is read, not run again (`finished_only`: an
    unfinished one gives no rows)."""
    result = out / "bench.json"
    if not result.is_file() and finished_only:
        return []
    if not result.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-c", "import sys; from personalize.cli import main; sys.exit(main(sys.argv[1:]))",
               "bench", "--suite", suite, "--concepts", "3", "--concept-index", "0", "--first-seed", "0", "--seeds", "1",
               "--no-curve", "--rates", str(RATES), "--output", str(out), "--methods", *methods]
        print(f"[{time.strftime('%H:%M:%S')}] {suite} {methods} threads={threads}", flush=True)
        with open(out.with_suffix(".log"), "w") as log:
            subprocess.run(cmd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    return [r for r in json.loads(result.read_text())["rows"] if r["suite"] == suite]


def run(work: Path, finished_only: bool = False) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for suite, (pair, _, _) in PLAN.items():
        one = bench(suite, list(pair), 1, work / f"{suite}-1thread", finished_only)
        if not one:
            continue
        two = bench(suite, list(pair), 2, work / f"{suite}-2threads", finished_only)
        second = [r["method"] for r in one if r["method"] in pair][-1]  # the row that ran after the other
        alone = bench(suite, [second], 1, work / f"{suite}-alone", finished_only)
        for variant, got in zip(VARIANTS, (one, two, alone)):
            rows += [{**r, "variant": variant, "curve": None} for r in got if r["method"] in pair]
    meta = {"date": time.strftime("%Y-%m-%d"), "device": "CPU (2-core AMD EPYC VM), other jobs beside",
            "command": "python benchmarks/sensitivity.py " + " ".join(sys.argv[1:])}
    tmp = RESULTS / "rows.json.tmp"
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    tmp.replace(RESULTS / "rows.json")


def seed_spread(suite: str, method: str, concept: str, metric: str) -> tuple[float, int] | None:
    """Population SD of the committed rows' seeds on this concept (and how many seeds)."""
    rows = json.loads((HERE / "results" / PLAN[suite][2]).read_text())["rows"]
    values = [r[metric] for r in rows if r["suite"] == suite and r["method"] == method and r["concept"] == concept
              and r.get(metric) is not None]
    return (statistics.pstdev(values), len(values)) if len(values) > 1 else None


def committed_effect(suite: str, concept: str, metric: str) -> float | None:
    """A − B on this concept in the committed rows (each row's seeds averaged): the difference a claim judges."""
    rows = json.loads((HERE / "results" / PLAN[suite][2]).read_text())["rows"]
    means = []
    for method in PLAN[suite][0]:
        values = [r[metric] for r in rows if r["suite"] == suite and r["method"] == method and r["concept"] == concept]
        if not values:
            return None
        means.append(statistics.mean(values))
    return means[0] - means[1]


def fmt(x: float | None, big: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if big else f"{x:.3f}"


def fmt_move(x: float | None, big: bool = False) -> str:
    """A move: exactly 0 (bit-identical readings) shows as 0; one below the table's precision in powers of ten."""
    if x is None or x == 0 or x >= (1 if big else 1e-3):
        return "—" if x is None else "0" if x == 0 else fmt(x, big)
    return f"{x:.0e}"


def table(folder: Path = RESULTS) -> str:
    """The sensitivity table (benchmarks/README.md's generated region), from the raw rows."""
    data = json.loads((folder / "rows.json").read_text())
    rows = data["rows"]
    value = {(r["suite"], r["method"], r["variant"]): r for r in rows}
    out = ["| suite: row | metric | 1 thread | 2 threads | moved by threads | alone | moved by run order | "
           "seed SD (committed, same concept) | A − B, 1 thread → 2 threads | A − B, committed (3 seeds) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for suite, (pair, metrics, _) in PLAN.items():
        for metric in metrics:
            big = metric == "frechet"
            diffs = {}
            for variant in ("1 thread", "2 threads"):
                a, b = (value.get((suite, m, variant)) for m in pair)
                diffs[variant] = a[metric] - b[metric] if a and b else None
            # the row that ran second is run alone too; if neither was (an unfinished collection), say so
            first = "(ran first)" if any((suite, m, "alone") in value for m in pair) else "not run"
            for i, method in enumerate(pair):
                one, two, alone = (value.get((suite, method, v)) for v in VARIANTS)
                if one is None:
                    continue
                concept = one["concept"]
                spread = seed_spread(suite, method, concept, metric)
                moved_threads = abs(two[metric] - one[metric]) if two else None  # a variant not run: —
                moved_order = abs(alone[metric] - one[metric]) if alone else None
                effect = committed_effect(suite, concept, metric) if i == 0 else None
                cells = [f"{suite}: {method} ({concept})", metric, fmt(one[metric], big), fmt(two and two[metric], big),
                         fmt_move(moved_threads, big), fmt(alone[metric], big) if alone else first,
                         fmt_move(moved_order, big) if alone else "—",
                         f"{fmt(spread[0], big)} ({spread[1]} seeds)" if spread else "—",
                         f"{fmt(diffs['1 thread'], big)} → {fmt(diffs['2 threads'], big)}" if i == 0 else "",
                         fmt(effect, big) if i == 0 else ""]
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/sensitivity", help="scratch folder for the bench processes")
    parser.add_argument("--report", action="store_true", help="only print the table from the committed rows")
    parser.add_argument("--finished-only", action="store_true",
                        help="run nothing: collect the bench processes already finished in --work (a suite without "
                             "its 1-thread run is left out; a missing variant shows as —)")
    args = parser.parse_args(argv)
    if not args.report:
        run(Path(args.work), args.finished_only)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
