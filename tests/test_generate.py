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
