"""Session fixtures shared by the test suite: a tiny GLM-4.1V checkpoint and the synthetic shapes data."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_COLOURS, _SHAPES = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")


@pytest.fixture(scope="session")
def tiny_glm41v(tmp_path_factory) -> Path:
    """A tiny GLM-4.1V checkpoint in the official layout, built once per test run."""
    from glmtune.models import get_family

    return Path(get_family("glm41v").make_tiny(tmp_path_factory.mktemp("tiny-glm41v"), seed=0))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """scripts/make_shapes_data.py output (64 train + 16 val samples, seed 0); returns the folder."""
    spec = importlib.util.spec_from_file_location("make_shapes_data", REPO / "scripts" / "make_shapes_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("shapes-data")
    module.make_shapes_data(out, n_train=64, n_val=16, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_glm4v(tmp_path_factory) -> Path:
    """A tiny GLM-4V-9B checkpoint (GLM-4 + EVA2-CLIP-E) in the official layout, built once per test run."""
    from glmtune.models import get_family

    return Path(get_family("glm4v").make_tiny(tmp_path_factory.mktemp("tiny-glm4v"), seed=0))


@pytest.fixture(scope="session")
def tiny_glm4(tmp_path_factory) -> Path:
    """A tiny GLM-4-9B-Chat checkpoint (text only) in the official layout, built once per test run."""
    from glmtune.models import get_family

    return Path(get_family("glm4").make_tiny(tmp_path_factory.mktemp("tiny-glm4"), seed=0))


@pytest.fixture(scope="session")
def tiny_visualglm(tmp_path_factory) -> Path:
    """A tiny VisualGLM-6B checkpoint (ChatGLM-6B + BLIP-2) in the official `.bin` layout, built once per test run."""
    from glmtune.models import get_family

    return Path(get_family("visualglm").make_tiny(tmp_path_factory.mktemp("tiny-visualglm"), seed=0))


@pytest.fixture(scope="session")
def tiny_chatglm(tmp_path_factory) -> Path:
    """A tiny ChatGLM-6B checkpoint (VisualGLM-6B's text model) in the official `.bin` layout, built once per run."""
    from glmtune.models import get_family

    return Path(get_family("chatglm").make_tiny(tmp_path_factory.mktemp("tiny-chatglm"), seed=0))


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    """Text-only QA for GLM-4-9B-Chat: the answer is in the question's context."""
    out = tmp_path_factory.mktemp("text-data")
    rng = random.Random(0)
    for split, n in (("train", 64), ("val", 8)):
        with open(out / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                colour, shape = rng.choice(_COLOURS), rng.choice(_SHAPES)
                q = f"There is a {colour} {shape}. What colour is the shape?"
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": colour}]}) + "\n")
    return out


@pytest.fixture(scope="session")
def memorised_glm4(tiny_glm4, tmp_path_factory):
    """(checkpoint, data): a LoRA on the tiny GLM-4 that learned the four QA answers by heart (30 steps on the
    same 4 samples); chat, eval, predict and serve tests check that those answers come back. Built once."""
    from memorised_qa import QA, write_jsonl

    from glmtune.config import load_recipe
    from glmtune.train import train

    out = tmp_path_factory.mktemp("memorised")
    data = write_jsonl(out / "qa.jsonl", QA)
    recipe = load_recipe(REPO / "recipes/glm4/lora.yaml", [
        f"model.path={tiny_glm4}", f"data.train={data}", f"train.output_dir={out / 'run'}", "model.dtype=float32",
        "train.mixed_precision=no", "train.batch_size=4", "train.grad_accum=1", "train.max_steps=30", "train.lr=2e-2",
        "train.warmup_ratio=0", "adapter.dropout=0.0", "train.save_every=0", "data.max_length=64",
        "data.num_workers=0", "data.shuffle_buffer=0", "log.progress_bar=false", "train.resume=never"])
    return train(recipe)["checkpoint"], data
