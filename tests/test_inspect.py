"""`glmtune inspect` on the official full-size config.json files (meta device): parameter names and shapes equal
the official weight maps, totals equal the published sizes, recipes train exactly the components they name;
the CLI prints the same report as JSON and fails with one clear line on a folder without config.json."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune.config import load_recipe
from glmtune.inspect import inspect_model
from glmtune.models import get_family

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "reference"
REPORT_KEYS = {"family", "model_dir", "parameters", "total_parameters", "components"}


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory) -> dict[str, Path]:
    """One folder per official model holding only its config.json (no weights, no tokenizer)."""
    out = {}
    for name in ("glm-4-9b-chat", "glm-4v-9b", "GLM-4.1V-9B-Thinking"):
        d = tmp_path_factory.mktemp(name)
        shutil.copy(REF / name / "config.json", d / "config.json")
        out[name] = d
    return out


@pytest.fixture(scope="module")
def reports(config_dirs) -> dict[str, dict]:
    return {name: inspect_model(d) for name, d in config_dirs.items()}


@pytest.fixture(scope="module")
def glm4_index() -> dict:
    return json.loads((REF / "glm-4-9b-chat" / "model.safetensors.index.json").read_text())


def numel(shape) -> int:
    return math.prod(shape)


def test_build_model_meta_is_on_the_meta_device(config_dirs):
    for name, family in (("glm-4-9b-chat", "glm4"), ("glm-4v-9b", "glm4v"), ("GLM-4.1V-9B-Thinking", "glm41v")):
        model = get_family(family).build_model(config_dirs[name], meta=True)
        assert all(t.is_meta for t in model.state_dict().values()), name


def test_glm4_9b_chat_equals_official_weight_map(reports, glm4_index):
    r = reports["glm-4-9b-chat"]
    assert REPORT_KEYS <= set(r)
    assert r["family"] == "glm4"
    params = r["parameters"]
    assert set(params) == set(glm4_index["weight_map"])
    assert len(params) == len(glm4_index["weight_map"]) == 284
    total = sum(numel(s) for s in params.values())
    assert total == r["total_parameters"]
    assert total * 2 == glm4_index["metadata"]["total_size"]  # bfloat16
    assert r["components"] == {"language": total}
    # shapes from the config: vocab 151552, hidden 4096, 32 q heads + 2 kv groups of 128, SwiGLU 13696
    assert params["transformer.embedding.word_embeddings.weight"] == [151552, 4096]
    assert params["transformer.output_layer.weight"] == [151552, 4096]
    assert params["transformer.encoder.layers.39.self_attention.query_key_value.weight"] == [4608, 4096]
    assert params["transformer.encoder.layers.39.self_attention.query_key_value.bias"] == [4608]
    assert params["transformer.encoder.layers.39.self_attention.dense.weight"] == [4096, 4096]
    assert params["transformer.encoder.layers.39.mlp.dense_h_to_4h.weight"] == [2 * 13696, 4096]
    assert params["transformer.encoder.layers.39.mlp.dense_4h_to_h.weight"] == [4096, 13696]
    assert params["transformer.rotary_pos_emb.inv_freq"] == [32]
    assert "transformer.encoder.layers.40.input_layernorm.weight" not in params


def vision_shapes(cfg: dict) -> dict[str, list[int]]:
    """GLM-4V-9B's EVA2-CLIP-E + adapter names and shapes, derived from config.json by hand."""
    v = cfg["vision_config"]
    c, h, f = v["hidden_size"], cfg["hidden_size"], cfg["ffn_hidden_size"]
    p = "transformer.vision."
    out = {
        p + "patch_embedding.proj.weight": [c, v["in_channels"], v["patch_size"], v["patch_size"]],
        p + "patch_embedding.proj.bias": [c],
        p + "patch_embedding.cls_embedding": [1, c],
        p + "patch_embedding.position_embedding.weight": [v["num_positions"], c],
        p + "linear_proj.linear_proj.weight": [h, h],
        p + "linear_proj.norm1.weight": [h],
        p + "linear_proj.norm1.bias": [h],
        p + "linear_proj.dense_h_to_4h.weight": [f, h],
        p + "linear_proj.gate_proj.weight": [f, h],
        p + "linear_proj.dense_4h_to_h.weight": [h, f],
        p + "conv.weight": [h, c, 2, 2],
        p + "conv.bias": [h],
        p + "boi": [1, 1, h],
        p + "eoi": [1, 1, h],
    }
    for i in range(v["num_hidden_layers"]):
        q = f"{p}transformer.layers.{i}."
        out.update({
            q + "input_layernorm.weight": [c], q + "input_layernorm.bias": [c],
            q + "attention.query_key_value.weight": [3 * c, c], q + "attention.query_key_value.bias": [3 * c],
            q + "attention.dense.weight": [c, c], q + "attention.dense.bias": [c],
            q + "mlp.fc1.weight": [v["intermediate_size"], c], q + "mlp.fc1.bias": [v["intermediate_size"]],
            q + "mlp.fc2.weight": [c, v["intermediate_size"]], q + "mlp.fc2.bias": [c],
            q + "post_attention_layernorm.weight": [c], q + "post_attention_layernorm.bias": [c],
        })
    return out


