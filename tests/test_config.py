"""glmtune/config.py: recipes load, every user mistake is a RecipeError naming the key (and a fix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmtune.config import VALID_KEYS, Recipe, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("**/*.yaml"))
QUICKSTART = REPO / "recipes" / "glm41v" / "quickstart.yaml"

MINIMAL = """\
model:
  family: glm41v
  path: {model}
data:
  train: {train}
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=(), check_files=False) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides), check_files=check_files)
    return str(info.value)


# --- every recipe --------------------------------------------------------------------------------


def test_recipes_found():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"glm41v/lora.yaml", "glm41v/quickstart.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_loads(path):
    recipe = load_recipe(path, check_files=False)
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# glmtune "), f"{path}: first line must give the exact command, got {first!r}"
    # the command in that comment names this very recipe
    assert path.relative_to(REPO).as_posix() in first
    assert set(recipe.adapter.components) == {"vision", "projector", "language"}


def test_quickstart_values():
    r = load_recipe(QUICKSTART, check_files=False)
    assert (r.model.family, r.model.path, r.model.dtype) == ("glm41v", "runs/tiny-glm41v", "float32")
    assert r.adapter.components == {"vision": "lora", "projector": "full", "language": "lora"}
    assert (r.adapter.r, r.adapter.alpha) == (16, 32.0)
    assert isinstance(r.adapter.alpha, float)
    assert (r.data.train, r.data.val, r.data.format, r.data.max_length) == (
        "runs/shapes-data/train.jsonl", "runs/shapes-data/val.jsonl", "glm4", 128)
    assert (r.train.max_steps, r.train.batch_size, r.train.lr) == (300, 16, 3.0e-3)
    assert r.log.report_to == ["jsonl", "tensorboard"]


# --- unknown keys ----------------------------------------------------------------------------------


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, MINIMAL.format(model="/m", train="/t.jsonl") + "train:\n  max_step: 5\n")
    msg = error_of(path)
    assert str(path) in msg
    assert "`train.max_step`" in msg
    assert "did you mean `train.max_steps`?" in msg


def test_misspelled_section_in_file(tmp_path):
    path = write(tmp_path, MINIMAL.format(model="/m", train="/t.jsonl") + "trian:\n  max_steps: 5\n")
    msg = error_of(path)
    assert "`trian.max_steps`" in msg
    assert "did you mean `train.max_steps`?" in msg


@pytest.mark.parametrize("override, key, suggestion", [
    ("train.max_step=3", "train.max_step", "train.max_steps"),
    ("trian.max_steps=3", "trian.max_steps", "train.max_steps"),
    ("model.famly=glm41v", "model.famly", "model.family"),
    ("data.shufle_buffer=4", "data.shufle_buffer", "data.shuffle_buffer"),
])
def test_unknown_key_in_override(override, key, suggestion):
    msg = error_of(QUICKSTART, [override])
    assert f"override `{override}`" in msg
    assert f"unknown recipe key `{key}`" in msg
    assert f"did you mean `{suggestion}`?" in msg


def test_section_given_a_value():
    msg = error_of(QUICKSTART, ["train=3"])
    assert "`train` is a section" in msg


def test_valid_keys_are_the_dataclass_fields():
    assert "train.max_steps" in VALID_KEYS and "adapter.components" in VALID_KEYS
    assert len(VALID_KEYS) == len(set(VALID_KEYS))
    assert {k.split(".")[0] for k in VALID_KEYS} == {"model", "adapter", "data", "train", "log"}
    # every declared key can be set through an override (no key is unreachable)
    for key in ("model.dtype", "data.shuffle_buffer", "train.keep_last", "log.log_every"):
        assert key in VALID_KEYS


# --- types and choices -----------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=12.5", "train.max_steps"),
    ("train.lr=abc", "train.lr"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing"),
])
def test_wrong_type_names_the_key(override, key):
    msg = error_of(QUICKSTART, [override])
    assert f"bad value for `{key}`" in msg
    assert f"override `{override}`" in msg


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, MINIMAL.format(model="/m", train="/t.jsonl") + "train:\n  batch_size: two\n")
    msg = error_of(path)
    assert str(path) in msg and "bad value for `train.batch_size`" in msg


def test_bad_choice_suggests():
    msg = error_of(QUICKSTART, ["adapter.method=lorra"])
    assert "`adapter.method` is 'lorra'" in msg
    assert "did you mean 'lora'?" in msg
    msg = error_of(QUICKSTART, ["model.dtype=bfloat"])
    assert "`model.dtype`" in msg and "did you mean 'bfloat16'?" in msg


def test_bad_family_suggests():
    msg = error_of(QUICKSTART, ["model.family=glm41"])
    assert "`model.family` is 'glm41'" in msg and "did you mean `glm41v`?" in msg


def test_bad_component_name():
    msg = error_of(QUICKSTART, ["adapter.components.vison=lora"])
    assert "`adapter.components.vison` is not a component" in msg
    assert "did you mean `adapter.components.vision`?" in msg


def test_bad_component_mode():
    msg = error_of(QUICKSTART, ["adapter.components.vision=lorra"])
    assert "`adapter.components.vision` is 'lorra'" in msg
    assert "['frozen', 'lora', 'full']" in msg


