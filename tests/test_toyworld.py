"""The toy world: exact renders and masks, captions from real CLIP words, held-out concepts, the judge."""

import random

import numpy as np
import pytest

from personalize.errors import PersonalizeError
from personalize.tiny import clip_tokenizer
from personalize.toyworld import TOY_MODEL_DIR
from personalize.toyworld.judge import WEIGHTS_DIR, ToyJudge, parse_target
STEPS_TO_LEARN = 300  # Textual Inversion steps (lr 5e-3) of the learning test, tuned on the shipped model

from personalize.toyworld.world import (
    BACKGROUNDS, COLOURS, HELD_OUT, PATTERNS, POSITIONS, SHAPES, SIZE, SIZES, Scene, Thing, caption, describe,
    random_pair, random_scene, render, render_objects,
)


def _interior(mask):
    """The mask without its edge pixels (anti-aliased: partly background)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def test_render_is_exact_and_seeded():
    scene = Scene("square", "red", "plain", "gray", "large", "center")
    image, mask = render(scene)
    pixels = np.asarray(image)
    assert image.size == (SIZE, SIZE) == (64, 64) and mask.shape == (64, 64)
    assert (np.abs(pixels[_interior(mask)] - COLOURS["red"]).max(axis=1) <= 40).mean() > 0.95  # inside: the colour
    assert (pixels[~mask] == BACKGROUNDS["gray"]).all(axis=1).mean() > 0.9  # outside: the background
    assert 0.2 < mask.mean() < 0.6
    a, b = random.Random(3), random.Random(3)
    assert random_scene(a) == random_scene(b)


def test_patterns_are_bold_enough_to_see_on_a_small_object():
    """A small striped object shows both of its tones in quantity; a dotted one shows white dots inside."""
    image, mask = render(Scene("circle", "blue", "striped", "white", "small", "center"))
    inside = np.asarray(image)[mask].astype(float)
    dark = (inside.max(axis=1) < 0.6 * max(COLOURS["blue"]))
    assert 0.3 < dark.mean() < 0.7, dark.mean()
    image, mask = render(Scene("circle", "red", "dotted", "black", "small", "center"))
    white = (np.asarray(image)[mask] > 200).all(axis=1)
    assert white.sum() >= 16, white.sum()  # at least four 4-px dots


def test_two_object_scenes_have_one_exact_mask_per_object():
    scene = Scene("circle", "red", "plain", "gray", "large", "left", second=Thing("square", "blue", "plain", "small"))
    image, masks = render_objects(scene)
    pixels = np.asarray(image)
    assert len(masks) == 2 and not (masks[0] & masks[1]).any()  # side by side, never touching
    assert masks[0][:, : SIZE // 2].sum() == masks[0].sum() and masks[1][:, SIZE // 2 :].sum() == masks[1].sum()
    assert (np.abs(pixels[_interior(masks[0])] - COLOURS["red"]).max(axis=1) <= 40).mean() > 0.95
    assert (np.abs(pixels[_interior(masks[1])] - COLOURS["blue"]).max(axis=1) <= 40).mean() > 0.95
    assert masks[0].sum() > masks[1].sum()  # large vs small
    assert np.array_equal(render(scene)[1], masks[0] | masks[1])
    assert describe(scene) == "a large red circle on the left and a small blue square on the right on a gray background"
    texts = {caption(scene, random.Random(i)) for i in range(200)}
    assert any(" next to " in t for t in texts) and any(t.startswith("a ") and " on the left and " in t for t in texts)
    assert random_pair(random.Random(5)) == random_pair(random.Random(5))


def test_held_out_concepts_are_never_named_whole():
    rng = random.Random(0)
    for colour, shape, pattern in HELD_OUT:
        alone = Scene(shape, colour, pattern, "white", "large", "center")
        paired = Scene("circle", "red", "plain", "white", "small", "left", second=Thing(shape, colour, pattern, "large"))
        for scene in (alone, paired):
            for _ in range(200):
                text = caption(scene, rng, drop=0.0)
                assert f"{colour} {pattern} {shape}" not in text, text
                if scene is alone:
                    assert not (colour in text and pattern in text and shape in text), text


def test_every_caption_word_is_one_clip_token():
    tok = clip_tokenizer()
    for word in [*SHAPES, *COLOURS, *PATTERNS, *BACKGROUNDS, *SIZES, *POSITIONS]:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_judge_targets_parse():
    assert parse_target("background=pink") == ("background", "pink")
    assert parse_target("striped") == ("pattern", "striped")
    with pytest.raises(PersonalizeError):
        parse_target("background=plaid")
    with pytest.raises(PersonalizeError, match="missing"):
        ToyJudge.load("/nowhere/judge.safetensors")


def test_shipped_judge_reads_every_object_of_fresh_renders():
    from personalize.toyworld.judge import pair_shows

    rng = random.Random(123)
    judge = ToyJudge.load()
    scenes = [random_scene(rng) for _ in range(150)]
    predicted = judge.predict([render(s)[0] for s in scenes])
    for attribute in ("shape", "colour", "pattern", "background", "size", "position"):
        accuracy = np.mean([p[attribute] == getattr(s, attribute) for p, s in zip(predicted, scenes)])
        assert accuracy >= 0.95, (attribute, accuracy)
    assert all(p["objects"] == "one" and p["left"] is None for p in predicted)
    pairs = [random_pair(rng) for _ in range(150)]
    predicted = judge.predict([render(s)[0] for s in pairs])
    for attribute in ("shape", "colour", "pattern", "size"):
        accuracy = np.mean([p[side][attribute] == getattr(t, attribute)
                            for p, s in zip(predicted, pairs) for side, t in zip(("left", "right"), s.things)])
        assert accuracy >= 0.95, (attribute, accuracy)
    assert all(p["objects"] == "two" and p["shape"] is None for p in predicted)  # a pair never reads as a lone concept
    traits = [[{"colour": t.colour, "shape": t.shape} for t in s.things] for s in pairs]
    assert np.mean([pair_shows(p, a, b) and pair_shows(p, b, a) for p, (a, b) in zip(predicted, traits)]) >= 0.9


@pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").exists(), reason="toy model not shipped")
def test_toy_model_loads_and_draws_the_asked_background():
    from personalize.backbone import load_backbone
    from personalize.generate import generate_images

    backbone = load_backbone("toy")
    assert backbone.default_resolution == 32 and len(backbone.tokenizers[0]) == 49408
    if not (WEIGHTS_DIR / "judge.safetensors").exists():
        pytest.skip("judge weights not shipped")
    judge = ToyJudge.load()
    images = generate_images(backbone, ["a large red square on a black background", "a large red square on a white background"],
                             [0, 1, 2, 3], steps=20, guidance=4.0)
    seen = judge.predict(images)
    assert np.mean([s["background"] == bg for s, bg in zip(seen, ["black"] * 4 + ["white"] * 4)]) >= 0.75


# -- the toy metrics and the bench's bookkeeping -----------------------------------------------------------------


class _FeatureJudge:
    """Stands in for the judge: the features are the images' mean colours."""

    def features(self, images):
        import torch

        return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) for im in images]))