def test_glm4v_9b_names_shapes_and_total(reports):
    r = reports["glm-4v-9b"]
    cfg = json.loads((REF / "glm-4v-9b" / "config.json").read_text())
    assert REPORT_KEYS <= set(r)
    assert r["family"] == "glm4v"
    params = r["parameters"]
    assert r["total_parameters"] == sum(numel(s) for s in params.values()) == 13_906_320_928
    # the text part is GLM-4-9B-Chat, name for name and shape for shape
    text = {k: s for k, s in params.items() if not k.startswith("transformer.vision.")}
    assert text == reports["glm-4-9b-chat"]["parameters"]
    # the vision part, derived from the config
    vision = {k: s for k, s in params.items() if k.startswith("transformer.vision.")}
    assert vision == vision_shapes(cfg)
    assert params["transformer.vision.transformer.layers.62.mlp.fc2.weight"] == [1792, 15360]
    assert params["transformer.vision.conv.weight"] == [4096, 1792, 2, 2]
    assert params["transformer.vision.patch_embedding.position_embedding.weight"] == [6401, 1792]
    assert params["transformer.vision.linear_proj.dense_h_to_4h.weight"] == [13696, 4096]
    assert "transformer.vision.transformer.layers.63.mlp.fc2.weight" not in params
    # components: projector = conv + GLU adapter, boi/eoi stay with the vision tower
    projector = sum(numel(s) for k, s in vision.items()
                    if k.startswith(("transformer.vision.conv.", "transformer.vision.linear_proj.")))
    assert r["components"] == {"language": sum(numel(s) for s in text.values()),
                               "vision": sum(numel(s) for s in vision.values()) - projector,
                               "projector": projector}
    assert projector == 214_446_080


def test_glm41v_flat_official_config(reports):
    r = reports["GLM-4.1V-9B-Thinking"]
    assert REPORT_KEYS <= set(r)
    assert r["family"] == "glm41v"
    params = r["parameters"]
    layers = {int(m.group(1)) for k in params if (m := re.match(r"model\.language_model\.layers\.(\d+)\.", k))}
    blocks = {int(m.group(1)) for k in params if (m := re.match(r"model\.visual\.blocks\.(\d+)\.", k))}
    assert layers == set(range(40)) and blocks == set(range(24))
    assert params["model.language_model.layers.39.mlp.gate_up_proj.weight"] == [2 * 13696, 4096]
    assert params["model.language_model.layers.39.self_attn.k_proj.weight"] == [256, 4096]
    assert params["model.visual.blocks.23.attn.qkv.weight"] == [3 * 1536, 1536]
    assert params["lm_head.weight"] == [151552, 4096]
    assert r["total_parameters"] == sum(numel(s) for s in params.values()) == 10_292_777_472
    assert set(r["components"]) == {"vision", "projector", "language"}
    assert sum(r["components"].values()) == r["total_parameters"]


def test_lora_vision_recipe_trains_lora_in_vision_and_language(config_dirs):
    recipe = load_recipe(ROOT / "recipes" / "glm4v" / "lora_vision.yaml", check_files=False)
    r = inspect_model(config_dirs["glm-4v-9b"], recipe=recipe)
    trainable = {c: row["trainable"] for c, row in r["trainable"].items()}
    # LoRA r=8 on query_key_value: A (8, in) + B (out, 8) per layer
    r_ = recipe.adapter.r
    assert r_ == 8
    assert trainable == {"language": 40 * r_ * (4096 + 4608), "vision": 63 * r_ * (1792 + 3 * 1792), "projector": 0}
    names = r["trainable_parameters"]
    assert names and all(re.search(r"\.lora_[AB]\.", n) for n in names)
    modules = {re.sub(r"^base_model\.model\.|\.lora_[AB]\..*$", "", n) for n in names}
    assert modules == ({f"transformer.encoder.layers.{i}.self_attention.query_key_value" for i in range(40)}
                       | {f"transformer.vision.transformer.layers.{i}.attention.query_key_value" for i in range(63)})


def test_projector_full_recipe_trains_only_the_projector(config_dirs):
    recipe = load_recipe(ROOT / "recipes" / "glm4v" / "projector_full.yaml", check_files=False)
    r = inspect_model(config_dirs["glm-4v-9b"], recipe=recipe)
    assert {c: row["trainable"] for c, row in r["trainable"].items()} == {
        "language": 0, "vision": 0, "projector": 214_446_080}
    assert r["trainable"]["projector"]["total"] == 214_446_080
    names = r["trainable_parameters"]
    assert set(names) == {k for k in r["parameters"]
                          if k.startswith(("transformer.vision.conv.", "transformer.vision.linear_proj."))}
    assert all(names[k] == r["parameters"][k] for k in names)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmtune", "inspect", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_prints_the_report_as_json(config_dirs, reports):
    done = run_cli(str(config_dirs["glm-4v-9b"]), "--meta")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert REPORT_KEYS <= set(report)
    expected = reports["glm-4v-9b"]
    for key in REPORT_KEYS:
        assert report[key] == expected[key], key


def test_cli_without_config_json_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_cli(str(tmp_path / "empty"), "--meta")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("glmtune inspect: error: ")
    assert "config.json" in lines[0] and str(tmp_path / "empty") in lines[0]
    assert "Traceback" not in done.stderr
