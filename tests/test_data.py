"""Image folders: every odd file a user may have gets a defined, correct outcome."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.data import load_image_folder, load_rgb, to_training_tensor
from personalize.errors import PersonalizeError


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_modes_become_8bit_rgb(tmp_path):
    cases = {
        "l.png": Image.new("L", (8, 8), 100),
        "la.png": Image.new("LA", (8, 8), (100, 255)),
        "p.png": Image.new("P", (8, 8), 3),
        "cmyk.jpg": Image.new("CMYK", (8, 8), (0, 0, 0, 0)),
        "one.bmp": Image.new("1", (8, 8), 1),
    }
    for name, img in cases.items():
        out = load_rgb(_save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == (8, 8), name
    assert load_rgb(tmp_path / "l.png").getpixel((0, 0)) == (100, 100, 100)
    assert max(abs(c - 255) for c in load_rgb(tmp_path / "cmyk.jpg").getpixel((0, 0))) <= 2  # CMYK 0 = white


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = load_rgb(_save(rgba, tmp_path / "a.png"))
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    palette.info["transparency"] = 0
    assert load_rgb(_save(palette, tmp_path / "p.png", transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    data = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    path = _save(Image.fromarray(data), tmp_path / "deep.png")  # mode I;16
    out = np.asarray(load_rgb(path))[0, :, 0].tolist()
    assert out == [0, 128, 255, 4]


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)
    top = out.getpixel((10, 5))
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top


def test_truncated_and_fake_images_name_the_file(tmp_path):
    good = _save(Image.new("RGB", (64, 64), (10, 200, 30)), tmp_path / "full.jpg", quality=95)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(PersonalizeError, match="cut.jpg"):
        load_image_folder(tmp_path, 32)
    (tmp_path / "cut.jpg").unlink()
    (tmp_path / "fake.png").write_text("hello")
    with pytest.raises(PersonalizeError, match="fake.png"):
        load_image_folder(tmp_path, 32)


def test_folder_rules(tmp_path, caplog):
    _save(Image.new("RGB", (64, 48), (0, 0, 255)), tmp_path / "b.png")
    _save(Image.new("RGB", (64, 64), (0, 255, 0)), tmp_path / "a.jpg")
    _save(Image.new("L", (64, 64), 255), tmp_path / "a.mask.png")
    (tmp_path / "a.txt").write_text("  a green square \n")
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.INFO, logger="personalize.data"):
        images = load_image_folder(tmp_path, 32)
    assert [i.path.name for i in images] == ["a.jpg", "b.png"]
    assert images[0].caption == "a green square" and images[1].caption is None
    assert "notes.json" in caplog.text
    for im in images:
        assert im.pixels.shape == (3, 32, 32) and im.pixels.dtype == torch.float32
        assert im.pixels.min() >= -1 and im.pixels.max() <= 1


def test_small_images_warn_and_non_square_are_centre_cropped(tmp_path, caplog):
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (15, 0, 45, 30))  # the middle is red
    _save(img, tmp_path / "wide.png")
    with caplog.at_level(logging.WARNING, logger="personalize.data"):
        (image,) = load_image_folder(tmp_path, 64)
    assert "wide.png" in caplog.text and "60x30" in caplog.text
    assert image.pixels.shape == (3, 64, 64)
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    assert (image.pixels[:, 8:56, 8:56] - red).abs().max() < 0.05


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(PersonalizeError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 32)
    with pytest.raises(PersonalizeError, match="no images"):
        load_image_folder(tmp_path, 32)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(PersonalizeError, match=r"no images \(accepted: .bmp, .jpeg"):
        load_image_folder(tmp_path, 32)


def test_training_tensor_keeps_colours():
    t = to_training_tensor(Image.new("RGB", (10, 10), (255, 0, 128)), 4)
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))


def test_real_dreambench_photos(dreambench):
    for subject in ("cat", "dog", "red_cartoon"):
        images = load_image_folder(dreambench / subject, 32)
        assert len(images) >= 4 and all(i.pixels.shape == (3, 32, 32) for i in images)
        assert all(i.pixels.std() > 0.05 for i in images)  # real content, not a blank
