"""The tiny VisualGLM-6B / ChatGLM-6B checkpoints against the official layout in tests/reference/ (config keys,
special ids, sharded `.bin` + index with the official tensor names), and strict loading of `.bin` checkpoints:
exact values, `lm_head` tied to the word embeddings as upstream, and one clear error naming the tensor and the
file for a broken checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from glmtune.models import detect_family, get_family
from glmtune.models.visualglm.tokenizer import ChatGLMTokenizer

REF = Path(__file__).resolve().parents[1] / "reference"
FAMILIES = [("visualglm", "visualglm-6b"), ("chatglm", "chatglm-6b")]
SHARD = re.compile(r"pytorch_model-(\d{5})-of-(\d{5})\.bin")


def tiny_dir(request, family: str) -> Path:
    return request.getfixturevalue(f"tiny_{family}")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_shards(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Every tensor of every `.bin` shard, read as the loader does (weights_only: no pickle code runs)."""
    out = {}
    for shard in sorted(path.glob("pytorch_model-*.bin")):
        state = torch.load(shard, map_location="cpu", weights_only=True)
        assert isinstance(state, dict)
        for key, tensor in state.items():
            assert isinstance(tensor, torch.Tensor), key
            assert key not in out, f"{key} stored twice"
            out[key] = (shard.name, tensor)
    return out


# --- config.json and the tokenizer -------------------------------------------------------------------------


@pytest.mark.parametrize("family, ref", FAMILIES)
def test_config_json_has_official_keys(request, family, ref):
    path = tiny_dir(request, family)
    tiny = read_json(path / "config.json")
    official = read_json(REF / ref / "config.json")
    assert "auto_map" in official and "auto_map" not in tiny  # glmtune runs no remote code
    assert set(official) - {"auto_map"} <= set(tiny)
    assert set(tiny) == set(official) - {"auto_map"}
    # architecture switches are the official values (only sizes and token ids differ)
    for key in ("model_type", "architectures", "position_encoding_2d", "layernorm_epsilon", "max_sequence_length",
                "transformers_version", "use_cache", "_name_or_path"):
        assert tiny[key] == official[key], key
    assert detect_family(path) == family
    assert tiny["hidden_size"] % tiny["num_attention_heads"] == 0
    if family == "chatglm":
        assert "eva_config" not in tiny and "image_length" not in tiny
        return
    assert tiny["image_length"] == official["image_length"] == 32
    for sub in ("eva_config", "qformer_config"):
        assert set(tiny[sub]) == set(official[sub]), sub
    eva, qf = tiny["eva_config"], tiny["qformer_config"]
    for key in ("vocab_size", "layernorm_order", "model_parallel_size", "use_final_layernorm", "layernorm_epsilon",
                "pre_len", "post_len", "in_channels", "num_classes", "patch_size"):
        assert eva[key] == official["eva_config"][key], key
    for key in ("vocab_size", "layernorm_order", "model_parallel_size", "max_sequence_length", "layernorm_epsilon"):
        assert qf[key] == official["qformer_config"][key], key
    # the derived sizes hold as in the official config: cls + patches positions, 32 queries, cross-attention
    # on even layers, the Q-Former attends to the ViT width
    assert eva["max_sequence_length"] == (eva["image_size"][0] // eva["patch_size"]) ** 2 + 1
    assert official["eva_config"]["max_sequence_length"] == (224 // 14) ** 2 + 1
    assert eva["image_size"][0] == eva["image_size"][1]
    assert qf["vocab_size"] == tiny["image_length"]
    assert qf["is_decoder"] == [i % 2 == 0 for i in range(qf["num_layers"])]
    assert official["qformer_config"]["is_decoder"] == [i % 2 == 0 for i in range(12)]
    assert qf["cross_attn_hidden_size"] == eva["hidden_size"]
    assert official["qformer_config"]["cross_attn_hidden_size"] == official["eva_config"]["hidden_size"]


@pytest.mark.parametrize("family, ref", FAMILIES)
def test_special_ids_equal_the_tokenizer(request, family, ref):
    path = tiny_dir(request, family)
    cfg = read_json(path / "config.json")
    official = read_json(REF / ref / "config.json")
    tok = ChatGLMTokenizer.from_pretrained(path)
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in (
        ("bos_token_id", "<sop>"), ("eos_token_id", "<eop>"), ("mask_token_id", "[MASK]"),
        ("gmask_token_id", "[gMASK]"), ("pad_token_id", "<pad>"))}
    assert {k: cfg[k] for k in ids} == ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.mask_token_id, tok.gmask_token_id, tok.pad_token_id) == (
        ids["bos_token_id"], ids["eos_token_id"], ids["mask_token_id"], ids["gmask_token_id"], ids["pad_token_id"])
    # the official scheme: [MASK] = number of learned pieces, [gMASK] +1, <sop> +4, <eop> +5, <pad> 3
    assert official["mask_token_id"] == 130000
    for key in ("gmask_token_id", "bos_token_id", "eos_token_id"):
        assert cfg[key] - cfg["mask_token_id"] == official[key] - official["mask_token_id"], key
    assert cfg["pad_token_id"] == official["pad_token_id"] == 3
    assert ids == {"bos_token_id": 104, "eos_token_id": 105, "mask_token_id": 100, "gmask_token_id": 101,
                   "pad_token_id": 3}
    # the embedding covers the vocabulary with a few spare rows, as the official 130528 rows for 130344 pieces
    # (130528 = the icetk-era 150528 minus its 20000 image tokens; not a round-up); the tiny one pads to 64
    assert official["vocab_size"] == 150528 - 20000 > 130344
    assert cfg["vocab_size"] % 64 == 0
    assert len(tok) <= cfg["vocab_size"] < len(tok) + 64
    # tokenizer_config.json: the official keys minus auto_map
    tcfg = read_json(path / "tokenizer_config.json")
    ocfg = read_json(REF / ref / "tokenizer_config.json")
    assert set(tcfg) == set(ocfg) - {"auto_map"}
    assert {k: v for k, v in tcfg.items() if k != "name_or_path"} == {
        k: v for k, v in ocfg.items() if k not in ("name_or_path", "auto_map")}
    assert tcfg["name_or_path"] == ocfg["name_or_path"] == cfg["_name_or_path"]
    assert (path / "ice_text.model").is_file()


