"""Regenerate the tiny PNGs that the samples under data_formats/ refer to.

    python scripts/make_format_samples.py [--out data_formats]

Each image is 32x32, white, with one flat shape drawn without anti-aliasing, so the files are a
few hundred bytes and their pixels depend only on the table below (PNGs carry no timestamp).
The data files next to them (train.jsonl, dataset.json, train.json) are written by hand: they are
the documentation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 32
COLOURS = {"red": (220, 20, 20), "green": (20, 170, 40), "blue": (20, 50, 220), "yellow": (240, 200, 0)}

# data_formats/<format>/images/<colour>_<shape>.png
IMAGES = {
    "glm4": ["red_square", "blue_circle"],
    "visualglm": ["green_triangle", "yellow_square", "red_circle"],
    "llava": ["blue_square", "green_circle"],
    "sharegpt": ["red_triangle", "blue_triangle", "yellow_circle"],
}


def draw(name: str) -> Image.Image:
    """The image called `name` ("<colour>_<shape>")."""
    colour, shape = name.split("_")
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    box = (6, 6, SIZE - 7, SIZE - 7)
    fill = COLOURS[colour]
    if shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([(SIZE // 2, 6), (SIZE - 7, SIZE - 7), (6, SIZE - 7)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data_formats")
    args = parser.parse_args()
    for fmt, names in IMAGES.items():
        folder = args.out / fmt / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            path = folder / f"{name}.png"
            # A 4-colour palette keeps each file at a few hundred bytes.
            draw(name).quantize(colors=4, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                path, optimize=True
            )
            print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
