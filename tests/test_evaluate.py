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


def test_each_method_says_how_a_prompt_names_its_concept():
    """The subject comes from the method (DreamBooth-LoRA's "sks dog", not "sks"), for every registered method."""
    from dataclasses import asdict

    from personalize.evaluate.runner import run_subject
    from personalize.methods import METHODS

    expected = {"textual-inversion": "<concept>", "batex": "<concept>", "dreambooth-lora": "sks dog",
                "dis2booth": "sks dog", "singleinsert": "<concept> dog"}
    assert set(expected) == set(METHODS)
    for name, method in METHODS.items():
        config = method.config_class(**({"class_word": "dog"} if "class_word" in method.config_class.__dataclass_fields__ else {}))
        assert run_subject({"method": name, **asdict(config)}) == expected[name], name
    assert run_subject({}) == "<concept>"  # a bare embedding file


# -- each protocol's conventions (issue 5) and SingleInsert's Table 1 (issue 6) ---------------------------------


def _resolved(run_folder, tmp_path, **kw):
    from personalize.evaluate.runner import resolve_defaults

    return resolve_defaults(_config(run_folder, tmp_path / "eval", **kw))


def test_every_metric_of_every_protocol_says_whose_convention_it_follows(run_folder, tmp_path):
    from personalize.evaluate.protocols import CONVENTIONS
    from personalize.evaluate.runner import PROTOCOLS, convention_origin, plan_metrics, protocol_plan

    every_network = dict(clip_model="c", dino_model="d", lpips_backbone="l", inception="i", heldout="h",
                         generated_masks="m", num_images=2)
    for protocol in PROTOCOLS:
        cfg = _resolved(run_folder, tmp_path, protocol=protocol, **every_network)
        wanted, skipped = plan_metrics(cfg, protocol_plan(cfg))
        assert not skipped and set(wanted) == set(CONVENTIONS[protocol]), protocol
        for metric in wanted:
            origin = convention_origin(cfg, metric)
            assert origin["paper"] or origin["ours"], (protocol, metric)
            assert not origin["user"]

    batex = CONVENTIONS["batex"]["CLIP-T"]  # Textual Inversion's text, CLIPScore's scale: both stated
    assert (batex.text, batex.scale) == ("remove", "clipscore") and {"text", "scale"} <= set(batex.paper)
    assert "original implementation of CLIPScore" in batex.paper["scale"] and "omit the placeholder" in batex.paper["text"]
    assert "pair-wise CLIP-space cosine" in CONVENTIONS["batex"]["CLIP-I"].paper["rule"]  # raw cosine for images
    for protocol in ("dreambench", "singleinsert", "esr"):  # the scale is DreamBooth's cosine; the text is our choice
        clip_t = CONVENTIONS[protocol]["CLIP-T"]
        assert (clip_t.text, clip_t.scale) == ("class", "raw") and "scale" in clip_t.paper and "text" in clip_t.ours


def test_batex_reads_clip_t_as_textual_inversion_and_clipscore_unless_a_flag_overrides(run_folder, networks, tmp_path):
    clip_model = str(networks / "clip")
    report = json.loads(evaluate(_config(run_folder, tmp_path / "eval", protocol="batex", clip_model=clip_model))[0].read_text())
    clip_t, = [m for m in report["metrics"] if m["name"] == "CLIP-T"]
    assert set(clip_t["origin"]["paper"]) >= {"text", "scale"} and not clip_t["origin"]["user"]
    assert "CLIPScore" in clip_t["convention"] and "removed" in clip_t["convention"]

    clip = M.ClipScorer.load(networks / "clip")
    beach = [load_rgb(tmp_path / "eval" / "samples" / "001-0.png")]  # prompt 1: "a photo of <concept> on the beach"
    prompt = "a photo of <concept> on the beach"
    expected = clip.clip_t(beach, ["A photo depicts a photo of on the beach"], convention="clipscore")
    assert report["per_prompt"][prompt]["CLIP-T"] == pytest.approx(expected, abs=1e-5) and expected > 0.01

    # the old single rule (class word, raw cosine), now only by asking for it
    report = json.loads(evaluate(_config(run_folder, tmp_path / "eval", protocol="batex", clip_model=clip_model,
                                         clip_t_text="class", clip_t_convention="raw"))[0].read_text())
    clip_t, = [m for m in report["metrics"] if m["name"] == "CLIP-T"]
    assert clip_t["origin"]["user"] == {"text": "--clip-t-text class", "scale": "--clip-t-convention raw"}
    old_rule = clip.clip_t(beach, ["a photo of cat on the beach"])
    assert report["per_prompt"][prompt]["CLIP-T"] == pytest.approx(old_rule, abs=1e-5)
    assert abs(old_rule - expected) > 1e-3  # the two conventions really give different figures
    assert "| our choice + your flag |" in (tmp_path / "eval" / "report.md").read_text()  # BaTex's prompt list stays ours


