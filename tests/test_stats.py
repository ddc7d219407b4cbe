"""The bench's statistics on synthetic rows with known answers: concept-level pairing, the exact two-sided sign test,
Holm's correction within a paper, the bootstrap interval."""

import random

import pytest

from personalize.toyworld.bench import stats as S


def _rows(diffs_by_concept, seeds=3, base=0.5, metric="x", suite="s", shuffle_b=False):
    """Rows of methods A and B: for concept i, every seed of A reads base + diffs_by_concept[i] (+ a seed offset
    that B shares only in its mean), B reads base."""
    rows = []
    for i, d in enumerate(diffs_by_concept):
        b_seeds = list(range(seeds))
        if shuffle_b:
            random.Random(i).shuffle(b_seeds)
        for s in range(seeds):
            rows.append({"suite": suite, "method": "A", "concept": f"c{i}", "seed": s, metric: base + d + 0.01 * (s - 1)})
            rows.append({"suite": suite, "method": "B", "concept": f"c{i}", "seed": b_seeds[s], metric: base + 0.02 * (s - 1)})
    return rows


def _alone(comparison):
    return S.decide([comparison], lambda c: "paper")[0]


def test_sign_test_is_exact_and_two_sided():
    assert S.sign_test(0, 0) == 1.0
    assert S.sign_test(7, 2) == pytest.approx(2 * 46 / 512)  # 0.18: P(a split at least 7-2, either way)
    assert S.sign_test(2, 7) == S.sign_test(7, 2)
    assert S.sign_test(12, 0) == pytest.approx(2 / 4096)
    assert S.sign_test(5, 4) == 1.0  # capped
    assert S.smallest_p(3) == pytest.approx(0.25)  # 3 concepts can never reach 0.05
    assert S.smallest_p(5) == pytest.approx(0.0625) and S.smallest_p(6) == pytest.approx(0.03125)


def test_seven_of_nine_concepts_is_inside_noise():
    c = _alone(S.compare(_rows([0.1] * 7 + [-0.1] * 2), "x", "A", "B"))
    assert (c["concepts"], c["wins"], c["losses"], c["ties"]) == (9, 7, 2, 0)
    assert c["p"] == pytest.approx(0.1797, abs=1e-4)
    assert c["verdict"] == "inside noise"


def test_twelve_of_twelve_concepts_is_held_and_the_other_way_reversed():
    rows = _rows([0.1 + 0.01 * i for i in range(12)])
    assert _alone(S.compare(rows, "x", "A", "B"))["verdict"] == "held"
    assert _alone(S.compare(rows, "x", "B", "A"))["verdict"] == "reversed"
    assert _alone(S.compare(rows, "x", "A", "B", higher_is_better=False))["verdict"] == "reversed"


def test_three_concepts_cannot_reach_a_verdict_however_clear():
    c = _alone(S.compare(_rows([0.5, 0.6, 0.7], seeds=10), "x", "A", "B"))
    assert (c["concepts"], c["wins"], c["p"], c["verdict"]) == (3, 3, 0.25, "inside noise")
    assert c["runs_a"] == c["runs_b"] == 30  # 30 runs a side: still 3 concepts


def test_seeds_are_averaged_within_a_concept_before_any_comparison():
    """A concept where A wins 2 of 3 seeds but loses on the concept mean is a loss; B's seed numbers can be
    shuffled (they name nothing across methods) without changing anything; unequal seed counts are fine."""
    rows = []
    for i in range(6):
        rows += [{"suite": "s", "method": "A", "concept": f"c{i}", "seed": s, "x": v} for s, v in enumerate((0.6, 0.6, 0.0))]
        rows += [{"suite": "s", "method": "B", "concept": f"c{i}", "seed": s, "x": 0.5} for s in range(3)]
    c = S.compare(rows, "x", "A", "B")
    assert (c["wins"], c["losses"], c["concepts"]) == (0, 6, 6)  # 12 of 18 seed pairs favoured A
    assert c["mean_difference"] == pytest.approx(0.4 - 0.5)
    plain, shuffled = S.compare(_rows([0.1, -0.2, 0.3]), "x", "A", "B"), S.compare(_rows([0.1, -0.2, 0.3], shuffle_b=True), "x", "A", "B")
    assert plain == shuffled
    fewer = [r for r in _rows([0.1] * 4) if not (r["method"] == "B" and r["seed"] > 0)]
    assert S.compare(fewer, "x", "A", "B")["concepts"] == 4


def test_concepts_only_one_row_measured_are_left_out():
    rows = _rows([0.1] * 4) + [{"suite": "s", "method": "A", "concept": "only-a", "seed": 0, "x": 9.0}]
    assert S.compare(rows, "x", "A", "B")["concepts"] == 4
    none = _alone(S.compare(rows, "x", "A", "C"))
    assert (none["concepts"], none["verdict"], none["mean_difference"], none["interval"]) == (0, "no pairs", None, None)


def test_holm_by_hand():
    assert S.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert S.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert S.holm([0.4, 0.4]) == pytest.approx([0.8, 0.8])
    assert S.holm([]) == []


def test_the_correction_changes_a_borderline_family_and_only_within_its_paper():
    """8-1 over 9 concepts (p = 0.039) is held alone; beside a second claim of the same paper (p = 1) Holm doubles
    it to 0.078: inside noise. The same second claim in another paper's family changes nothing."""
    borderline = S.compare(_rows([0.1] * 8 + [-0.1]), "x", "A", "B")
    other = S.compare(_rows([0.1, -0.1] * 4 + [0.0], metric="y"), "y", "A", "B")
    assert borderline["p"] == pytest.approx(2 * 10 / 512)
    assert _alone(borderline)["verdict"] == "held"
    same_paper = S.decide([borderline, other], lambda c: "paper")
    assert same_paper[0]["p_holm"] == pytest.approx(2 * borderline["p"])
    assert (same_paper[0]["verdict"], same_paper[0]["family_size"]) == ("inside noise", 2)
    apart = S.decide([borderline, other], lambda c: c["metric"])  # two papers
    assert apart[0]["verdict"] == "held" and apart[0]["family_size"] == 1


def test_bootstrap_interval_is_reproducible_and_brackets_the_mean():
    diffs = [0.3, -0.1, 0.2, 0.05, 0.4, -0.2, 0.1, 0.15, 0.0]
    low, high = S.bootstrap_interval(diffs)
    assert S.bootstrap_interval(diffs) == (low, high)  # fixed seed: a table regenerates to the same digits
    assert min(diffs) <= low < sum(diffs) / len(diffs) < high <= max(diffs)
    assert S.bootstrap_interval([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    assert S.bootstrap_interval([]) is None
    wide, narrow = S.bootstrap_interval([-1.0, 1.0] * 6), S.bootstrap_interval([-0.1, 0.1] * 6)
    assert wide[1] - wide[0] == pytest.approx(10 * (narrow[1] - narrow[0]), rel=0.05)
    c = S.compare(_rows([0.1, 0.2, 0.3]), "x", "A", "B")
    assert c["interval"][0] <= c["mean_difference"] <= c["interval"][1]
    assert c["mean_difference"] == pytest.approx(0.2)