# --- weights -----------------------------------------------------------------------------------------------


def official_names_at_tiny_size(ref: str, cfg: dict) -> set[str]:
    """The official index's tensor names, keeping the layers the tiny config has."""
    limits = {"transformer.layers.": cfg["num_layers"]}
    if "eva_config" in cfg:
        limits["image_encoder.vit.transformer.layers."] = cfg["eva_config"]["num_layers"]
        limits["image_encoder.qformer.transformer.layers."] = cfg["qformer_config"]["num_layers"]
    keep = set()
    for name in read_json(REF / ref / "pytorch_model.bin.index.json")["weight_map"]:
        m = re.match(r"(.*?layers\.)(\d+)\.", name)
        if m is None or int(m.group(2)) < limits[m.group(1)]:
            keep.add(name)
    return keep


@pytest.mark.parametrize("family, ref", FAMILIES)
def test_sharded_bin_and_index_cover_the_model(request, family, ref):
    path = tiny_dir(request, family)
    cfg = read_json(path / "config.json")
    index = read_json(path / "pytorch_model.bin.index.json")
    official = read_json(REF / ref / "pytorch_model.bin.index.json")
    assert set(index) == set(official) == {"metadata", "weight_map"}
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    n = len(shards)
    assert n >= 2
    assert shards == [f"pytorch_model-{i:05d}-of-{n:05d}.bin" for i in range(1, n + 1)]
    assert all(SHARD.fullmatch(f) for f in official["weight_map"].values())
    assert sorted(p.name for p in path.glob("pytorch_model*")) == sorted(shards + ["pytorch_model.bin.index.json"])
    assert not list(path.glob("*.safetensors*"))
    stored = load_shards(path)
    assert {k: f for k, (f, _) in stored.items()} == weight_map  # the index says where each tensor is
    model = get_family(family).build_model(path, meta=True)
    state = model.state_dict()
    assert {k: tuple(t.shape) for k, (_, t) in stored.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert all(t.dtype == torch.float32 for _, t in stored.values())  # torch_dtype float32
    assert cfg["torch_dtype"] == "float32"
    assert index["metadata"]["total_size"] == sum(np.prod(v.shape) for v in state.values()) * 4
    # official names, layer for layer: lm_head (tied) and each layer's rotary inv_freq buffer included
    assert set(weight_map) == official_names_at_tiny_size(ref, cfg)
    inv = {f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(cfg["num_layers"])}
    assert inv <= set(weight_map) and "lm_head.weight" in weight_map
    assert {k for k, _ in model.named_buffers()} == inv
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    for name in inv:  # upstream RotaryEmbedding(head_dim // 2): base 10000 over the rotary dim head_dim / 2
        dim = head_dim // 2
        expected = 1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim)
        torch.testing.assert_close(stored[name][1].double(), expected, rtol=1e-6, atol=0)  # fp32: measured 1.5e-9
    # the stored lm_head equals the word embeddings (upstream ties them)
    assert torch.equal(stored["lm_head.weight"][1], stored["transformer.word_embeddings.weight"][1])
    assert stored["lm_head.weight"][1].shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert any(k.startswith("image_encoder.") for k in weight_map) == (family == "visualglm")


