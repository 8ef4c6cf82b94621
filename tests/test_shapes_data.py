"""Tests for scripts/make_shapes_data.py (the quickstart's synthetic visual QA data)."""

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shapes_data.py"


def _load_module():
    # scripts/ is not a package: load the file directly, as the quickstart would.
    spec = importlib.util.spec_from_file_location("make_shapes_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


shapes = _load_module()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return shapes.make_shapes_data(out, n_train=600, n_val=120, seed=0)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_counts_and_format(data):
    assert data["n_train"] == 600 and data["n_val"] == 120
    train, val = _rows(data["train"]), _rows(data["val"])
    assert len(train) == 600 and len(val) == 120
    assert len(list(Path(data["images"]).glob("*.png"))) == 720
    for row in train + val:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"] in shapes.QUESTIONS.values()
        # relative to the jsonl file's folder
        assert not Path(user["image"]).is_absolute()
        assert (Path(data["out_dir"]) / user["image"]).is_file()


def test_deterministic(tmp_path):
    a = shapes.make_shapes_data(tmp_path / "a", 50, 10, seed=3)
    b = shapes.make_shapes_data(tmp_path / "b", 50, 10, seed=3)
    c = shapes.make_shapes_data(tmp_path / "c", 50, 10, seed=4)
    assert _tree_bytes(a["out_dir"]) == _tree_bytes(b["out_dir"])
    tree_c = _tree_bytes(c["out_dir"])
    assert tree_c["train.jsonl"] != _tree_bytes(a["out_dir"])["train.jsonl"]
    assert tree_c["images/train_00000.png"] != _tree_bytes(a["out_dir"])["images/train_00000.png"]


def test_rerun_smaller_removes_stale_images(tmp_path):
    shapes.make_shapes_data(tmp_path, 30, 10, seed=0)
    shapes.make_shapes_data(tmp_path, 5, 2, seed=0)
    assert len(list((tmp_path / "images").glob("*.png"))) == 7


def _check_answer(image_path, question, answer):
    img = Image.open(image_path)
    assert img.size == (112, 112) and img.mode == "RGB"
    pixels = np.asarray(img).astype(int)
    shape_mask = (pixels != 255).any(axis=-1)
    ys, xs = np.nonzero(shape_mask)
    # "fills most of its quadrant": the shape spans at least 2/3 of the 56 px quadrant both ways
    assert ys.max() - ys.min() + 1 >= 37 and xs.max() - xs.min() + 1 >= 37, image_path

    if question == shapes.QUESTIONS["colour"]:
        # the pixel centroid lies inside every shape (convex); its 3x3 neighbourhood is the declared colour
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        patch = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3)
        assert (patch == shapes.COLOURS[answer]).all(), (image_path, answer, patch[0])
        # and every non-white pixel is that exact colour (no anti-aliasing)
        assert (pixels[shape_mask] == shapes.COLOURS[answer]).all()
    elif question == shapes.QUESTIONS["position"]:
        row, col = answer.split()
        rows = slice(56, 112) if row == "bottom" else slice(0, 56)
        cols = slice(56, 112) if col == "right" else slice(0, 56)
        assert shape_mask[rows, cols].sum() == shape_mask.sum(), (image_path, answer)
    else:
        # fill ratio of the bounding box tells the shapes apart: square 1, circle pi/4, triangle 1/2
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill = shape_mask.sum() / box
        expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[answer]
        assert abs(fill - expected) < 0.06, (image_path, answer, fill)


def test_answers_match_images(data):
    for split in ("train", "val"):
        for row in _rows(data[split]):
            user, assistant = row["messages"]
            _check_answer(Path(data["out_dir"]) / user["image"], user["content"], assistant["content"])


def test_balanced(data):
    rows = _rows(data["train"])
    by_question = {q: Counter() for q in shapes.QUESTIONS.values()}
    for row in rows:
        user, assistant = row["messages"]
        by_question[user["content"]][assistant["content"]] += 1
    for question, counts in by_question.items():
        n = sum(counts.values())
        assert abs(n - len(rows) / 3) < 0.1 * len(rows), (question, n)
        expected = shapes.SHAPES if question == shapes.QUESTIONS["shape"] else (
            shapes.QUADRANTS if question == shapes.QUESTIONS["position"] else tuple(shapes.COLOURS))
        assert set(counts) == set(expected)
        assert max(counts.values()) - min(counts.values()) <= 0.25 * n / len(expected) + 2, (question, counts)


def test_blind_baseline(data):
    blind = shapes.blind_baseline_exact_match(data["train"], data["val"])
    # chance per question kind: 1/4 colour, 1/3 shape, 1/4 position -> about 0.28
    assert 0.2 < blind < 0.4


def test_blind_baseline_sees_question_text(tmp_path):
    # A dataset where the question gives the answer away must have a perfect blind baseline.
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("sky?", "blue"), ("grass?", "green"), ("sky?", "blue")]]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert shapes.blind_baseline_exact_match(path, path) == 1.0


def test_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "out"), "--train", "20", "--val", "5", "--seed", "1"],
        capture_output=True, text=True, check=True,
    )
    assert "20 train + 5 val" in result.stdout and len(result.stdout.strip().splitlines()) == 1
    assert len(_rows(tmp_path / "out" / "train.jsonl")) == 20
    assert len(_rows(tmp_path / "out" / "val.jsonl")) == 5