def _solid(rgb):
    from PIL import Image

    return Image.new("RGB", (8, 8), rgb)


def test_toy_metrics_on_hand_made_readings():
    from personalize.evaluate import toy as T

    readings = [{"colour": "red", "shape": "star", "background": "pink"},
                {"colour": "red", "shape": "heart", "background": "black"},
                {"colour": "blue", "shape": "star", "background": "pink"},
                {"colour": "red", "shape": "star", "background": "white"}]
    assert T.concept_rate(readings, {"colour": "red", "shape": "star"}) == 0.5
    assert T.background_leakage(readings, "pink") == 0.5
    assert T.clean_foreground_rate(readings, {"colour": "red", "shape": "star"}, "pink") == 0.25  # only the white one
    asked = [{"background": "pink"}, {"background": "pink"}, {"background": "pink"}, {"background": "white"}]
    assert T.obeyed_rate(readings, asked) == 0.75
    with pytest.raises(PersonalizeError):
        T.obeyed_rate(readings, asked[:2])

    judge = _FeatureJudge()
    same = [_solid((200, 10, 10))] * 3
    assert T.diversity(judge, same) == pytest.approx(0.0, abs=1e-6)
    assert T.diversity(judge, [_solid((200, 0, 0)), _solid((0, 200, 0))]) == pytest.approx(1.0, abs=1e-6)  # orthogonal
    assert T.feature_similarity(judge, same, same) == pytest.approx(1.0, abs=1e-6)
    varied = [_solid((r, g, 40)) for r, g in [(10, 200), (200, 10), (90, 90), (150, 30), (30, 170)]]
    assert T.judge_frechet(judge, varied, varied) == pytest.approx(0.0, abs=1e-6)
    assert T.judge_frechet(judge, varied, same + same) > 100


