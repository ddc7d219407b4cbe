"""Evaluation protocols and the editing success rate."""

import pytest
from PIL import Image

from personalize.errors import PersonalizeError
from personalize.evaluate.esr import CsvJudge, editing_success_rate
from personalize.evaluate.protocols import (
    SINGLEINSERT_ESR, dreambench_prompts, parse_dreambench, split_reference_heldout,
)


# sha256 of google/dreambooth's dataset/prompts_and_classes.txt, which the package ships unchanged
DREAMBENCH_SHA256 = "f632a5bdb41c3909ce22a0aefcea14432c0897e8db14ab845e68850af5ada486"


def test_dreambench_lists_match_the_benchmark_file():
    """The shipped file is the benchmark's own, byte for byte: nothing outside the repository is needed."""
    import hashlib

    from personalize.evaluate.protocols import DREAMBENCH_FILE

    assert hashlib.sha256(DREAMBENCH_FILE.read_bytes()).hexdigest() == DREAMBENCH_SHA256
    classes, objects, live = parse_dreambench()
    assert len(classes) == 30 and classes["red_cartoon"] == "cartoon" and classes["bear_plushie"] == "stuffed animal"
    assert len(objects) == 25 and len(live) == 25
    assert dreambench_prompts("sks", "dog")[10] == "a sks dog wearing a red hat"  # live subject
    assert dreambench_prompts("sks", "vase")[10] == "a sks vase with a wheat field in the background"


def test_esr_scores_one_point_per_prompt_half_per_target():
    prompts = [SINGLEINSERT_ESR[0], SINGLEINSERT_ESR[3]]  # one target; two targets
    image = Image.new("RGB", (4, 4))
    yes = {"a basketball player", "a police uniform"}
    result = editing_success_rate(
        {p.template: [image, image] for p in prompts}, prompts, lambda im, target, image_id="": float(target in yes)
    )
    assert result.per_prompt == {prompts[0].template: 1.0, prompts[1].template: 0.5}
    assert result.overall == 0.75 and result.n_images == 4
    assert len(SINGLEINSERT_ESR) == 10


def test_csv_judge(tmp_path):
    f = tmp_path / "j.csv"
    f.write_text("image,target,success\nA#0,teal hair,yes\nA#0,a pink wall,0\n")
    judge = CsvJudge(f)
    image = Image.new("RGB", (4, 4))
    assert judge(image, "teal hair", image_id="A#0") == 1.0 and judge(image, "a pink wall", image_id="A#0") == 0.0
    with pytest.raises(PersonalizeError, match="no judgement"):
        judge(image, "x", image_id="A#0")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(PersonalizeError, match="columns"):
        CsvJudge(tmp_path / "bad.csv")


def test_reference_heldout_split_is_seeded_and_disjoint(tmp_path):
    files = [tmp_path / f"{i:03d}.png" for i in range(100)]
    ref, held = split_reference_heldout(files, 30, seed=1)
    assert len(ref) == 30 and len(held) == 70 and not set(ref) & set(held)
    assert split_reference_heldout(files, 30, seed=1) == (ref, held) != split_reference_heldout(files, 30, seed=2)
    with pytest.raises(PersonalizeError):
        split_reference_heldout(files[:30], 30)


def test_report_writes_json_markdown_and_an_html_page_with_images(tmp_path):
    import json

    from personalize.evaluate.report import write_report

    image = Image.new("RGB", (64, 64), "red")
    files = write_report(tmp_path, [{"name": "CLIP-I", "value": 0.8123, "n": 64, "convention": "ViT-B/32 cosine"}],
                         context={"concept": "cat"}, references=[image], samples={"a photo of <c>": [image, image]},
                         per_prompt={"a photo of <c>": {"CLIP-T": 0.31}})
    data = json.loads(files[0].read_text())
    assert data["metrics"][0]["value"] == 0.8123 and "torch" in data["versions"]
    assert "| CLIP-I | 0.8123 | 64 |" in files[1].read_text()
    page = files[2].read_text()
    assert page.count("data:image/png;base64,") == 3 and "CLIP-T 0.310" in page


def test_a_missing_requirement_skips_for_a_user_and_fails_in_ci(tmp_path, monkeypatch):
    """A clone without ../shared/datasets/dreambench (or without Chromium) skips with what to do on a user's machine,
    and fails in CI, so CI never passes untested."""
    from conftest import dreambench_folder

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="google/dreambooth"):
        dreambench_folder(tmp_path / "absent")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="google/dreambooth"):
        dreambench_folder(tmp_path / "absent")
    assert dreambench_folder(tmp_path) == tmp_path