@pytest.mark.parametrize("family", ["visualglm", "chatglm"])
def test_load_model_is_strict_and_exact(request, family):
    path = tiny_dir(request, family)
    model = get_family(family).load_model(path)
    assert not model.training
    state = model.state_dict()
    stored = load_shards(path)
    assert set(stored) == set(state)
    for key, (_, tensor) in stored.items():
        assert state[key].dtype == torch.float32 and state[key].device.type == "cpu", key
        assert torch.equal(state[key], tensor), key
    half = get_family(family).load_model(path, dtype=torch.bfloat16)
    assert {t.dtype for t in half.state_dict().values()} == {torch.bfloat16}


@pytest.mark.parametrize("family", ["visualglm", "chatglm"])
def test_lm_head_is_tied_after_loading(request, family):
    """Upstream ties lm_head to the word embeddings; a model built from the config has them tied, and so must the
    loaded one: one tensor (no second vocab x hidden copy), trained as one."""
    path = tiny_dir(request, family)
    built = get_family(family).build_model(path, meta=True)
    assert built.lm_head.weight is built.transformer.word_embeddings.weight
    model = get_family(family).load_model(path)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.word_embeddings.weight" in names


# --- broken checkpoints ------------------------------------------------------------------------------------


def _edit_shard(path: Path, edit) -> None:
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    edit(tensors)
    torch.save(tensors, path)


@pytest.mark.parametrize("family", ["visualglm", "chatglm"])
@pytest.mark.parametrize("fault", ["missing", "extra", "shape"])
def test_broken_checkpoint_names_tensor_and_file(request, tmp_path, family, fault):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir(request, family), ckpt)
    index_path = ckpt / "pytorch_model.bin.index.json"
    index = read_json(index_path)
    weight_map = index["weight_map"]
    victim = "transformer.layers.1.mlp.dense_h_to_4h.weight"
    shard = weight_map[victim]
    if fault == "missing":  # gone from the shard; the index still says it is there
        _edit_shard(ckpt / shard, lambda t: t.pop(victim))
    elif fault == "extra":  # a layer the config does not have
        victim = "transformer.layers.2.mlp.dense_h_to_4h.weight"
        _edit_shard(ckpt / shard, lambda t: t.__setitem__(victim, torch.zeros(128, 64)))
        weight_map[victim] = shard
        index_path.write_text(json.dumps(index))
    else:
        _edit_shard(ckpt / shard, lambda t: t.__setitem__(victim, torch.zeros(128, 32)))
    with pytest.raises(ValueError) as info:
        get_family(family).load_model(ckpt)
    message = str(info.value)
    assert victim in message
    assert shard in message
    if fault == "shape":
        assert "(128, 32)" in message and "(128, 64)" in message
