"""The bench's concepts and Dis²Booth categories (issue 26): enough of them, the committed ones first, each drawn as
what it says, and every suite drawing from them."""

import random

import pytest

from personalize.errors import PersonalizeError
from personalize.toyworld.judge import ToyJudge
from personalize.toyworld.world import BENCH_CONCEPTS, CATEGORIES, HELD_OUT, caption, random_scene, render


def test_twelve_distinct_bench_concepts_the_three_held_out_first_then_nameable_ones():
    from personalize.toyworld.bench.sweep import SWEEP_TRAITS

    assert len(BENCH_CONCEPTS) >= 12 and len(set(BENCH_CONCEPTS)) == len(BENCH_CONCEPTS)
    assert BENCH_CONCEPTS[:3] == HELD_OUT  # the committed raw rows' concepts keep their index (and token)
    nameable = BENCH_CONCEPTS[3:]
    assert len(nameable) >= 9 and not set(nameable) & set(HELD_OUT)
    # nameable: the training captions name them whole (a held-out one never is)
    rng = random.Random(0)
    for colour, shape, pattern in nameable:
        texts = [caption(random_scene(rng, colour=colour, shape=shape, pattern=pattern), rng, drop=0.0) for _ in range(5)]
        assert all(f"{colour} {pattern} {shape}" in t for t in texts), texts
    # spread: every colour and every shape of the world at least twice, every pattern at least three times
    for position, least in ((0, 2), (1, 2), (2, 3)):
        counts = {}
        for concept in BENCH_CONCEPTS:
            counts[concept[position]] = counts.get(concept[position], 0) + 1
        assert min(counts.values()) >= least and len(counts) == {0: 6, 1: 6, 2: 3}[position], counts
    # the lr-sweep chose its rates on a concept no table uses
    assert (SWEEP_TRAITS["colour"], SWEEP_TRAITS["shape"], SWEEP_TRAITS["pattern"]) not in BENCH_CONCEPTS


def test_every_bench_concept_renders_as_its_traits_by_the_judge():
    judge, rng = ToyJudge.load(), random.Random(1)
    for colour, shape, pattern in BENCH_CONCEPTS:
        images = [render(random_scene(rng, colour=colour, shape=shape, pattern=pattern))[0] for _ in range(10)]
        for reading in judge.predict(images):
            assert (reading["colour"], reading["shape"], reading["pattern"]) == (colour, shape, pattern), reading


def test_six_categories_each_sharing_its_traits_across_its_references():
    from personalize.toyworld.bench.common import render_set

    assert len(CATEGORIES) >= 6
    assert list(CATEGORIES)[:3] == ["striped-squares", "red-things", "stars-on-black"]  # the committed rows' names
    assert len({tuple(sorted(t.items())) for t in CATEGORIES.values()}) == len(CATEGORIES)
    judge = ToyJudge.load()
    for name, traits in CATEGORIES.items():
        assert 1 <= len(traits) <= 2, name
        readings = judge.predict([render(random_scene(random.Random(3 + i), **traits))[0] for i in range(30)])
        assert all(all(r[k] == v for k, v in traits.items()) for r in readings), name
        # and the rest varies: a category is a varied set, not one concept
        for free in {"shape", "colour", "pattern", "background"} - set(traits):
            assert len({r[free] for r in readings}) >= 2, (name, free)


def test_suites_draw_from_the_bench_concepts_and_categories_up_to_their_number(tmp_path):
    from personalize.toyworld.bench.common import BenchConfig, chosen_concepts

    assert [c for _, c in chosen_concepts(BenchConfig(concepts=12), BENCH_CONCEPTS)] == list(BENCH_CONCEPTS[:12])
    assert chosen_concepts(BenchConfig(concepts=12, concept_index=[11]), BENCH_CONCEPTS) == [(11, BENCH_CONCEPTS[11])]
    assert [n for _, (n, _) in chosen_concepts(BenchConfig(concepts=6), CATEGORIES.items())] == list(CATEGORIES)[:6]
    with pytest.raises(PersonalizeError, match="--concepts 7"):
        chosen_concepts(BenchConfig(concepts=7), CATEGORIES.items())
    with pytest.raises(PersonalizeError, match="--concepts 13"):
        chosen_concepts(BenchConfig(concepts=13), BENCH_CONCEPTS)


