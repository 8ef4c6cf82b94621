"""`glmtune inspect` on the official full-size ChatGLM-6B / VisualGLM-6B config.json files (meta device): names equal
the official `pytorch_model.bin.index.json` weight maps, shapes follow the config, and the published `total_size`
is accounted for byte for byte; the CLI prints the same report as JSON.

Why `total_size` is not simply 2 bytes x parameters (both indexes, tests/reference/*/pytorch_model.bin.index.json):
- The upstream remote code (modeling_chatglm.py, greensheng/chatglm-6b mirror of the HF repo, main @ 8b7d335 and
  branch `visual` @ 11f77d9) builds the GLM linears and embeddings with `params_dtype=torch.half`, but its
  `LayerNorm(hidden_size, eps=...)` modules with the default dtype, fp32; `RotaryEmbedding` stores `inv_freq.half()`;
  VisualGLM's `BLIP2` image encoder (visual.py) is built in the default fp32. `save_pretrained` keeps those dtypes
  and its index counts numel x element size per name, tied `lm_head.weight` included.
- ChatGLM-6B's index is the file of the first upload (HF commit d11c6aa, 2023-03-14, config vocab_size 150528 =
  20000 icetk image tokens + 130528): the "slim" checkpoint update (d467eff, 2023-04-06) dropped those 20000 rows
  from word_embeddings and lm_head but left the index as it was, so its total_size still counts them.
  (The slim shards' git-LFS sizes agree: each shard's size minus its fp16 bytes is its LayerNorms' fp32 surplus plus
  ~300 bytes of zip overhead per tensor.)
So: chatglm-6b total_size = 2 x params + 2 x LayerNorm params + 2 x 2 x 20000 x 4096 (fp16 rows of the old vocab),
and visualglm-6b total_size = 2 x GLM params + 2 x GLM LayerNorm params + 4 x image-encoder params.
"""

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
OLD_IMAGE_TOKENS = 20000  # icetk-era rows in front of the vocabulary (num_image_tokens), dropped by the slim update


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory) -> dict[str, Path]:
    """One folder per official model holding only its config.json (no weights, no tokenizer)."""
    out = {}
    for name in ("chatglm-6b", "visualglm-6b"):
        d = tmp_path_factory.mktemp(name)
        shutil.copy(REF / name / "config.json", d / "config.json")
        out[name] = d
    return out


@pytest.fixture(scope="module")
def reports(config_dirs) -> dict[str, dict]:
    return {name: inspect_model(d) for name, d in config_dirs.items()}


def index(name: str) -> dict:
    return json.loads((REF / name / "pytorch_model.bin.index.json").read_text())


def config(name: str) -> dict:
    return json.loads((REF / name / "config.json").read_text())


def numel(shape) -> int:
    return math.prod(shape)


