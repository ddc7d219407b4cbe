"""benchmarks/sensitivity.py and benchmarks/rounding.py without training: their tables from synthetic rows."""

import json
import math

import pytest

from conftest import load_benchmark_script


@pytest.fixture(scope="module")
def sensitivity():
    return load_benchmark_script("sensitivity")


def test_the_table_sets_each_move_beside_the_seed_spread_and_the_effect(sensitivity, tmp_path, monkeypatch):
    committed = {"rows": [{"suite": "embeddings", "method": m, "concept": "c", "seed": s, "image_alignment": v,
                           "text_alignment": 1.0, "edit_keeps_concept": 0.5}
                          for m, values in (("batex", (0.9, 0.7, 0.8)), ("textual-inversion", (0.6, 0.6, 0.6)))
                          for s, v in enumerate(values)]}
    (tmp_path / "committed.json").write_text(json.dumps(committed))
    monkeypatch.setattr(sensitivity, "HERE", tmp_path)
    monkeypatch.setattr(sensitivity, "PLAN", {"embeddings": (("batex", "textual-inversion"),
                                                             ("image_alignment",), "../committed.json")})
    (tmp_path / "results").mkdir()
    rows = [{"suite": "embeddings", "method": m, "concept": "c", "seed": 0, "variant": v, "image_alignment": x}
            for m, v, x in (("batex", "1 thread", 0.80), ("batex", "2 threads", 0.75), ("textual-inversion", "1 thread", 0.60),
                            ("textual-inversion", "2 threads", 0.60), ("textual-inversion", "alone", 0.60))]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "rows.json").write_text(json.dumps({"rows": rows}))
    table = sensitivity.table(tmp_path / "out").splitlines()
    spread = math.sqrt(((0.1) ** 2 + (0.1) ** 2 + 0) / 3)  # population SD of 0.9, 0.7, 0.8
    assert table[2] == (f"| embeddings: batex (c) | image_alignment | 0.800 | 0.750 | 0.050 | (ran first) | — | "
                        f"{spread:.3f} (3 seeds) | 0.200 → 0.150 | 0.200 |")
    assert table[3] == "| embeddings: textual-inversion (c) | image_alignment | 0.600 | 0.600 | 0 | 0.600 | 0 | 0.000 (3 seeds) |  |  |"


def test_rounding_growth_rate_is_the_slope_in_decades_per_100_updates():
    rounding = load_benchmark_script("rounding")
    points = [(u, 1e-6 * 10 ** (0.5 * u / 100)) for u in range(0, 400, 20)]  # half a decade per 100 updates
    assert rounding.slope(points) == pytest.approx(0.5)
    assert rounding.slope(points[:2]) is None  # too few points
    assert rounding.slope([(u, 0.2) for u in range(10)]) is None  # saturated points (≥ 5 %) are left out