def test_a_bench_row_on_a_nameable_concept_says_it_is_not_held_out(tmp_path, monkeypatch):
    """The BaTex suite runs the 4th bench concept (a nameable one) and its rows record held_out = False; the 1st's
    rows held_out = True. Training and measuring are stubbed: the concept choice and the row are under test."""
    from personalize.toyworld.bench import batex
    from personalize.toyworld.bench.common import BenchConfig

    monkeypatch.setattr(batex, "train_run", lambda *a, **k: 1.0)
    monkeypatch.setattr(batex, "load_model", lambda cfg, concepts=(): type("M", (), {"embedding_dims": [128]})())
    monkeypatch.setattr(batex, "measure_embedding", lambda *a, **k: {"image_alignment": 1.0, "text_alignment": 1.0})
    rows = batex.suite_embeddings(BenchConfig(output=str(tmp_path), concepts=4, concept_index=[0, 3], seeds=1, curve=False,
                                              methods=["batex"]), None, tmp_path)
    assert [(r["concept"], r["held_out"], r["method"]) for r in rows] == [
        ("orange-heart-dotted", True, "batex"), ("-".join((BENCH_CONCEPTS[3][0], BENCH_CONCEPTS[3][1], BENCH_CONCEPTS[3][2])), False, "batex")]
    assert all(set(r["curve"]) == {"300"} for r in rows)  # --no-curve: measured at the last step only


def test_a_generated_table_can_show_only_the_held_out_or_the_nameable_concepts_rows(tmp_path, monkeypatch):
    """benchmarks/tables.py: a table's `only` keeps the rows with those values (a row's `held_out`), so each group of
    bench concepts gets its own rows table from the same raw-row file."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_tables_only", Path(__file__).resolve().parents[1] / "benchmarks" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    sys.modules["bench_tables_only"] = tables  # dataclasses look their module up
    spec.loader.exec_module(tables)
    (tmp_path / "toy-2026-12-07").mkdir()
    rows = [{"suite": "embeddings", "method": m, "concept": c, "held_out": h, "seed": 0, "image_alignment": v}
            for c, h, v in (("orange-heart-dotted", True, 0.5), ("red-square-striped", False, 1.0)) for m in ("batex", "textual-inversion")]
    (tmp_path / "toy-2026-12-07" / "e.json").write_text(json.dumps({"rows": rows}))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    held = tables.Table("h", ["toy-2026-12-07/e.json"], "embeddings", ["batex"], ["image_alignment"], only={"held_out": True})
    named = tables.Table("n", ["toy-2026-12-07/e.json"], "embeddings", ["batex"], ["image_alignment"], only={"held_out": False})
    assert {r["concept"] for r in tables._table_rows(held)} == {"orange-heart-dotted"}
    assert {r["concept"] for r in tables._table_rows(named)} == {"red-square-striped"}
    assert "| batex | 1 | 1 | 0.500 |" in tables.rows_table(held, tables._table_rows(held))


@pytest.mark.parametrize("esr", [True, False])
def test_singleinsert_rows_read_the_toy_esr_unless_no_esr(tmp_path, monkeypatch, esr):
    """--no-esr leaves the ESR column out and draws none of its prompts; by default every row has it. Training,
    sampling and judging are stubbed: which prompts are drawn and what the row holds are under test."""
    from types import SimpleNamespace

    from personalize.evaluate.protocols import TOY_ESR
    from personalize.toyworld.bench import singleinsert
    from personalize.toyworld.bench.common import BenchConfig

    drawn = []
    monkeypatch.setattr(singleinsert, "train_run", lambda *a, **k: 1.0)
    monkeypatch.setattr(singleinsert, "load_model", lambda cfg, concepts=(): None)
    monkeypatch.setattr(singleinsert, "measure_embedding", lambda *a, **k: {"text_alignment": 1.0, "edit_keeps_concept": 0.5})
    monkeypatch.setattr(singleinsert, "Sampler", lambda cfg: lambda backbone, prompt, n: drawn.append(prompt) or [None] * n)
    monkeypatch.setattr(singleinsert, "editing_success_rate", lambda images, prompts, judge: SimpleNamespace(overall=0.75))
    monkeypatch.setattr(singleinsert, "T", SimpleNamespace(**{f: (lambda *a, **k: 0.5) for f in (
        "concept_rate", "feature_similarity", "background_leakage", "clean_foreground_rate", "diversity")}))
    judge = SimpleNamespace(predict=lambda images: [])
    rows = singleinsert.suite_singleinsert(BenchConfig(output=str(tmp_path), concepts=1, seeds=1, esr=esr,
                                                       methods=["singleinsert: full (+L_sm)"]), judge, tmp_path)
    assert [r["method"] for r in rows] == ["singleinsert: full (+L_sm)"]
    assert ("esr" in rows[0]) is esr and rows[0].get("esr", 0.75) == 0.75
    assert len(drawn) == (len(TOY_ESR) if esr else 0)
