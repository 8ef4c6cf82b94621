"""The recipes as shipped: every method the README lists for a family has a recipe, and recipes train in their own
precision (model.dtype bfloat16 / train.mixed_precision bf16: CPU bf16 autocast), not the fp32 the other tests
force. Only the model path, the data, the step count and the output folder are overridden (and data.num_workers=0:
worker processes change no number and cost seconds each; VisualGLM's LoRA layers [0, 14] become the tiny
model's [0, 1]). Each family's main recipe trains on a bfloat16 copy of
its tiny base, and the merge of that checkpoint is bfloat16 again, tensor by tensor.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from glmtune.config import CHOICES, load_recipe

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = {"glm41v": "tiny_glm41v", "glm4v": "tiny_glm4v", "glm4": "tiny_glm4", "visualglm": "tiny_visualglm",
            "chatglm": "tiny_chatglm"}
TEXT = ("glm4", "chatglm")
MAIN = [f"{f}/lora.yaml" for f in FIXTURES]
# the tiny ChatGLM-6B has 2 layers: upstream's LoRA layers [0, 14] become [0, 1]
TINY = {"visualglm/lora.yaml": ["adapter.layers=[0,1]"], "visualglm/dora.yaml": ["adapter.layers=[0,1]"]}
# recipes that tests/test_families_e2e.py does not train
OTHERS = ["visualglm/dora.yaml", "chatglm/dora.yaml", "chatglm/qlora.yaml", "glm41v/projector_full.yaml",
          "visualglm/projector_full.yaml", "glm4/full.yaml", "chatglm/full.yaml"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread and lose much on a busy 2-core machine (see
    test_component_matrix.py); restored for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def readme_methods() -> dict[str, set[str]]:
    """family -> the adapter.method values the README's method table says `yes` for."""
    text = (ROOT / "README.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method |"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    rows = text.split(header, 1)[1].splitlines()[2:]
    out: dict[str, set[str]] = {}
    for row in rows:
        if not row.startswith("|"):
            break
        cells = [c.strip() for c in row.strip("|").split("|")]
        methods = [m for m in re.findall(r"`(\w+)`", cells[0]) if m in CHOICES["adapter.method"]]
        for families, cell in zip(columns, cells[1:]):
            for family in re.findall(r"\w+", families):
                if cell.startswith("yes"):
                    out.setdefault(family, set()).update(methods)
    return out


def test_every_method_the_readme_lists_has_a_recipe():
    listed = readme_methods()
    assert set(listed) == set(FIXTURES)
    shipped = {}
    for path in (ROOT / "recipes").glob("*/*.yaml"):
        recipe = load_recipe(path, check_files=False)
        shipped.setdefault(recipe.model.family, set()).add(recipe.adapter.method)
    assert shipped == listed


def bf16_copy(src: Path, dst: Path) -> Path:
    """The tiny checkpoint with every floating tensor in bfloat16, in its own file layout."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(f)).items()},
                      str(dst / f.name), metadata={"format": "pt"})
        elif f.suffix == ".bin":
            state = torch.load(f, weights_only=True)
            state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
            torch.save(state, dst / f.name)
        else:
            shutil.copy2(f, dst / f.name)
    return dst


def train_as_shipped(request, recipe_name: str, model: Path, out: Path) -> dict:
    from glmtune.train import train

    family = recipe_name.split("/")[0]
    data = request.getfixturevalue("text_data" if family in TEXT else "shapes_data")
    recipe = load_recipe(ROOT / "recipes" / recipe_name, [
        f"model.path={model}", f"data.train={data / 'train.jsonl'}", "data.val=null", "data.format=auto",
        "data.num_workers=0", "train.max_steps=3", f"train.output_dir={out}", "log.progress_bar=false",
        *TINY.get(recipe_name, [])])
    assert recipe.train.mixed_precision == "bf16"
    summary = train(recipe)
    assert summary["steps"] == 3 and math.isfinite(summary["final_train_loss"]), summary
    return summary


@pytest.mark.parametrize("recipe_name", MAIN)
def test_main_recipe_trains_in_bf16_and_merges_to_bf16(request, recipe_name, tmp_path):
    from safetensors import safe_open

    from glmtune.merge import merge
    from glmtune.models import get_family

    family = recipe_name.split("/")[0]
    base = bf16_copy(request.getfixturevalue(FIXTURES[family]), tmp_path / "base")
    recipe = load_recipe(ROOT / "recipes" / recipe_name, check_files=False)
    assert recipe.model.dtype == "bfloat16"
    summary = train_as_shipped(request, recipe_name, base, tmp_path / "run")
    merged = merge(summary["checkpoint"], tmp_path / "merged", print_fn=lambda s: None)
    shards = sorted(merged.glob("*.safetensors"))
    assert shards
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"BF16"}, (shard.name, dtypes)
    index = merged / "model.safetensors.index.json"
    if index.is_file():
        assert set(json.loads(index.read_text())["weight_map"].values()) == {s.name for s in shards}
    model = get_family(family).load_model(merged, torch.bfloat16)  # strict load: every tensor, every name
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("recipe_name", OTHERS)
def test_other_recipe_trains_as_shipped(request, recipe_name, tmp_path):
    family = recipe_name.split("/")[0]
    train_as_shipped(request, recipe_name, request.getfixturevalue(FIXTURES[family]), tmp_path / "run")
