"""The figures of benchmarks/README.md: the first row of several `personalize bench` sample grids, labelled and stacked.

A bench writes every trained run's samples to OUTPUT/grids/<suite>-<concept>-<row>-<seed>[...].png, 8 columns, the
same sampling seeds for every row of a suite; a figure puts the first 8 samples of the rows it compares under one
another, each with its label, so a reader sees the same starting noise through each row.

Usage:
    python benchmarks/figure_strip.py OUT.png "label one=DIR/grids/a.png" "label two=DIR/grids/b.png" ...
    python benchmarks/figure_strip.py OUT.png --columns 8 --label-width 230 "label=grid.png" ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from personalize.export import atomic_write


def first_row(grid: Path, columns: int) -> Image.Image:
    """The top row of a bench grid: square tiles, `columns` of them across."""
    try:
        image = Image.open(grid).convert("RGB")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"figure_strip: cannot read the grid {grid}: {exc}") from exc
    tile = image.width // columns
    if tile == 0 or image.height < tile:
        raise SystemExit(f"figure_strip: {grid} ({image.width}x{image.height}) is not a grid of {columns} columns")
    return image.crop((0, 0, tile * columns, tile))


def figure_strip(out: Path, labelled: list[tuple[str, Path]], columns: int = 8, label_width: int = 230) -> Path:
    """Stack each grid's first row under the one before, its label on the left; written atomically."""
    if not labelled:
        raise SystemExit("figure_strip: name at least one 'label=grid.png'")
    rows = [(label, first_row(grid, columns)) for label, grid in labelled]
    width = label_width + max(row.width for _, row in rows)
    canvas = Image.new("RGB", (width, sum(row.height for _, row in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 11)
    except OSError:  # no DejaVu on this machine: PIL's own bitmap font
        font = ImageFont.load_default()
    top = 0
    for label, row in rows:
        canvas.paste(row, (label_width, top))
        draw.text((6, top + row.height // 2 - 6), label, fill="black", font=font)
        top += row.height
    return atomic_write(out, lambda tmp: canvas.save(tmp, format="PNG"))


def parse_labelled(items: list[str]) -> list[tuple[str, Path]]:
    """'label=path' pairs; the label may hold '=' itself, the path (after the last '=') may not."""
    pairs = []
    for item in items:
        label, sep, path = item.rpartition("=")
        if not sep or not label:
            raise SystemExit(f"figure_strip: {item!r} is not 'label=grid.png'")
        pairs.append((label, Path(path)))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("rows", nargs="+", help="'label=grid.png', top row first")
    parser.add_argument("--columns", type=int, default=8, help="columns of the bench grids (default: 8)")
    parser.add_argument("--label-width", type=int, default=230, help="pixels left of the samples for the labels")
    args = parser.parse_args(argv)
    path = figure_strip(args.out, parse_labelled(args.rows), args.columns, args.label_width)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
