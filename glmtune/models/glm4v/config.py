"""GLM-4 / GLM-4V config: the official `config.json` keys (model_type "chatglm"), read into a dataclass.

Only the architecture GLM-4-9B-Chat and GLM-4V-9B actually use is implemented (RMSNorm, "original"
interleaved RoPE, final norm, residual from the block input); any other setting is a clear error
instead of a silently different model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from glmtune.config import CheckpointError


@dataclass
class VisionConfig:
    num_hidden_layers: int = 63
    hidden_size: int = 1792
    num_heads: int = 16
    intermediate_size: int = 15360
    patch_size: int = 14
    image_size: int = 1120
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    scaling_factor: float = 8.0
    hidden_act: str = "gelu"
    dropout_prob: float = 0.0
    num_positions: int = 6401

    @property
    def num_patches(self) -> int:
        """Image positions in the LM after the 2x2 conv (1600 at full size); boi/eoi come on top."""
        return (self.image_size // self.patch_size // 2) ** 2


@dataclass
class Glm4Config:
    num_layers: int = 40
    hidden_size: int = 4096
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 13696
    padded_vocab_size: int = 151552
    layernorm_epsilon: float = 1.5625e-07
    rope_ratio: float = 1.0  # absent in glm-4v-9b's config.json (= 1); 500 in glm-4-9b-chat's
    seq_length: int = 8192
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    rmsnorm: bool = True
    post_layer_norm: bool = True
    original_rope: bool = True
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = False
    eos_token_id: list[int] = field(default_factory=lambda: [151329, 151336, 151338])
    pad_token_id: int = 151329
    pre_seq_len: int | None = None  # P-tuning v2 prefix length (an exported prefix: transformer.prefix_encoder)
    prefix_projection: bool = False
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    vision_config: VisionConfig | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the file as read, written back unchanged by merge

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def kv_groups(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Only the first half of each head rotates (upstream: RotaryEmbedding(kv_channels // 2))."""
        return self.kv_channels // 2


# Settings the native code does not implement: (key, the value it implements).
_REQUIRED = (("rmsnorm", True), ("post_layer_norm", True), ("original_rope", True),
             ("apply_residual_connection_post_layernorm", False), ("tie_word_embeddings", False))


def config_from_dict(raw: dict, source: str = "config.json") -> Glm4Config:
    known = {f.name for f in fields(Glm4Config)} - {"raw", "vision_config"}
    cfg = Glm4Config(**{k: v for k, v in raw.items() if k in known}, raw=dict(raw))
    if cfg.rope_ratio is None:
        cfg.rope_ratio = 1.0
    if isinstance(cfg.eos_token_id, int):
        cfg.eos_token_id = [cfg.eos_token_id]
    for key, value in _REQUIRED:
        if getattr(cfg, key) != value:
            raise CheckpointError(f"{source}: {key}={getattr(cfg, key)!r} is not supported by glmtune's native GLM-4 "
                             f"(GLM-4-9B-Chat and GLM-4V-9B use {value!r})")
    vision = raw.get("vision_config")
    if vision:
        vknown = {f.name for f in fields(VisionConfig)}
        cfg.vision_config = VisionConfig(**{k: v for k, v in vision.items() if k in vknown})
        if cfg.boi_token_id is None or cfg.eoi_token_id is None:
            raise CheckpointError(f"{source}: vision_config is set but boi_token_id/eoi_token_id are missing")
    return cfg


def load_config(model_dir: str | Path) -> Glm4Config:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "chatglm":
        raise CheckpointError(f"{path}: model_type {raw.get('model_type')!r}, expected 'chatglm' (GLM-4 / GLM-4V)")
    return config_from_dict(raw, str(path))
