"""VisualGLM-6B fewshot data (THUDM/VisualGLM-6B fewshot-data/dataset.json, a JSON array).

    [{"img": "images/cat.png", "prompt": "What is this?", "label": "A cat."}, ...]

One image and one question/answer per record: user "<image>" + prompt, assistant label. Upstream
opens `img` relative to the working directory (its sample says "fewshot-data/2p.png" from the repo
root); here it is relative to the data file's folder like every other format.
"""

from __future__ import annotations

from pathlib import Path

from glmtune.data.formats import require, resolve_image
from glmtune.data.sample import IMAGE_PLACEHOLDER, Sample, Turn


def matches(record: dict) -> bool:
    return "img" in record


def parse(record: dict, source: str, base_dir: Path) -> Sample:
    img = require(record, "img", str, source)
    prompt = require(record, "prompt", str, source)
    label = require(record, "label", str, source)
    image = resolve_image(img, base_dir, source, "img")
    turns = [Turn("user", IMAGE_PLACEHOLDER + prompt), Turn("assistant", label)]
    return Sample(turns=turns, images=[image], source=source)