def test_method_none_with_lora_component():
    msg = error_of(QUICKSTART, ["adapter.method=none"])
    assert "`adapter.components.vision` is `lora` but adapter.method is `none`" in msg
    assert msg.startswith(str(QUICKSTART))


def test_method_none_full_finetune_is_fine():
    r = load_recipe(QUICKSTART, ["adapter.method=none", "adapter.components.vision=frozen",
                                 "adapter.components.language=full"], check_files=False)
    assert r.adapter.method == "none"
    assert r.adapter.components == {"vision": "frozen", "projector": "full", "language": "full"}


def test_everything_frozen_is_an_error():
    msg = error_of(QUICKSTART, ["adapter.method=none", "adapter.components.vision=frozen",
                                "adapter.components.projector=frozen", "adapter.components.language=frozen"])
    assert "nothing would train" in msg


def test_missing_components_default_to_frozen(tmp_path):
    path = write(tmp_path, MINIMAL.format(model="/m", train="/t.jsonl"))
    r = load_recipe(path, ["adapter.components.projector=full"], check_files=False)
    assert r.adapter.components == {"vision": "frozen", "projector": "full", "language": "lora"}


# --- required keys, files --------------------------------------------------------------------------


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "model:\n  family: glm41v\n  path: /m\n")
    msg = error_of(path)
    assert "required key `data.train` is not set" in msg
    assert str(path) in msg


def test_required_keys_from_overrides_only():
    r = load_recipe(None, ["model.family=glm41v", "model.path=/m", "data.train=/t.jsonl"], check_files=False)
    assert (r.model.path, r.data.train, r.train.max_steps) == ("/m", "/t.jsonl", 100)
    msg = error_of(None, ["model.family=glm41v", "data.train=/t.jsonl"])
    assert "required key `model.path`" in msg


def test_missing_model_config(tmp_path):
    model = tmp_path / "no-model"
    model.mkdir()
    train = write(tmp_path, "{}\n", "train.jsonl")
    path = write(tmp_path, MINIMAL.format(model=model, train=train))
    msg = error_of(path, check_files=True)
    assert "`model.path`" in msg and str(model) in msg and "config.json" in msg
    assert "glmtune make-tiny glm41v" in msg


def test_missing_data_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "glm4v"}))
    train = tmp_path / "missing" / "train.jsonl"
    path = write(tmp_path, MINIMAL.format(model=model, train=train))
    msg = error_of(path, check_files=True)
    assert f"`data.train` = {train}: file not found" in msg
    # the val file is checked too
    write(tmp_path, "{}\n", "train.jsonl")
    val = tmp_path / "val.jsonl"
    msg = error_of(path, [f"data.train={tmp_path / 'train.jsonl'}", f"data.val={val}"], check_files=True)
    assert f"`data.val` = {val}: file not found" in msg
    # and everything present passes
    write(tmp_path, "{}\n", "val.jsonl")
    r = load_recipe(path, [f"data.train={tmp_path / 'train.jsonl'}", f"data.val={val}"], check_files=True)
    assert r.data.val == str(val)


def test_recipe_file_not_found(tmp_path):
    msg = error_of(tmp_path / "nope.yaml")
    assert "recipe file not found" in msg and "nope.yaml" in msg


# --- overrides and YAML ----------------------------------------------------------------------------


def test_override_without_equals():
    msg = error_of(QUICKSTART, ["train.max_steps"])
    assert "override `train.max_steps` must look like key=value" in msg


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "model:\n  family: glm41v\n  path: [unclosed\n")
    msg = error_of(path)
    assert str(path) in msg and "not valid YAML" in msg


def test_yaml_not_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    msg = error_of(path)
    assert str(path) in msg and "must be a mapping" in msg


def test_overrides_win_over_file():
    r = load_recipe(QUICKSTART, ["train.max_steps=7", "model.path=/elsewhere", "data.val=null",
                                 "log.report_to=[wandb]", "adapter.target=[q_proj,v_proj]"], check_files=False)
    assert r.train.max_steps == 7
    assert r.model.path == "/elsewhere"
    assert r.data.val is None
    assert r.log.report_to == ["wandb"]
    assert r.adapter.target == ["q_proj", "v_proj"]
    assert r.train.batch_size == 16  # untouched keys keep the file's value


def test_later_override_wins():
    r = load_recipe(QUICKSTART, ["train.lr=1e-3", "train.lr=2e-3"], check_files=False)
    assert r.train.lr == 2e-3


def test_type_conversion():
    r = load_recipe(QUICKSTART, ["train.lr=1e-3", "adapter.alpha=8", "train.max_steps=12",
                                 "model.gradient_checkpointing=true"], check_files=False)
    assert type(r.train.lr) is float and r.train.lr == 1e-3
    assert type(r.adapter.alpha) is float and r.adapter.alpha == 8.0
    assert type(r.train.max_steps) is int and r.train.max_steps == 12
    assert r.model.gradient_checkpointing is True


def test_type_conversion_in_file(tmp_path):
    path = write(tmp_path, MINIMAL.format(model="/m", train="/t.jsonl") + "train:\n  lr: 1e-3\n  max_steps: 9\n")
    r = load_recipe(path, check_files=False)
    assert type(r.train.lr) is float and r.train.lr == 1e-3
    assert r.train.max_steps == 9
    # defaults for everything the file does not set
    assert (r.train.batch_size, r.data.max_length, r.adapter.method) == (2, 1024, "lora")