def test_singleinsert_protocol_reports_table_1_with_generated_masks(run_folder, networks, tmp_path):
    """CLIP-T, CLIP-I-f/-b, DINO-f/-b, DIV and ESR; the samples' masks come in a second call, as `personalize mask`
    would write them beside the samples, and the samples are reused."""
    import numpy as np
    from PIL import Image

    references = tmp_path / "source"
    references.mkdir()
    square = np.zeros((128, 128), np.uint8)
    square[24:104, 32:96] = 255
    for path in image_paths(EXAMPLE_IMAGES)[:2]:
        load_rgb(path).save(references / f"{path.stem}.png")
        Image.fromarray(square).save(references / f"{path.stem}.mask.png")
    out = tmp_path / "eval"
    args = ["evaluate", "--protocol", "singleinsert", "--concept", run_folder, "--output", out, "--steps", 2,
            "--num-images", 2, "--references", references, "--clip-model", networks / "clip",
            "--dino-model", networks / "dino", "--lpips-backbone", networks / "alexnet.pth"]
    assert cli.main([str(a) for a in args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {m["name"] for m in report["metrics"]} == {"CLIP-T", "DIV", "ESR"}
    assert "personalize mask" in report["context"]["skipped"]["CLIP-I-f"]

    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 20
    stamps = {p: p.stat().st_mtime_ns for p in samples}
    generated_masks = []
    for k, path in enumerate(samples):  # a different box per sample: what a segmenter would find
        mask = np.zeros((32, 32), np.uint8)
        mask[4 + k % 5 : 24, 6 : 26 - k % 3] = 255
        Image.fromarray(mask).save(path.with_name(f"{path.stem}.mask.png"))
        generated_masks.append(mask)
    assert cli.main([str(a) for a in args + ["--generated-masks", out / "samples"]]) == 0
    assert {p: p.stat().st_mtime_ns for p in samples} == stamps  # nothing redrawn
    report = json.loads((out / "report.json").read_text())
    values = {m["name"]: m for m in report["metrics"]}
    assert set(values) == {"CLIP-I-f", "CLIP-I-b", "DINO-f", "DINO-b", "CLIP-T", "DIV", "ESR"}
    assert all(m["n"] == 20 for m in values.values())

    generated = [load_rgb(p) for p in samples]
    source = [load_rgb(p) for p in image_paths(references)]
    source_masks = [square, square]
    clip, dino = M.ClipScorer.load(networks / "clip"), M.DinoScorer.load(networks / "dino")
    for name, scorer, keep in (("CLIP-I-f", clip, "foreground"), ("CLIP-I-b", clip, "background"),
                               ("DINO-f", dino, "foreground"), ("DINO-b", dino, "background")):
        expected = M.masked_similarity(scorer.image_embeddings, generated, generated_masks, source, source_masks, keep=keep)
        assert values[name]["value"] == pytest.approx(expected, abs=1e-5), name
        assert "region" in values[name]["origin"]["paper"] and "masks" in values[name]["origin"]["ours"]
    lpips = M.LPIPS.load(networks / "alexnet.pth")
    by_prompt = [generated[i : i + 2] for i in range(0, 20, 2)]  # 10 prompts x 2 seeds, in file order
    assert values["DIV"]["value"] == pytest.approx(M.div_lpips(by_prompt, lpips), rel=1e-5)


def test_singleinsert_on_the_toy_model_uses_the_toy_worlds_prompts_judge_and_masks(run_folder, tmp_path):
    from personalize.evaluate.protocols import SINGLEINSERT_ESR, TOY_ESR
    from personalize.evaluate.runner import judge_kind, protocol_plan

    cfg = _resolved(run_folder, tmp_path, protocol="singleinsert", model="toy")
    plan, = protocol_plan(cfg)
    assert plan.prompts == [p.template.format(cfg.subject) for p in TOY_ESR]
    assert cfg.generated_masks == "toy" and judge_kind(cfg) == "toy"
    cfg = _resolved(run_folder, tmp_path, protocol="singleinsert")  # a real model: SingleInsert's own list
    plan, = protocol_plan(cfg)
    assert plan.prompts == [p.template.format(cfg.subject) for p in SINGLEINSERT_ESR]
    assert cfg.generated_masks is None and judge_kind(cfg) == "clip"


def test_toy_masks_segment_samples_and_unmasked_references_by_their_background(run_folder, networks, tmp_path):
    from personalize.evaluate.toy import foreground_mask

    cfg = _config(run_folder, tmp_path / "eval", protocol="singleinsert", clip_model=str(networks / "clip"),
                  generated_masks="toy")  # examples/cat has no mask files: the references are segmented too
    report = json.loads(evaluate(cfg)[0].read_text())
    values = {m["name"]: m for m in report["metrics"]}
    assert set(values) == {"CLIP-I-f", "CLIP-I-b", "CLIP-T", "ESR"}
    assert "2 images per prompt" in report["context"]["skipped"]["DIV"]
    assert "toy" in values["CLIP-I-f"]["provenance"]["generated_masks"]

    samples = [load_rgb(p) for p in sorted((tmp_path / "eval" / "samples").glob("*.png"))]
    references = [load_rgb(p) for p in image_paths(EXAMPLE_IMAGES)]
    clip = M.ClipScorer.load(networks / "clip")
    expected = M.masked_similarity(clip.image_embeddings, samples, [foreground_mask(im) for im in samples],
                                   references, [foreground_mask(im) for im in references], keep="background")
    assert values["CLIP-I-b"]["value"] == pytest.approx(expected, abs=1e-5)