def test_preview_curve_and_convergence(tmp_path):
    from personalize.generate import make_grid
    from personalize.toyworld.bench import preview_curve, steps_to_converge, summarise

    class ColourJudge:
        def predict(self, images):
            return [{"colour": "red" if np.asarray(im)[..., 0].mean() > 128 else "blue"} for im in images]

    (tmp_path / "validation").mkdir()
    for step, reds in ((20, 0), (40, 2), (60, 4), (80, 3)):
        tiles = [_solid((220, 0, 0)).resize((32, 32)) if i < reds else _solid((0, 0, 220)).resize((32, 32)) for i in range(4)]
        make_grid(tiles, 4).save(tmp_path / "validation" / f"step-{step:06d}.png")
    curve = preview_curve(tmp_path, ColourJudge(), {"colour": "red"})
    assert curve == {20: 0.0, 40: 0.5, 60: 1.0, 80: 0.75}
    assert steps_to_converge(curve) == 60  # first preview at >= 80 % of the best
    assert steps_to_converge({10: 0.0}) is None

    table = summarise([{"suite": "s", "method": "a", "seed": 0, "x": 1.0}, {"suite": "s", "method": "a", "seed": 1, "x": 3.0},
                       {"suite": "s", "method": "b", "seed": 0, "x": 0.5}])
    assert "| a | 2 | 2 ± 1.4 |" in table and "| b | 1 | 0.5 |" in table


def test_methods_option_keeps_only_the_named_rows(caplog):
    import logging

    from personalize.toyworld.bench import BenchConfig, select_runs

    runs = [("textual-inversion", 1), ("batex", 2), ("batex M=8", 3)]
    assert select_runs(BenchConfig(), "s", runs) == runs
    assert select_runs(BenchConfig(methods=["batex", "nope"]), "s", runs) == [("batex", 2)]
    with caplog.at_level(logging.WARNING, logger="personalize.bench"):
        assert select_runs(BenchConfig(methods=["nope"]), "s", runs) == []
    assert "textual-inversion, batex, batex M=8" in caplog.text


@pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").exists() or not (WEIGHTS_DIR / "judge.safetensors").exists(),
                    reason="toy model or judge not shipped")
def test_a_short_textual_inversion_run_learns_a_held_out_concept(tmp_path):
    """Training must move the judge's concept score well above the base model's for the bare init word."""
    from personalize.backbone import load_backbone
    from personalize.evaluate.toy import concept_rate
    from personalize.generate import generate_images, install_concept
    from personalize.methods import TextualInversionConfig
    from personalize.toyworld.bench import concept_traits, render_set
    from personalize.trainer import TrainConfig, train

    concept = HELD_OUT[1]  # blue striped star: "a star" draws any colour, mostly plain
    traits = concept_traits(concept)
    render_set(tmp_path / "images", 5, seed=1, **traits)
    train(TrainConfig(method="textual-inversion", model="toy", images=str(tmp_path / "images"), output=str(tmp_path / "run"),
                      steps=STEPS_TO_LEARN, lr=5e-3, num_validation_images=0, checkpointing_steps=10**9),
          TextualInversionConfig(init_word=traits["shape"]))
    judge = ToyJudge.load()
    seeds = list(range(16))

    def rate(backbone, prompt):
        return concept_rate(judge.predict(generate_images(backbone, [prompt], seeds, steps=20, guidance=4.0, batch_size=16)), traits)

    before = rate(load_backbone("toy"), f"a {traits['shape']}")
    backbone = load_backbone("toy")
    install_concept(backbone, tmp_path / "run")
    after = rate(backbone, "a <concept>")
    print(f"concept rate: base 'a {traits['shape']}' {before:.2f}, after Textual Inversion {after:.2f}")
    assert after >= before + 0.3, (before, after)
