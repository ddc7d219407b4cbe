"""benchmarks/figure_strip.py: the README's figures are the first rows of bench grids, labelled and stacked."""

import importlib.util

import pytest
from PIL import Image

from conftest import REPO

spec = importlib.util.spec_from_file_location("figure_strip", REPO / "benchmarks" / "figure_strip.py")
figure_strip = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figure_strip)


def grid(path, top, bottom, columns=8, tile=16):
    """A 2-row grid whose first row is `top` and second `bottom`, as a bench writes one."""
    image = Image.new("RGB", (columns * tile, 2 * tile), bottom)
    image.paste(Image.new("RGB", (columns * tile, tile), top), (0, 0))
    image.save(path)
    return path


def test_stacks_the_first_row_of_each_grid_under_its_label(tmp_path):
    red = grid(tmp_path / "red.png", (255, 0, 0), (0, 0, 255))
    green = grid(tmp_path / "green.png", (0, 255, 0), (0, 0, 255))
    out = tmp_path / "figs" / "strip.png"
    assert figure_strip.main([str(out), f"lr=1e-4 row={red}", f"second={green}", "--label-width", "100"]) == 0
    figure = Image.open(out).convert("RGB")
    assert figure.size == (100 + 8 * 16, 2 * 16)  # one tile-high row per grid, its second row left out
    assert figure.getpixel((100 + 5, 8)) == (255, 0, 0)
    assert figure.getpixel((100 + 5, 16 + 8)) == (0, 255, 0)
    label = figure.crop((0, 0, 100, 16))
    assert min(label.convert("L").getdata()) < 128  # the label's text is drawn in the left margin
    assert [p.name for p in out.parent.iterdir()] == ["strip.png"]  # written atomically: no temporary left


def test_bad_input_names_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="broken.png"):
        figure_strip.main([str(tmp_path / "out.png"), f"row={broken}"])
    with pytest.raises(SystemExit, match="not 'label=grid.png'"):
        figure_strip.main([str(tmp_path / "out.png"), str(broken)])
