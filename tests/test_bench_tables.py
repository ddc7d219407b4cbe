"""benchmarks/README.md's results tables are generated from the committed raw rows: regenerating them changes
nothing, and a hand-typed figure in a generated region is caught. No training: reads benchmarks/results/ only."""

from pathlib import Path

import pytest

from conftest import load_benchmark_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    return load_benchmark_script("tables")


@pytest.fixture(scope="module")
def generated(tables):
    return tables.regions()


def test_the_readme_tables_are_what_the_raw_rows_give(tables, generated):
    texts = [(ROOT / "benchmarks" / "README.md").read_text(), (ROOT / "README.md").read_text()]  # README: the alternatives
    for text in texts:
        _, changed = tables.rewrite(text, generated)
        assert changed == [], f"regenerate with `python benchmarks/tables.py`: {changed}"
    assert tables.missing_regions("".join(texts), generated) == []


def test_a_hand_typed_figure_in_a_generated_table_fails(tables, generated):
    text = (ROOT / "benchmarks" / "README.md").read_text()
    edited = text.replace("| 0.767 ± 0.249 |", "| 0.771 ± 0.254 |", 1)  # issue 26: the README's hand-typed trait figure
    assert edited != text
    assert tables.rewrite(edited, generated)[1] == ["dis2booth-equal-updates-2.1-rows"]


def test_rows_of_two_days_or_devices_are_never_paired(tables, generated):
    """The equal-updates file holds Dis²Booth rows of 2026-12-05 beside DreamBooth-LoRA rows of 2026-12-06; the 11-27
    Dis²Booth suite ran Dis²Booth on the CPU and DreamBooth-LoRA on the H200: no verdict pairs them."""
    decided = tables.all_comparisons()
    by_text = {(name, claim.text): decided[(name, i)] for t in tables.TABLES for i, claim in enumerate(t.claims)
               for name in [t.name]}
    cross_day = by_text[("dis2booth-equal-updates-2.1", "Dis²Booth beats DreamBooth-LoRA, 1,000 updates each (keeps the common trait)")]
    assert cross_day["verdict"] == "not paired: rows of 2026-12-05 CPU and 2026-12-06 CPU" and cross_day["p_holm"] is None
    cross_device = by_text[("dis2booth-2.1", "closer to the category than DreamBooth-LoRA")]
    assert cross_device["verdict"].startswith("not paired")
    same_day = by_text[("dis2booth-equal-updates-2.1", "DreamBooth-LoRA: 1,000 beats 120 updates (keeps the common trait)")]
    assert (same_day["wins"], same_day["p"], same_day["verdict"]) == (3, 0.25, "inside noise")  # 3 concepts: at best 0.25


def test_every_verdict_in_the_tables_follows_the_concept_level_rule(tables):
    """Holm runs over a paper's pairable claims; with 3 concepts nothing is held or reversed, and a held or reversed
    verdict always has its corrected p below 0.05 (the 12-concept SingleInsert rows hold two claims)."""
    decided = tables.all_comparisons().values()
    assert all(c["verdict"] not in ("held", "reversed") for c in decided if c["concepts"] <= 3)
    decisive = [c for c in decided if c["verdict"] in ("held", "reversed")]
    assert all(c["p_holm"] < 0.05 and c["concepts"] >= 6 for c in decisive)
    assert all(c["p_holm"] >= 0.05 for c in decided if c["verdict"] == "inside noise" and c["p_holm"] is not None)
    batex = [c for c in decided if tables.PAPER_OF_SUITE[c["suite"]] == "BaTex"]
    assert {c["family_size"] for c in batex} == {len(batex)}


def test_a_row_two_suites_share_is_read_once_under_each_tables_label(tables):
    """BaTex's default run is the basis-size table's M = 3d/4 row and the distance table's dot row: the embeddings
    suite's "batex" rows under that label, and none of that file's other rows."""
    table = tables.Table("t", [tables.EMB12], "basis-size", same_as={"batex M=96": tables.BATEX_DEFAULT})
    rows = tables._table_rows(table)
    embeddings = [r for r in tables.load_rows(tables.EMB12) if r["method"] == "batex"]
    assert len(rows) == len(embeddings) == 24
    assert {(r["suite"], r["method"]) for r in rows} == {("basis-size", "batex M=96")}
    assert sorted(r["image_alignment"] for r in rows) == sorted(r["image_alignment"] for r in embeddings)
