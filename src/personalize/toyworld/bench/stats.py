"""The bench's statistics, in one place: how runs become a verdict on "A beats B".

The rule (stated once for readers in benchmarks/README.md, "How a verdict is reached"):

1. The unit is the concept (a held-out concept, or a Dis²Booth category), not the run. A concept's runs (its
   training seeds) are averaged first, for each row separately: a seed number names nothing across two methods, so
   runs are never paired by seed, and a concept's seeds share its images, so they are not independent draws.
2. The difference of the two rows' concept means, signed so that > 0 favours A, is tested with the exact
   two-sided sign test over concepts (ties left out). Exact and free of any assumption about the differences'
   distribution or scale, which a rate near 0 or 1 and a Fréchet distance both break.
3. Holm's step-down correction across the claims of one paper (its family: every claim of that paper the rows can
   test), at two-sided α = 0.05: "held" when the corrected p is below α and A is ahead in more concepts, "reversed"
   when B is, "inside noise" otherwise.
4. Next to every verdict: the mean concept difference and its 95 % percentile-bootstrap interval over concepts
   (fixed seed, so a table regenerates to the same digits).

With n concepts the smallest two-sided p a sign test can give is 2 / 2^n: 0.25 with 3 concepts, so no claim
measured on 3 concepts can be held or reversed, whatever its runs say; 6 concepts (p = 0.031) is the least that
can, and only when every concept agrees and the claim is alone in its family.
"""

from __future__ import annotations

import math
import random
import statistics

ALPHA = 0.05  # two-sided, after Holm's correction within a paper
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
INTERVAL = 0.95

HELD, REVERSED, NOISE, NO_PAIRS = "held", "reversed", "inside noise", "no pairs"


def concept_means(rows: list[dict], metric: str, method: str, suite: str | None = None) -> dict[str, tuple[float, int]]:
    """{concept: (mean of `metric` over that concept's runs of `method`, number of runs)}."""
    values: dict[str, list[float]] = {}
    for r in rows:
        if r["method"] == method and (suite is None or r["suite"] == suite) and _number(r.get(metric)):
            values.setdefault(r["concept"], []).append(float(r[metric]))
    return {c: (statistics.mean(v), len(v)) for c, v in values.items()}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign-test p-value of `wins` against `losses` (ties already left out): the chance, if each
    non-tied concept were a fair coin, of a split at least this uneven either way."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def smallest_p(concepts: int) -> float:
    """The least p the two-sided sign test can reach with this many concepts (all on one side)."""
    return sign_test(concepts, 0)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest p times (m − i + 1), made
    non-decreasing along the sorted order and capped at 1. Compare each with α: it controls the chance of any
    false "held"/"reversed" in the family at α, whatever the dependence between the claims."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def bootstrap_interval(differences: list[float], seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = INTERVAL) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean over concepts (concepts resampled with replacement). With 3
    concepts there are only 10 distinct resamples: read the interval as the spread of the concepts, no more."""
    if not differences:
        return None
    rng, n = random.Random(seed), len(differences)
    means = sorted(sum(rng.choice(differences) for _ in range(n)) / n for _ in range(resamples))
    low = means[int(math.floor((1 - level) / 2 * (resamples - 1)))]
    high = means[int(math.ceil((1 + level) / 2 * (resamples - 1)))]
    return low, high


def compare(rows: list[dict], metric: str, a: str, b: str, higher_is_better: bool = True, suite: str | None = None) -> dict:
    """"A beats B on `metric`" at the concept level: each concept's runs averaged per row, then wins / losses /
    ties over the concepts both rows measured, the raw two-sided sign-test p, the mean difference (> 0 favours A)
    and its bootstrap interval. The verdict needs the family: `decide`."""
    left, right = concept_means(rows, metric, a, suite), concept_means(rows, metric, b, suite)
    concepts = sorted(set(left) & set(right))
    sign = 1 if higher_is_better else -1
    diffs = [sign * (left[c][0] - right[c][0]) for c in concepts]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"claim": f"{a} {'>' if higher_is_better else '<'} {b} on {metric}", "metric": metric, "a": a, "b": b,
            "higher_is_better": higher_is_better, "concepts": len(concepts),
            "runs_a": sum(left[c][1] for c in concepts), "runs_b": sum(right[c][1] for c in concepts),
            "mean_a": statistics.mean(left[c][0] for c in concepts) if concepts else None,
            "mean_b": statistics.mean(right[c][0] for c in concepts) if concepts else None,
            "wins": wins, "losses": losses, "ties": len(concepts) - wins - losses,
            "mean_difference": statistics.mean(diffs) if diffs else None, "interval": bootstrap_interval(diffs),
            "p": sign_test(wins, losses), "smallest_p": smallest_p(len(concepts)) if concepts else 1.0}


def verdict(comparison: dict, alpha: float = ALPHA) -> str:
    if not comparison["concepts"]:
        return NO_PAIRS
    if comparison["p_holm"] >= alpha:
        return NOISE
    return HELD if comparison["wins"] > comparison["losses"] else REVERSED


def decide(comparisons: list[dict], family_of, alpha: float = ALPHA) -> list[dict]:
    """Holm's correction within each family (`family_of(comparison)` names it: the paper), then each verdict.
    Comparisons with no concept in common are left out of every family. Returns new dicts, in the input order."""
    out = [dict(c, family=family_of(c)) for c in comparisons]
    for family in dict.fromkeys(c["family"] for c in out):
        members = [c for c in out if c["family"] == family and c["concepts"]]
        for c, adjusted in zip(members, holm([c["p"] for c in members])):
            c["p_holm"], c["family_size"] = adjusted, len(members)
    for c in out:
        c.setdefault("p_holm", 1.0)
        c.setdefault("family_size", 0)
        c["verdict"] = verdict(c, alpha)
    return out