def glm_shapes(cfg: dict) -> dict[str, list[int]]:
    """ChatGLM-6B names and shapes, derived from config.json by hand."""
    h, f, v, heads = cfg["hidden_size"], cfg["inner_hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    out = {
        "transformer.word_embeddings.weight": [v, h],
        "transformer.final_layernorm.weight": [h],
        "transformer.final_layernorm.bias": [h],
        "lm_head.weight": [v, h],
    }
    for i in range(cfg["num_layers"]):
        p = f"transformer.layers.{i}."
        out.update({
            p + "input_layernorm.weight": [h], p + "input_layernorm.bias": [h],
            p + "attention.query_key_value.weight": [3 * h, h], p + "attention.query_key_value.bias": [3 * h],
            p + "attention.dense.weight": [h, h], p + "attention.dense.bias": [h],
            # RotaryEmbedding(hidden_size // (num_heads * 2)): inv_freq over half of that rotary dim
            p + "attention.rotary_emb.inv_freq": [h // heads // 4],
            p + "post_attention_layernorm.weight": [h], p + "post_attention_layernorm.bias": [h],
            p + "mlp.dense_h_to_4h.weight": [f, h], p + "mlp.dense_h_to_4h.bias": [f],
            p + "mlp.dense_4h_to_h.weight": [h, f], p + "mlp.dense_4h_to_h.bias": [h],
        })
    return out


def blip2_shapes(cfg: dict) -> dict[str, list[int]]:
    """VisualGLM-6B's image encoder (SwissArmyTransformer names) derived from eva_config / qformer_config."""
    e, q, h = cfg["eva_config"], cfg["qformer_config"], cfg["hidden_size"]
    c, qc = e["hidden_size"], q["hidden_size"]
    vit, qf = "image_encoder.vit.", "image_encoder.qformer.transformer."
    out = {
        vit + "transformer.word_embeddings.weight": [e["vocab_size"], c],  # the cls token
        vit + "transformer.position_embeddings.weight": [e["max_sequence_length"], c],
        vit + "mixins.patch_embedding.proj.weight": [c, e["in_channels"], e["patch_size"], e["patch_size"]],
        vit + "mixins.patch_embedding.proj.bias": [c],
        vit + "mixins.cls.ln_vision.weight": [c],
        vit + "mixins.cls.ln_vision.bias": [c],
        qf + "word_embeddings.weight": [q["vocab_size"], qc],  # the 32 learned queries
        qf + "final_layernorm.weight": [qc],
        qf + "final_layernorm.bias": [qc],
        "image_encoder.glm_proj.weight": [h, qc],
        "image_encoder.glm_proj.bias": [h],
    }

    def layer(p, width, inner):
        return {
            p + "input_layernorm.weight": [width], p + "input_layernorm.bias": [width],
            p + "attention.query_key_value.weight": [3 * width, width],
            p + "attention.query_key_value.bias": [3 * width],
            p + "attention.dense.weight": [width, width], p + "attention.dense.bias": [width],
            p + "post_attention_layernorm.weight": [width], p + "post_attention_layernorm.bias": [width],
            p + "mlp.dense_h_to_4h.weight": [inner, width], p + "mlp.dense_h_to_4h.bias": [inner],
            p + "mlp.dense_4h_to_h.weight": [width, inner], p + "mlp.dense_4h_to_h.bias": [width],
        }

    for i in range(e["num_layers"]):
        out.update(layer(f"{vit}transformer.layers.{i}.", c, e["inner_hidden_size"]))
    for i in range(q["num_layers"]):
        p = f"{qf}layers.{i}."
        out.update(layer(p, qc, 4 * qc))
        if q["is_decoder"][i]:
            out.update({
                p + "cross_attention.query.weight": [qc, qc], p + "cross_attention.query.bias": [qc],
                p + "cross_attention.key_value.weight": [2 * qc, q["cross_attn_hidden_size"]],
                p + "cross_attention.key_value.bias": [2 * qc],
                p + "cross_attention.dense.weight": [qc, qc], p + "cross_attention.dense.bias": [qc],
                p + "post_cross_attention_layernorm.weight": [qc], p + "post_cross_attention_layernorm.bias": [qc],
            })
    return out


def test_build_model_meta_is_on_the_meta_device(config_dirs):
    for name, family in (("chatglm-6b", "chatglm"), ("visualglm-6b", "visualglm")):
        model = get_family(family).build_model(config_dirs[name], meta=True)
        state = model.state_dict()
        assert state and all(t.is_meta for t in state.values()), name
        assert all(b.is_meta for b in model.buffers()), name


def test_chatglm_6b_equals_official_weight_map(reports):
    r = reports["chatglm-6b"]
    official = index("chatglm-6b")
    assert REPORT_KEYS <= set(r)
    assert r["family"] == "chatglm"
    params = r["parameters"]
    assert set(params) == set(official["weight_map"])
    assert len(params) == len(official["weight_map"]) == 368
    assert params == glm_shapes(config("chatglm-6b"))
    total = sum(numel(s) for s in params.values())
    assert total == r["total_parameters"] == 6_707_929_984
    assert r["components"] == {"language": total}
    # spot checks against the config: vocab 130528, hidden 4096, 32 heads x 128, FFN 16384
    assert params["transformer.word_embeddings.weight"] == params["lm_head.weight"] == [130528, 4096]
    assert params["transformer.layers.27.attention.query_key_value.weight"] == [12288, 4096]
    assert params["transformer.layers.27.mlp.dense_h_to_4h.weight"] == [16384, 4096]
    assert params["transformer.layers.27.attention.rotary_emb.inv_freq"] == [32]
    assert "transformer.layers.28.input_layernorm.weight" not in params


def test_chatglm_6b_total_size_accounting(reports):
    params = reports["chatglm-6b"]["parameters"]
    total_size = index("chatglm-6b")["metadata"]["total_size"]
    assert total_size == 13_744_473_856
    total = sum(numel(s) for s in params.values())
    layernorm = sum(numel(s) for k, s in params.items() if "layernorm" in k)
    assert layernorm == (4 * 28 + 2) * 4096
    inv_freq = sum(numel(s) for k, s in params.items() if k.endswith("rotary_emb.inv_freq"))
    assert inv_freq == 28 * 32
    # the plain fp16 count does not match ...
    assert total * 2 != total_size
    # ... fp16, LayerNorms fp32, inv_freq fp16, tied lm_head counted, plus the pre-slim 20000 rows of both
    # vocab-sized matrices (see the module docstring)
    old_rows = 2 * OLD_IMAGE_TOKENS * 4096
    assert total * 2 + layernorm * 2 + old_rows * 2 == total_size
    # the same, stated with the pre-slim vocabulary of the first upload
    assert config("chatglm-6b")["vocab_size"] + OLD_IMAGE_TOKENS == 150528
    assert (total + old_rows - layernorm) * 2 + layernorm * 4 == total_size


def test_visualglm_6b_equals_official_weight_map(reports):
    r = reports["visualglm-6b"]
    cfg = config("visualglm-6b")
    official = index("visualglm-6b")
    assert REPORT_KEYS <= set(r)
    assert r["family"] == "visualglm"
    params = r["parameters"]
    assert set(params) == set(official["weight_map"])
    assert len(params) == len(official["weight_map"]) == 1039
    # the text part is ChatGLM-6B, name for name and shape for shape
    text = {k: s for k, s in params.items() if not k.startswith("image_encoder.")}
    assert text == reports["chatglm-6b"]["parameters"] == glm_shapes(cfg)
    image = {k: s for k, s in params.items() if k.startswith("image_encoder.")}
    assert image == blip2_shapes(cfg)
    assert len(image) == 39 * 12 + 6 + 12 * 12 + 6 * 8 + 3 + 2  # vit layers + vit extras, Q-Former, glm_proj
    # spot checks against the config
    assert params["image_encoder.qformer.transformer.layers.0.cross_attention.key_value.weight"] == [1536, 1408]
    assert params["image_encoder.qformer.transformer.layers.10.cross_attention.query.weight"] == [768, 768]
    assert "image_encoder.qformer.transformer.layers.11.cross_attention.query.weight" not in params
    assert params["image_encoder.qformer.transformer.layers.11.mlp.dense_h_to_4h.weight"] == [3072, 768]
    assert params["image_encoder.qformer.transformer.word_embeddings.weight"] == [32, 768]
    assert params["image_encoder.vit.transformer.position_embeddings.weight"] == [257, 1408]
    assert params["image_encoder.vit.transformer.word_embeddings.weight"] == [1, 1408]
    assert params["image_encoder.vit.mixins.patch_embedding.proj.weight"] == [1408, 3, 14, 14]
    assert params["image_encoder.vit.transformer.layers.38.attention.query_key_value.weight"] == [4224, 1408]
    assert params["image_encoder.vit.transformer.layers.38.mlp.dense_h_to_4h.weight"] == [6144, 1408]
    assert params["image_encoder.glm_proj.weight"] == [4096, 768]
    assert "image_encoder.vit.transformer.layers.39.input_layernorm.weight" not in params
    assert "image_encoder.vit.transformer.final_layernorm.weight" not in params  # use_final_layernorm: false
    # components: projector = Q-Former + glm_proj, vision = the EVA ViT (with ln_vision)
    total = sum(numel(s) for s in params.values())
    assert total == r["total_parameters"] == 7_802_194_304
    projector = sum(numel(s) for k, s in image.items()
                    if k.startswith(("image_encoder.qformer.", "image_encoder.glm_proj.")))
    vit = sum(numel(s) for k, s in image.items() if k.startswith("image_encoder.vit."))
    assert r["components"] == {"language": sum(numel(s) for s in text.values()), "vision": vit,
                               "projector": projector}
    assert (vit, projector) == (985_952_256, 108_312_064)


def test_visualglm_6b_total_size_accounting(reports):
    params = reports["visualglm-6b"]["parameters"]
    total_size = index("visualglm-6b")["metadata"]["total_size"]
    assert total_size == 17_793_851_136
    text = sum(numel(s) for k, s in params.items() if not k.startswith("image_encoder."))
    text_layernorm = sum(numel(s) for k, s in params.items() if k.startswith("transformer.") and "layernorm" in k)
    image = sum(numel(s) for k, s in params.items() if k.startswith("image_encoder."))
    assert sum(numel(s) for s in params.values()) * 2 != total_size
    # GLM in fp16 with fp32 LayerNorms (as ChatGLM-6B), the BLIP-2 image encoder in fp32; no old-vocab rows here
    assert text * 2 + text_layernorm * 2 + image * 4 == total_size
    # the text part of this index is ChatGLM-6B's slim checkpoint
    chatglm = index("chatglm-6b")["metadata"]["total_size"]
    assert total_size - image * 4 == chatglm - 2 * OLD_IMAGE_TOKENS * 4096 * 2


def test_visualglm_lora_recipe_trains_only_the_named_layers(config_dirs):
    recipe = load_recipe(ROOT / "recipes" / "visualglm" / "lora.yaml", check_files=False)
    r = inspect_model(config_dirs["visualglm-6b"], recipe=recipe)
    assert recipe.adapter.r == 10 and list(recipe.adapter.layers) == [0, 14]
    # LoRA r=10 on query_key_value (4096 -> 12288) and attention.dense (4096 -> 4096) of GLM layers 0 and 14
    trainable = {c: row["trainable"] for c, row in r["trainable"].items()}
    assert trainable == {"language": 2 * 10 * ((4096 + 12288) + (4096 + 4096)), "vision": 0, "projector": 0}
    modules = {re.sub(r"^base_model\.model\.|\.lora_[AB]\..*$", "", n) for n in r["trainable_parameters"]}
    assert modules == {f"transformer.layers.{i}.attention.{m}" for i in (0, 14) for m in ("query_key_value", "dense")}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmtune", "inspect", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_prints_the_visualglm_report_as_json(config_dirs, reports):
    done = run_cli(str(config_dirs["visualglm-6b"]), "--meta")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert REPORT_KEYS <= set(report)
    expected = reports["visualglm-6b"]
    for key in REPORT_KEYS:
        assert report[key] == expected[key], key
    assert set(report["parameters"]) == set(index("visualglm-6b")["weight_map"])
