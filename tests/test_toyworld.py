"""The toy world: exact renders and masks, captions from real CLIP words, held-out concepts, the judge."""

import random

import numpy as np
import pytest

from personalize.errors import PersonalizeError
from personalize.tiny import clip_tokenizer
from personalize.toyworld import TOY_MODEL_DIR
from personalize.toyworld.judge import WEIGHTS_DIR, ToyJudge, parse_target
from personalize.toyworld.world import (
    BACKGROUNDS, COLOURS, HELD_OUT, PATTERNS, POSITIONS, SHAPES, SIZES, Scene, caption, random_scene, render,
)


def test_render_is_exact_and_seeded():
    scene = Scene("square", "red", "plain", "gray", "large", "center")
    image, mask = render(scene)
    pixels = np.asarray(image)
    assert image.size == (32, 32) and mask.shape == (32, 32)
    assert (np.abs(pixels[mask] - COLOURS["red"]).max(axis=1) <= 40).mean() > 0.95  # inside: the colour
    assert (pixels[~mask] == BACKGROUNDS["gray"]).all(axis=1).mean() > 0.9  # outside: the background
    assert 0.2 < mask.mean() < 0.6
    a, b = random.Random(3), random.Random(3)
    assert random_scene(a) == random_scene(b)


def test_held_out_concepts_are_never_named_whole():
    rng = random.Random(0)
    for colour, shape, pattern in HELD_OUT:
        scene = Scene(shape, colour, pattern, "white", "large", "center")
        for _ in range(200):
            text = caption(scene, rng, drop=0.0)
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


@pytest.mark.skipif(not (WEIGHTS_DIR / "judge.safetensors").exists(), reason="judge weights not shipped")
def test_shipped_judge_reads_fresh_renders():
    rng = random.Random(123)
    scenes = [random_scene(rng, size="large") for _ in range(200)]
    predicted = ToyJudge.load().predict([render(s)[0] for s in scenes])
    for attribute in ("shape", "colour", "background"):
        accuracy = np.mean([p[attribute] == getattr(s, attribute) for p, s in zip(predicted, scenes)])
        assert accuracy > 0.9, (attribute, accuracy)


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
