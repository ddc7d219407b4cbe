"""`personalize evaluate` end to end on the tiny model with tiny metric networks built in code."""

import csv
import json

import pytest
import torch
from torch import nn

from conftest import EXAMPLE_IMAGES
from personalize import cli
from personalize.data import image_paths, load_rgb
from personalize.errors import PersonalizeError
from personalize.evaluate import metrics as M
from personalize.evaluate.protocols import SINGLEINSERT_ESR
from personalize.evaluate.runner import EvalConfig, evaluate


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cat"
    args = ["train", "--method", "textual-inversion", "--images", EXAMPLE_IMAGES, "--init-word", "cat", "--steps", 2,
            "--output", out, "--num-validation-images", 1, "--inference-steps", 1]
    assert cli.main([str(a) for a in args]) == 0
    return out


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """Saved tiny CLIP and DINO folders, a random AlexNet file and a TorchScript 'Inception'."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from personalize.tiny import clip_tokenizer

    folder = tmp_path_factory.mktemp("networks")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4),
        projection_dim=16))
    clip.save_pretrained(folder / "clip")
    clip_tokenizer().save_pretrained(folder / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(folder / "dino")
    torch.save(M.AlexNetFeatures().state_dict(), folder / "alexnet.pth")

    class ColourStats(nn.Module):  # stands in for Inception: per-channel mean and std of the image
        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            x = x.float() / 255
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    torch.jit.script(ColourStats()).save(str(folder / "inception.pt"))
    return folder


def _config(run_folder, out, **kw):
    return EvalConfig(**{"concept": [str(run_folder)], "output": str(out), "steps": 2, "num_images": 1, **kw})


def test_dreambench_scores_match_a_recomputation_from_the_saved_samples(run_folder, networks, tmp_path):
    files = evaluate(_config(run_folder, tmp_path / "eval", clip_model=str(networks / "clip"),
                             dino_model=str(networks / "dino")))
    assert [f.name for f in files] == ["report.json", "report.md", "report.html"]
    report = json.loads(files[0].read_text())
    values = {m["name"]: m for m in report["metrics"]}
    assert set(values) == {"CLIP-I", "CLIP-T", "DINO"} and all(m["n"] == 25 for m in values.values())
    assert report["context"]["subject"] == "<concept>" and report["context"]["model"] == "tiny"

    samples = sorted((tmp_path / "eval" / "samples").glob("*.png"))
    assert len(samples) == 25
    clip = M.ClipScorer.load(networks / "clip")
    generated = [load_rgb(p) for p in samples]
    references = [load_rgb(p) for p in image_paths(EXAMPLE_IMAGES)]  # the run's --images are the default references
    assert values["CLIP-I"]["value"] == pytest.approx(clip.clip_i(generated, references), abs=1e-5)
    # CLIP-T reads "a cat in the jungle": the learned token replaced by the class word, the run's init word
    first = report["per_prompt"]["a <concept> in the jungle"]["CLIP-T"]
    expected = clip.clip_t(generated[:1], ["a cat in the jungle"])
    assert first == pytest.approx(expected, abs=1e-5)
    assert "a &lt;concept&gt; in the jungle" in (tmp_path / "eval" / "report.html").read_text()


def test_samples_are_reused_and_other_settings_are_refused(run_folder, networks, tmp_path):
    cfg = _config(run_folder, tmp_path / "eval", clip_model=str(networks / "clip"))
    evaluate(cfg)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "eval" / "samples").glob("*.png")}
    first = json.loads((tmp_path / "eval" / "report.json").read_text())["metrics"]
    evaluate(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing redrawn
    again = json.loads((tmp_path / "eval" / "report.json").read_text())["metrics"]
    assert [m["value"] for m in again] == [m["value"] for m in first]

    with pytest.raises(PersonalizeError, match="--overwrite"):
        evaluate(_config(run_folder, tmp_path / "eval", clip_model=str(networks / "clip"), guidance=3.0))
    evaluate(_config(run_folder, tmp_path / "eval", clip_model=str(networks / "clip"), guidance=3.0, overwrite=True))
    assert any(p.stat().st_mtime_ns != t for p, t in stamps.items())


def test_nothing_is_drawn_when_no_metric_can_be_computed(run_folder, tmp_path):
    with pytest.raises(PersonalizeError, match="--clip-model"):
        evaluate(_config(run_folder, tmp_path / "eval"))
    assert not (tmp_path / "eval" / "samples").exists()


def test_distribution_protocol_reports_fid_and_diversity(run_folder, networks, tmp_path):
    cfg = _config(run_folder, tmp_path / "eval", protocol="distribution", num_images=4, heldout=str(EXAMPLE_IMAGES),
                  inception=str(networks / "inception.pt"), lpips_backbone=str(networks / "alexnet.pth"))
    report = json.loads(evaluate(cfg)[0].read_text())
    values = {m["name"]: m["value"] for m in report["metrics"]}
    assert set(values) == {"FID", "DIV"} and values["FID"] > 0 and values["DIV"] > 0

    samples = [load_rgb(p) for p in sorted((tmp_path / "eval" / "samples").glob("*.png"))]
    inception = M.InceptionFeatures(networks / "inception.pt")
    heldout = [load_rgb(p) for p in image_paths(EXAMPLE_IMAGES)]
    assert values["FID"] == pytest.approx(float(M.fid(inception(samples), inception(heldout))), rel=1e-6)


def test_esr_with_human_judgements(run_folder, tmp_path):
    judgements = tmp_path / "judged.csv"
    with judgements.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "target", "success"])
        for k, prompt in enumerate(SINGLEINSERT_ESR):  # the first 5 prompts succeed entirely, the rest fail
            for i in range(2):
                for target in prompt.targets:
                    writer.writerow([f"{prompt.template}#{i}", target, "yes" if k < 5 else "no"])
    cfg = _config(run_folder, tmp_path / "eval", protocol="esr", num_images=2, judge=str(judgements))
    report = json.loads(evaluate(cfg)[0].read_text())
    esr, = [m for m in report["metrics"] if m["name"] == "ESR"]
    assert esr["value"] == pytest.approx(0.5) and esr["n"] == 20
    assert "CLIP-T" in report["context"]["skipped"]


def test_cli_evaluate_names_a_missing_concept(tmp_path, capsys):
    code = cli.main(["evaluate", "--concept", str(tmp_path / "nope"), "--output", str(tmp_path / "e"),
                     "--clip-model", str(tmp_path / "clip")])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_toy_protocol_scores_with_the_shipped_judge(run_folder, tmp_path):
    from personalize.evaluate import toy as T
    from personalize.toyworld.judge import WEIGHTS_DIR, ToyJudge

    if not (WEIGHTS_DIR / "judge.safetensors").exists():
        pytest.skip("toy judge not shipped")
    report = json.loads(evaluate(_config(run_folder, tmp_path / "eval", protocol="toy", num_images=2))[0].read_text())
    values = {m["name"]: m for m in report["metrics"]}
    assert set(values) == {"judge-I", "judge-DIV", "ESR"}
    assert values["ESR"]["n"] == 20 and 0 <= values["ESR"]["value"] <= 1
    samples = [load_rgb(p) for p in sorted((tmp_path / "eval" / "samples").glob("000-*.png"))]  # "a <concept>"
    assert values["judge-DIV"]["value"] == pytest.approx(T.diversity(ToyJudge.load(), samples), abs=1e-5)
