"""Synthetic visual QA data ("shapes") for the glmtune quickstart.

Each image is 112x112 white with one filled shape (circle / square / triangle) in one of four saturated colours,
placed in one of the four quadrants. Each sample asks one of three fixed questions (colour, shape, position) whose
short exact answer can only be read from the image, so a tiny GLM-4.1V model (one image token = 28x28 px, i.e. a
4x4 token grid here, one 2x2 block of tokens per quadrant) learns it on a CPU in minutes, and its held-out exact
match can be compared with `blind_baseline_exact_match`, the best an image-ignoring model could do (~0.28).

    python scripts/make_shapes_data.py OUT [--train 2000] [--val 200] [--seed 0]

writes OUT/train.jsonl, OUT/val.jsonl (GLM-4 finetune-demo messages format, image paths relative to OUT) and
OUT/images/{train,val}_NNNNN.png. Output bytes depend only on the arguments (seeded RNG, PNGs carry no timestamp).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 112
QUADRANT = IMAGE_SIZE // 2  # 56 px = 2x2 image tokens of 28 px each

SHAPES = ("circle", "square", "triangle")
# Saturated, far apart in RGB so that a few bits of the patch embedding separate them; PIL draws without
# anti-aliasing, so every shape pixel has exactly one of these values (tests rely on that).
COLOURS = {
    "red": (220, 20, 20),
    "green": (20, 170, 40),
    "blue": (20, 50, 220),
    "yellow": (240, 200, 0),
}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "position": "Where is the shape?",
}
BACKGROUND = (255, 255, 255)

# Shape side / diameter in px: "most of its quadrant" (56 px) while leaving room for position jitter.
MIN_SIZE, MAX_SIZE = 38, 50
MARGIN = 2  # keep every shape at least this far from its quadrant's edges, so it never crosses the midlines


def draw_shape(shape: str, colour: str, quadrant: str, size: int, dx: int, dy: int) -> Image.Image:
    """One 112x112 RGB image: `shape` of side `size`, centred in `quadrant` shifted by (dx, dy) pixels."""
    if shape not in SHAPES or colour not in COLOURS or quadrant not in QUADRANTS:
        raise ValueError(f"unknown shape/colour/quadrant: {shape!r}, {colour!r}, {quadrant!r}")
    row, col = quadrant.split()
    cx = (QUADRANT if col == "right" else 0) + QUADRANT // 2 + dx
    cy = (QUADRANT if row == "bottom" else 0) + QUADRANT // 2 + dy
    # PIL boxes are inclusive on both ends, hence the -1 on the far edge.
    left, top = cx - size // 2, cy - size // 2
    right, bottom = left + size - 1, top + size - 1
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:  # upright isosceles triangle filling the box: the box centre is well inside it
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    return img


def _random_placement(rng: random.Random) -> tuple[int, int, int]:
    """Random size and centre offset that keep the shape inside its quadrant (with MARGIN)."""
    size = rng.randint(MIN_SIZE, MAX_SIZE)
    slack = max(0, (QUADRANT - size) // 2 - MARGIN)
    return size, rng.randint(-slack, slack), rng.randint(-slack, slack)


def _balanced_specs(rng: random.Random, n: int) -> list[tuple[str, str, str, str]]:
    """n (question kind, shape, colour, quadrant) tuples, as balanced as n allows.

    The full grid (3 kinds x 3 shapes x 4 colours x 4 quadrants = 432) is shuffled block by block instead of
    sampling each field independently: every answer then appears equally often per question (up to the last,
    partial block), so the blind baseline is the chance level and not a lucky skew of the draw.
    """
    grid = list(itertools.product(QUESTIONS, SHAPES, COLOURS, QUADRANTS))
    specs: list[tuple[str, str, str, str]] = []
    while len(specs) < n:
        block = grid[:]
        rng.shuffle(block)
        specs.extend(block)
    return specs[:n]


def _write_split(out_dir: Path, split: str, n: int, seed: int) -> Path:
    # One RNG per split, seeded from a string (hashed with sha512 by `random`, independent of PYTHONHASHSEED), so
    # the val set does not change when only --train changes.
    rng = random.Random(f"glmtune-shapes:{seed}:{split}")
    lines = []
    for i, (kind, shape, colour, quadrant) in enumerate(_balanced_specs(rng, n)):
        size, dx, dy = _random_placement(rng)
        rel = f"images/{split}_{i:05d}.png"
        # No pnginfo / no optimize: PIL then writes only IHDR/IDAT/IEND, i.e. the same bytes on every run.
        draw_shape(shape, colour, quadrant, size, dx, dy).save(out_dir / rel, format="PNG")
        answer = {"colour": colour, "shape": shape, "position": quadrant}[kind]
        row = {"messages": [
            {"role": "user", "content": QUESTIONS[kind], "image": rel},
            {"role": "assistant", "content": answer},
        ]}
        lines.append(json.dumps(row, ensure_ascii=False))
    path = out_dir / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make_shapes_data(out_dir, n_train: int = 2000, n_val: int = 200, seed: int = 0) -> dict:
    """Write the train/val jsonl files and images under `out_dir`; return their paths and counts."""
    if n_train < 1 or n_val < 1:
        raise ValueError(f"need at least one train and one val sample, got n_train={n_train}, n_val={n_val}")
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    # Drop images of an earlier, larger run so the folder holds exactly what the jsonl files reference.
    for stale in itertools.chain(images.glob("train_*.png"), images.glob("val_*.png")):
        stale.unlink()
    train = _write_split(out_dir, "train", n_train, seed)
    val = _write_split(out_dir, "val", n_val, seed)
    return {
        "out_dir": out_dir,
        "train": train,
        "val": val,
        "images": images,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
    }


def _qa_pairs(jsonl) -> list[tuple[str, str]]:
    """(question, answer) pairs of a messages jsonl file: each user turn with the assistant turn after it."""
    pairs = []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            for prev, cur in zip(messages, messages[1:]):
                if prev["role"] == "user" and cur["role"] == "assistant":
                    pairs.append((prev["content"].strip(), cur["content"].strip()))
    return pairs


def blind_baseline_exact_match(train_jsonl, val_jsonl) -> float:
    """Best val exact match of a model that sees the question but not the image.

    Such a model can at best answer each question text with its most frequent train answer; questions never seen
    in train get the overall most frequent train answer.
    """
    by_question: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for question, answer in _qa_pairs(train_jsonl):
        by_question[question][answer] += 1
        overall[answer] += 1
    if not overall:
        raise ValueError(f"no question/answer pairs in {train_jsonl}")
    fallback = overall.most_common(1)[0][0]
    val = _qa_pairs(val_jsonl)
    if not val:
        raise ValueError(f"no question/answer pairs in {val_jsonl}")
    hits = 0
    for question, answer in val:
        counts = by_question.get(question)
        guess = counts.most_common(1)[0][0] if counts else fallback
        hits += guess == answer
    return hits / len(val)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (created if missing)")
    parser.add_argument("--train", type=int, default=2000, help="number of train samples (default 2000)")
    parser.add_argument("--val", type=int, default=200, help="number of val samples (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    info = make_shapes_data(args.out, args.train, args.val, args.seed)
    blind = blind_baseline_exact_match(info["train"], info["val"])
    print(f"wrote {info['n_train']} train + {info['n_val']} val samples to {info['out_dir']} "
          f"(seed {args.seed}, {time.perf_counter() - start:.1f}s); blind baseline exact match {blind:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
