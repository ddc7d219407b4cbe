"""Image folders: every odd file a user may have gets a defined, correct outcome."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.data import IMAGE_EXTENSIONS, TrainImage, load_image_folder, load_rgb, to_training_tensor
from personalize.errors import PersonalizeError

RED = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _px(img: Image.Image, xy=(0, 0)) -> tuple:
    assert img.mode == "RGB"
    return img.getpixel(xy)


# ------------------------------------------------------------------------------------------------- load_rgb


def test_grayscale_bilevel_and_cmyk_become_rgb(tmp_path):
    assert _px(load_rgb(_save(Image.new("L", (8, 8), 100), tmp_path / "l.png"))) == (100, 100, 100)
    assert _px(load_rgb(_save(Image.new("1", (8, 8), 1), tmp_path / "one.bmp"))) == (255, 255, 255)
    # CMYK (0, 0, 0, 0) is white paper; (0, 255, 255, 0) is red ink. JPEG is lossy: allow a little.
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    cmyk.paste((0, 255, 255, 0), (0, 0, 4, 8))
    out = load_rgb(_save(cmyk, tmp_path / "cmyk.jpg", quality=100))
    assert out.size == (8, 8)
    assert np.abs(np.array(_px(out, (6, 4))) - (255, 255, 255)).max() <= 3
    assert np.abs(np.array(_px(out, (1, 4))) - (255, 0, 0)).max() <= 3


def test_rgba_transparency_becomes_white(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # red, but fully transparent...
    rgba.paste((255, 0, 0, 255), (0, 0, 16, 32))  # ...except the left half
    path = _save(rgba, tmp_path / "a.png")
    out = load_rgb(path)
    assert _px(out, (24, 5)) == (255, 255, 255) and _px(out, (4, 5)) == (255, 0, 0)
    pixels = to_training_tensor(out, 32)
    assert torch.allclose(pixels[:, :, 20:], torch.ones(3, 32, 12))  # transparent -> white -> 1.0
    assert torch.allclose(pixels[:, :, :12], RED.expand(3, 32, 12))


def test_half_transparent_pixel_is_blended_with_white(tmp_path):
    out = load_rgb(_save(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), tmp_path / "half.png"))
    assert all(abs(c - 127) <= 1 for c in _px(out))


def test_la_becomes_gray_on_white(tmp_path):
    la = Image.new("LA", (8, 8), (40, 0))
    la.paste((40, 255), (0, 0, 4, 8))
    out = load_rgb(_save(la, tmp_path / "la.png"))
    assert _px(out, (1, 1)) == (40, 40, 40) and _px(out, (6, 1)) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)  # 0 = blue, 1 = green
    palette.putpixel((3, 3), 1)
    plain = load_rgb(_save(palette, tmp_path / "p.png"))
    assert _px(plain) == (0, 0, 255) and _px(plain, (3, 3)) == (0, 255, 0)
    see_through = load_rgb(_save(palette, tmp_path / "pt.png", transparency=0))  # entry 0 (blue) transparent
    assert _px(see_through) == (255, 255, 255) and _px(see_through, (3, 3)) == (0, 255, 0)


def test_16bit_png_gradient_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode == "I;16"  # what Pillow makes of a 16-bit grayscale PNG
    out = np.asarray(load_rgb(path))
    assert out[0, :, 0].tolist() == [0, 1, 4, 128, 255]  # v * 255 / 65535, rounded; clipping gives 255 from 257 on
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_big_endian_and_32bit_tiffs_are_scaled(tmp_path):
    big_endian = Image.fromarray(np.array([[0, 32768, 65535]], dtype=">u2"))
    assert big_endian.mode == "I;16B"
    assert np.asarray(load_rgb(_save(big_endian, tmp_path / "be.tif")))[0, :, 0].tolist() == [0, 128, 255]
    as_int = Image.fromarray(np.array([[0, 16384, 32768]], dtype=np.int32))  # mode "I" holding 16-bit data
    assert np.asarray(load_rgb(_save(as_int, tmp_path / "i.tif")))[0, :, 0].tolist() == [0, 64, 128]
    widened = Image.fromarray(np.array([[0, 100, 200]], dtype=np.int32))  # mode "I" holding 8-bit data
    assert np.asarray(load_rgb(_save(widened, tmp_path / "i8.tif")))[0, :, 0].tolist() == [0, 100, 200]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))  # mode "F", normalised
    assert np.asarray(load_rgb(_save(as_float, tmp_path / "f.tif")))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("orientation, top, bottom", [(6, "red", "blue"), (8, "blue", "red"), (1, None, None)])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # the left half is red, the right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: rotate 90 degrees clockwise to display, 8: counter-clockwise, 1: as stored
    out = load_rgb(_save(img, tmp_path / "rot.jpg", exif=exif, quality=95))
    if orientation == 1:
        assert out.size == (40, 20)
        return
    assert out.size == (20, 40)

    def colour(xy):
        r, _, b = _px(out, xy)
        return "red" if r > 200 and b < 60 else "blue" if b > 200 and r < 60 else "other"

    assert (colour((10, 5)), colour((10, 35))) == (top, bottom)


def test_truncated_jpeg_names_the_file(tmp_path):
    rng = np.random.default_rng(0)
    full = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "full.jpg")
    cut = tmp_path / "cut_in_half.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(PersonalizeError, match="cut_in_half.jpg"):
        load_rgb(cut)


def test_truncated_png_and_fake_image_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    full = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(PersonalizeError, match="cut.png"):
        load_rgb(tmp_path / "cut.png")
    (tmp_path / "fake.webp").write_text("hello")
    with pytest.raises(PersonalizeError, match="fake.webp"):
        load_rgb(tmp_path / "fake.webp")


def test_truncated_image_does_not_flip_the_global_pillow_switch(tmp_path):
    from PIL import ImageFile

    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 10)
    with pytest.raises(PersonalizeError):
        load_rgb(tmp_path / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ------------------------------------------------------------------------------------------ to_training_tensor


def test_training_tensor_shape_dtype_range_and_colours():
    t = to_training_tensor(Image.new("RGB", (10, 10), (255, 0, 128)), 4)
    assert t.shape == (3, 4, 4) and t.dtype == torch.float32
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))
    rng = np.random.default_rng(0)
    noisy = to_training_tensor(Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)), 16)
    assert noisy.shape == (3, 16, 16) and noisy.min() >= -1 and noisy.max() <= 1


@pytest.mark.parametrize("size", [(60, 30), (30, 60)])
def test_non_square_is_centre_cropped(size):
    img = Image.new("RGB", size, (0, 0, 255))
    w, h = size
    img.paste((255, 0, 0), (w // 4, 0, 3 * w // 4, h) if w > h else (0, h // 4, w, 3 * h // 4))  # red middle
    t = to_training_tensor(img, 16)
    assert t.shape == (3, 16, 16)
    assert (t[:, 2:14, 2:14] - RED).abs().max() < 0.05  # only the red middle survives the crop


def test_downscale_keeps_the_whole_short_side():
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    img.paste((255, 0, 0), (50, 0, 150, 3))  # a thin red line at the very top of the centre square
    t = to_training_tensor(img, 20)
    assert t[0, 0, 10] > 0 and t[0, -1, 10] < -0.9  # the top row was kept (no vertical crop), the bottom is blue


# ------------------------------------------------------------------------------------------- load_image_folder


def test_folder_sorted_with_captions_and_skips(tmp_path, caplog):
    for name, colour in [("c.png", (0, 0, 255)), ("a.jpg", (0, 255, 0)), ("B.webp", (255, 0, 0))]:
        _save(Image.new("RGB", (64, 48), colour), tmp_path / name)
    _save(Image.new("L", (64, 64), 255), tmp_path / "a.mask.png")
    (tmp_path / "a.txt").write_text("  a green square \n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("   \n")  # blank caption = no caption
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "B.WEBP.bak").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / ".hidden.png").write_bytes(b"not even an image")
    (tmp_path / "sub").mkdir()
    _save(Image.new("RGB", (64, 64)), tmp_path / "sub" / "deep.png")
    with caplog.at_level(logging.INFO, logger="personalize.data"):
        images = load_image_folder(str(tmp_path), 32)
    assert [i.path.name for i in images] == ["B.webp", "a.jpg", "c.png"]  # by name, case-sensitive
    assert all(isinstance(i, TrainImage) for i in images)
    assert [i.caption for i in images] == [None, "a green square", None]
    assert "notes.json" in caplog.text and "B.WEBP.bak" in caplog.text and "sub" in caplog.text
    assert ".DS_Store" not in caplog.text and "a.txt" not in caplog.text and "mask" not in caplog.text
    assert all(r.levelno == logging.INFO for r in caplog.records)
    for im in images:
        assert im.pixels.shape == (3, 32, 32) and im.pixels.dtype == torch.float32
        assert im.pixels.min() >= -1 and im.pixels.max() <= 1
    assert images[0].pixels[0].mean() > 0.99  # B.webp is red: the images are not shuffled against their paths


def test_uppercase_extensions_are_images(tmp_path):
    _save(Image.new("RGB", (40, 40)), tmp_path / "PHOTO.JPG")
    (tmp_path / "PHOTO.txt").write_text("caption")
    (image,) = load_image_folder(tmp_path, 32)
    assert image.path.name == "PHOTO.JPG" and image.caption == "caption"


def test_small_image_warns_with_name_and_size(tmp_path, caplog):
    _save(Image.new("RGB", (60, 30), (0, 0, 255)), tmp_path / "tiny.png")
    _save(Image.new("RGB", (80, 80), (0, 0, 255)), tmp_path / "big.png")
    with caplog.at_level(logging.WARNING, logger="personalize.data"):
        images = load_image_folder(tmp_path, 64)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "tiny.png" in warnings[0].getMessage() and "60x30" in warnings[0].getMessage()
    assert [i.pixels.shape for i in images] == [(3, 64, 64)] * 2


def test_custom_logger_is_used(tmp_path, caplog):
    _save(Image.new("RGB", (8, 8)), tmp_path / "small.png")
    with caplog.at_level(logging.WARNING, logger="my.app"):
        load_image_folder(tmp_path, 16, log=logging.getLogger("my.app"))
    assert [r.name for r in caplog.records] == ["my.app"]


def test_undecodable_images_in_folder_are_all_named(tmp_path):
    _save(Image.new("RGB", (64, 64)), tmp_path / "good.png")
    (tmp_path / "fake.png").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(PersonalizeError) as err:
        load_image_folder(tmp_path, 32)
    assert "fake.png" in str(err.value) and "empty.jpg" in str(err.value)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(PersonalizeError, match=r"nope.*does not exist"):
        load_image_folder(tmp_path / "nope", 32)
    file = _save(Image.new("RGB", (8, 8)), tmp_path / "one.png")
    with pytest.raises(PersonalizeError, match=r"one.png is not a folder"):
        load_image_folder(file, 32)


def test_folder_without_images(tmp_path):
    with pytest.raises(PersonalizeError, match="has no images"):
        load_image_folder(tmp_path, 32)
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "only.mask.png").write_bytes(b"")
    with pytest.raises(PersonalizeError) as err:
        load_image_folder(tmp_path, 32)
    assert str(tmp_path) in str(err.value) and "has no images" in str(err.value)
    assert all(ext in str(err.value) for ext in IMAGE_EXTENSIONS)


def test_real_dreambench_photos():
    from conftest import EXAMPLE_IMAGES  # DreamBench's "cat", shipped in the repository: nothing to skip

    images = load_image_folder(EXAMPLE_IMAGES, 32)
    assert [i.path.name for i in images] == sorted(i.path.name for i in images)
    assert len(images) == 5 and all(i.pixels.shape == (3, 32, 32) for i in images)
    assert all(i.pixels.std() > 0.05 for i in images)  # real content, not a blank
