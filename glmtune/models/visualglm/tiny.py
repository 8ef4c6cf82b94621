"""Tiny VisualGLM-6B / ChatGLM-6B checkpoints laid out like THUDM/visualglm-6b and THUDM/chatglm-6b.

config.json with the official keys (incl. `eva_config`, `qformer_config`, `image_length`; minus `auto_map`:
glmtune runs no remote code), sharded `pytorch_model-0000N-of-0000M.bin` + `pytorch_model.bin.index.json` as
upstream ships them (so the `.bin` loader, `torch.load(weights_only=True)`, is what loads them), a tiny
sentencepiece `ice_text.model` with ChatGLM-6B's special pieces, tokenizer_config.json. Random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmtune.models.tiny_corpus import TINY_CORPUS
from glmtune.models.visualglm.config import config_from_dict
from glmtune.models.visualglm.model import ChatGLMForConditionalGeneration
from glmtune.models.visualglm.tokenizer import write_tiny_tokenizer
from glmtune.models.weights import init_random, save_sharded

OFFICIAL = {  # THUDM/chatglm-6b config.json (minus auto_map); sizes and ids replaced below
    "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"], "bos_token_id": 130004,
    "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3,
    "hidden_size": 4096, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05, "max_sequence_length": 2048,
    "model_type": "chatglm", "num_attention_heads": 32, "num_layers": 28, "position_encoding_2d": True,
    "torch_dtype": "float16", "transformers_version": "4.23.1", "use_cache": True, "vocab_size": 130528,
}
OFFICIAL_VISION = {  # what THUDM/visualglm-6b adds
    "_name_or_path": "THUDM/visualglm-6b", "image_length": 32,
    "eva_config": {"num_layers": 39, "hidden_size": 1408, "num_attention_heads": 16, "vocab_size": 1,
                   "layernorm_order": "pre", "model_parallel_size": 1, "max_sequence_length": 257,
                   "inner_hidden_size": 6144, "use_final_layernorm": False, "layernorm_epsilon": 1e-06,
                   "image_size": [224, 224], "pre_len": 1, "post_len": 0, "in_channels": 3, "num_classes": 0,
                   "patch_size": 14},
    "qformer_config": {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "vocab_size": 32,
                       "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": 0,
                       "is_decoder": [True, False] * 6, "cross_attn_hidden_size": 1408, "layernorm_epsilon": 1e-12},
}
TINY = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "inner_hidden_size": 128,
        "torch_dtype": "float32"}
# 112 px / patch 14 = 8x8 patches + cls; 32 query tokens as upstream (the prompt holds 32 placeholders)
TINY_EVA = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "inner_hidden_size": 64,
            "image_size": [112, 112], "max_sequence_length": 65}
TINY_QFORMER = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "is_decoder": [True, False],
                "cross_attn_hidden_size": 32}
TINY_SP_VOCAB = 100
TINY_STD = 0.1  # as the other tiny models: lets adapters make confident predictions at width 64
SUBLAYER_GAIN = 16.0


def make_tiny(out_dir: str | Path, seed: int = 0, vision: bool = True, max_shard_bytes: int = 400_000) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tiny_tokenizer(out, TINY_CORPUS, TINY_SP_VOCAB,
                               name_or_path="THUDM/visualglm-6b" if vision else "THUDM/chatglm-6b")
    raw = dict(OFFICIAL, **(OFFICIAL_VISION if vision else {}), **TINY)
    if vision:
        raw["eva_config"] = dict(raw["eva_config"], **TINY_EVA)
        raw["qformer_config"] = dict(raw["qformer_config"], **TINY_QFORMER)
    raw.update(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], mask_token_id=ids["mask_token_id"],
               gmask_token_id=ids["gmask_token_id"], pad_token_id=ids["pad_token_id"],
               # the embedding has a few spare rows past the tokenizer, as the official 130528 > 130344
               vocab_size=-(-ids["sp_vocab_size"] // 64) * 64)
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(config_from_dict(raw))
    init_random(model, TINY_STD)
    with torch.no_grad():
        # ChatGLM-6B scales the residual by sqrt(56) whatever the depth: at width 64 sublayer outputs of a
        # plain init would vanish next to it, leaving a model whose output ignores attention. Scale them up.
        for layer in model.transformer.layers:
            layer.attention.dense.weight.mul_(SUBLAYER_GAIN)
            layer.mlp.dense_4h_to_h.weight.mul_(SUBLAYER_GAIN)
    save_sharded(model.state_dict(), out, max_shard_bytes, prefix="pytorch_model", ext="bin")
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out
