"""Aspect-ratio buckets: images keep their shape, the cache holds it, a batch never mixes buckets, SDXL follows."""

import pytest
import torch
from PIL import Image

from personalize import cli
from personalize.backbone import load_backbone, sdxl_time_ids
from personalize.data import Buckets, load_image_folder
from personalize.latents import LatentCache


def _stripes(size):
    """Vertical stripes of period 8 (so any crop of the long side would show)."""
    image = Image.new("RGB", size, "white")
    for x in range(0, size[0], 8):
        image.paste((200, 20, 20), (x, 0, x + 4, size[1]))
    return image


def test_bucket_sizes_are_multiples_of_the_step_near_the_area():
    sizes = Buckets(512, 64).sizes()
    assert (512, 512) in sizes and (640, 320) in sizes and (320, 640) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and 0.75 * 512**2 <= w * h <= 512**2 and max(w / h, h / w) <= 2


def test_a_two_to_one_image_is_not_cropped_and_the_cache_holds_its_shape(tmp_path):
    _stripes((160, 80)).save(tmp_path / "wide.png")
    (image,) = load_image_folder(tmp_path, 32, buckets=Buckets(32, 4))
    assert image.pixels.shape == (3, 20, 40)  # 2:1 at about 32² pixels: 40x20, nothing cut
    assert image.crop_top_left == (0, 0) and image.resized_size == (20, 40)
    square = load_image_folder(tmp_path, 32)[0]
    assert square.pixels.shape == (3, 32, 32) and square.crop_top_left == (0, 16)  # without buckets: half of it lost
    cache = LatentCache(load_backbone("tiny"), [image.pixels], True, "cpu")
    assert cache.sizes == [(10, 20)]  # the VAE's 2× down: 10×20 latents, mirrors included
    latents, rows, _ = cache.sample(4, torch.Generator().manual_seed(0))
    assert latents.shape == (4, 4, 10, 20)


def test_images_are_never_upscaled_beyond_the_limit(tmp_path):
    _stripes((24, 12)).save(tmp_path / "small.png")
    (image,) = load_image_folder(tmp_path, 32, buckets=Buckets(32, 4))
    assert image.pixels.shape == (3, 12, 24)  # its own size: not blown up to 40x20
    (image,) = load_image_folder(tmp_path, 32, buckets=Buckets(32, 4, max_upscale=1.5))
    assert image.pixels.shape == (3, 16, 36)  # at most 1.5×, on the step grid


def test_a_batch_never_mixes_buckets_and_every_bucket_is_drawn(tmp_path):
    backbone = load_backbone("tiny")
    pixels = [torch.zeros(3, 20, 40), torch.zeros(3, 32, 32), torch.ones(3, 20, 40), torch.zeros(3, 40, 20)]
    cache = LatentCache(backbone, pixels, True, "cpu")
    assert sorted(cache.sizes) == [(10, 20), (16, 16), (20, 10)]
    bucket_of = {0: (10, 20), 2: (10, 20), 1: (16, 16), 3: (20, 10)}
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        latents, rows, _ = cache.sample(3, g)
        assert {bucket_of[int(r)] for r in rows} == {tuple(latents.shape[-2:])}  # one bucket per batch
        seen.add(tuple(latents.shape[-2:]))
    assert seen == {(10, 20), (16, 16), (20, 10)}


def test_training_with_buckets_uses_each_images_shape_and_sdxl_conditioning(tmp_path, monkeypatch):
    from personalize.backbone import Backbone

    _stripes((160, 80)).save(tmp_path / "wide.png")
    _stripes((60, 60)).save(tmp_path / "square.png")
    images = load_image_folder(tmp_path, 32, buckets=Buckets(32, 4))
    ids = sdxl_time_ids(images, flip=True)
    assert ids.tolist() == [[60, 60, 0, 0, 32, 32], [80, 160, 0, 0, 20, 40],  # target size = the bucket
                            [60, 60, 0, 0, 32, 32], [80, 160, 0, 0, 20, 40]]
    seen = []
    original = Backbone.unet_forward

    def spy(self, noisy, t, embeds, pooled=None, time_ids=None):
        seen.append((tuple(noisy.shape[-2:]), None if time_ids is None else time_ids[:, 4:].tolist()))
        return original(self, noisy, t, embeds, pooled, time_ids)

    monkeypatch.setattr(Backbone, "unet_forward", spy)
    assert cli.main(["train", "--model", "tiny-xl", "--images", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--init-word", "cat", "--steps", "12", "--batch-size", "2", "--num-validation-images", "0", "--buckets"]) == 0
    shapes = {shape for shape, _ in seen}
    assert shapes == {(10, 20), (16, 16)}
    for shape, targets in seen:
        assert {tuple(t) for t in targets} == {(shape[0] * 2, shape[1] * 2)}  # each row's target size = its bucket


def test_buckets_are_refused_where_they_cannot_apply(tmp_path, capsys):
    assert cli.main(["train", "--method", "singleinsert", "--images", str(tmp_path), "--class-word", "cat",
                     "--output", str(tmp_path / "o"), "--buckets"]) == 2
    assert "--buckets does not apply to singleinsert" in capsys.readouterr().err
