"""Tiny GLM-4V-9B / GLM-4-9B-Chat checkpoints laid out like THUDM/glm-4v-9b and THUDM/glm-4-9b-chat.

config.json with the official keys (minus `auto_map`: glmtune runs no remote code), sharded
`model-0000N-of-0000M.safetensors` + `model.safetensors.index.json` with the official tensor names (the
`rotary_pos_emb.inv_freq` buffer included, as in the official weight map), a small `tokenizer.model` in
the official tiktoken format with the GLM-4 special tokens right after its vocabulary, tokenizer_config.json
and (text model) generation_config.json. Random weights from a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmtune.models.glm4v.config import config_from_dict
from glmtune.models.glm4v.model import ChatGLMForConditionalGeneration
from glmtune.models.glm4v.tokenizer import write_tiny_tokenizer
from glmtune.models.tiny_corpus import TINY_CORPUS
from glmtune.models.weights import init_random, save_sharded

# The official config.json files (THUDM/glm-4-9b-chat; THUDM/glm-4v-9b with its official seq_length 8192),
# minus auto_map. Sizes and token ids are replaced below.
OFFICIAL_TEXT = {
    "_name_or_path": "THUDM/glm-4-9b-chat", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
    "attn_implementation": "sdpa", "bias_dropout_fusion": True, "ffn_hidden_size": 13696,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096, "kv_channels": 128,
    "layernorm_epsilon": 1.5625e-07, "multi_query_attention": True, "multi_query_group_num": 2,
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_layers": 40, "rope_ratio": 500, "original_rope": True,
    "padded_vocab_size": 151552, "post_layer_norm": True, "rmsnorm": True, "seq_length": 131072, "use_cache": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.42.4", "tie_word_embeddings": False,
    "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
}
OFFICIAL_VISION_EXTRA = {
    "_name_or_path": "THUDM/glm-4v-9b", "seq_length": 8192, "transformers_version": "4.44.0",
    "vision_config": {"dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 63,
                      "hidden_size": 1792, "patch_size": 14, "num_heads": 16, "intermediate_size": 15360,
                      "layer_norm_eps": 1e-06, "num_positions": 6401, "image_size": 1120, "scaling_factor": 8},
    "boi_token_id": 151339, "eoi_token_id": 151340,
}

TINY_TEXT = {"hidden_size": 64, "num_layers": 2, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 16,
             "multi_query_group_num": 2, "ffn_hidden_size": 128}
# 112 px / patch 14 = 8x8 patches -> 2x2 conv -> 16 image positions (+ boi, eoi), like the tiny GLM-4.1V.
TINY_VISION = {"num_hidden_layers": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
               "image_size": 112, "num_positions": 65}
TINY_MERGES = 220
# Weight init std: as for the tiny GLM-4.1V, 0.1 instead of 0.02 so that a frozen random output layer
# still lets an adapter make confident predictions at width 64.
TINY_STD = 0.1


def tiny_config(special: dict[str, int], vocab: int, vision: bool) -> dict:
    raw = {k: v for k, v in OFFICIAL_TEXT.items()}
    if vision:
        raw.update(OFFICIAL_VISION_EXTRA)
        raw.pop("rope_ratio")  # absent in the official glm-4v-9b config (= 1)
        raw["vision_config"] = dict(raw["vision_config"], **TINY_VISION)
        raw["boi_token_id"], raw["eoi_token_id"] = special["<|begin_of_image|>"], special["<|end_of_image|>"]
    raw.update(TINY_TEXT)
    raw["padded_vocab_size"] = vocab
    raw["eos_token_id"] = [special["<|endoftext|>"], special["<|user|>"], special["<|observation|>"]]
    raw["pad_token_id"] = special["<|endoftext|>"]
    raw["torch_dtype"] = "float32"  # the tiny weights are stored in fp32 for exact tests
    return raw


def make_tiny(out_dir: str | Path, seed: int = 0, vision: bool = True, max_shard_bytes: int = 400_000) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = write_tiny_tokenizer(out, TINY_CORPUS, TINY_MERGES, model_max_length=8192 if vision else 128000,
                                   image_size=TINY_VISION["image_size"] if vision else None)
    vocab = -(-(max(special.values()) + 1) // 64) * 64  # padded like the official 151552
    raw = tiny_config(special, vocab, vision)
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(config_from_dict(raw))
    init_random(model, std=TINY_STD)
    save_sharded(model.state_dict(), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    if not vision:
        (out / "generation_config.json").write_text(json.dumps({
            "eos_token_id": raw["eos_token_id"], "pad_token_id": raw["pad_token_id"], "do_sample": True,
            "temperature": 0.8, "max_length": 128000, "top_p": 0.8}, indent=2))
    return out
