"""Sampling: an image depends on its prompt and seed, not on how many are drawn at once."""

import numpy as np
import pytest

from personalize.backbone import load_backbone
from personalize.generate import generate_images


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_batched_sampling_draws_the_same_images_as_one_by_one(model):
    backbone = load_backbone(model)
    one = generate_images(backbone, ["a cat", "a dog"], [3, 4, 5], steps=3, batch_size=1)
    batched = generate_images(backbone, ["a cat", "a dog"], [3, 4, 5], steps=3, batch_size=2)
    assert len(batched) == 6
    for a, b in zip(one, batched):
        assert np.abs(np.asarray(a, float) - np.asarray(b, float)).max() <= 1  # one grey level of float rounding
    assert np.abs(np.asarray(one[0], float) - np.asarray(one[1], float)).max() > 10  # seeds differ


def test_generate_renames_a_concepts_token_at_load_so_two_runs_of_one_token_both_draw(tmp_path, capsys):
    import torch

    from personalize import cli
    from personalize.export import save_embeddings

    for name, seed in (("a", 1), ("b", 2)):  # two runs that both trained "<concept>"
        vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(seed)) * 5
        save_embeddings(tmp_path / name, "<concept>", [vectors], step=1, model_name="tiny")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")

    def generate(out, *args):
        return cli.main(["generate", "--model", "tiny", "--steps", "2", "--num-images", "1", *args, "--output", str(tmp_path / out)])

    def image(out, index=0):
        from PIL import Image

        return np.asarray(Image.open(tmp_path / out / f"{index:02d}-0.png"), dtype=float)

    assert generate("clash", "--concept", a, "--concept", b, "--prompt", "a <concept>") == 2
    advice = "--token '' --token '<my-concept>'"
    assert advice in capsys.readouterr().err  # advice in generate's own options, in --concept order
    assert generate("advised", "--concept", a, "--concept", b, *advice.replace("'", "").split(" "),
                    "--prompt", "a <concept>", "--prompt", "a <my-concept>") == 0
    assert generate("only-a", "--concept", a, "--prompt", "a <concept>") == 0
    assert generate("only-b", "--concept", b, "--token", "<b>", "--prompt", "a <b>") == 0
    # Each concept draws its own vectors: as when loaded alone, and not the other's.
    assert np.abs(image("advised", 0) - image("only-a")).max() <= 1
    assert np.abs(image("advised", 1) - image("only-b")).max() <= 1
    assert np.abs(image("only-a") - image("only-b")).max() > 4  # (the tiny model: 9 grey levels apart here)


def test_a_named_sampler_draws_differently_and_the_model_keeps_its_own(tmp_path):
    """`--sampler euler-a` (what A1111/ComfyUI users pick by name) changes the drawing; the model's scheduler is back
    after, so training previews keep sampling with the model's own."""
    from personalize.errors import PersonalizeError

    backbone = load_backbone("tiny")
    own = type(backbone.pipe.scheduler)
    default = np.asarray(generate_images(backbone, ["a cat"], [3], steps=4)[0], float)
    ancestral = np.asarray(generate_images(backbone, ["a cat"], [3], steps=4, sampler="euler-a")[0], float)
    assert np.abs(default - ancestral).max() > 10
    assert type(backbone.pipe.scheduler) is own
    assert np.abs(default - np.asarray(generate_images(backbone, ["a cat"], [3], steps=4)[0], float)).max() <= 1
    with pytest.raises(PersonalizeError, match="unknown sampler 'k_lms'.*euler-a"):
        generate_images(backbone, ["a cat"], [3], steps=4, sampler="k_lms")
