"""ChatGLM-6B / VisualGLM-6B config: the official `config.json` keys (model_type "chatglm", the 2023 format)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from glmtune.config import CheckpointError


@dataclass
class EvaConfig:  # EVA-CLIP ViT-g (SwissArmyTransformer ViT names)
    num_layers: int = 39
    hidden_size: int = 1408
    num_attention_heads: int = 16
    inner_hidden_size: int = 6144
    layernorm_epsilon: float = 1e-6
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    patch_size: int = 14
    in_channels: int = 3
    max_sequence_length: int = 257  # cls + (224 / 14)^2 patches
    use_final_layernorm: bool = False
    layernorm_order: str = "pre"


@dataclass
class QFormerConfig:  # BLIP-2 Q-Former (SwissArmyTransformer BERT-style, post-LN)
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    vocab_size: int = 32  # the learned query tokens
    layernorm_epsilon: float = 1e-12
    is_decoder: list[bool] = field(default_factory=lambda: [True, False] * 6)  # cross-attention layers
    cross_attn_hidden_size: int = 1408
    layernorm_order: str = "post"


@dataclass
class ChatGLMConfig:
    num_layers: int = 28
    hidden_size: int = 4096
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    vocab_size: int = 130528
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int = 130004  # <sop>
    eos_token_id: int = 130005  # <eop>
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int = 3
    image_length: int = 32
    pre_seq_len: int | None = None  # P-tuning v2: prefix length (`transformer.prefix_encoder` in the weights)
    prefix_projection: bool = False  # the prefix through upstream's 2-layer MLP (`prefix_encoder.trans`)
    eva_config: EvaConfig | None = None
    qformer_config: QFormerConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def config_from_dict(raw: dict, source: str = "config.json") -> ChatGLMConfig:
    known = {f.name for f in fields(ChatGLMConfig)} - {"eva_config", "qformer_config"}
    cfg = ChatGLMConfig(**{k: v for k, v in raw.items() if k in known})
    if not cfg.position_encoding_2d:
        raise CheckpointError(f"{source}: position_encoding_2d=false is not ChatGLM-6B's architecture")
    if cfg.pre_seq_len is not None and (type(cfg.pre_seq_len) is not int or cfg.pre_seq_len < 1):
        raise CheckpointError(f"{source}: pre_seq_len={cfg.pre_seq_len!r}; a P-tuning v2 prefix length is a positive "
                              f"integer (or null for no prefix)")
    if raw.get("quantization_bit"):
        raise CheckpointError(f"{source}: quantization_bit={raw['quantization_bit']}: load the unquantized checkpoint")
    if raw.get("eva_config"):
        cfg.eva_config = EvaConfig(**{k: v for k, v in raw["eva_config"].items()
                                      if k in {f.name for f in fields(EvaConfig)}})
        cfg.qformer_config = QFormerConfig(**{k: v for k, v in raw["qformer_config"].items()
                                              if k in {f.name for f in fields(QFormerConfig)}})
        for name, sub in (("eva_config", cfg.eva_config), ("qformer_config", cfg.qformer_config)):
            expected = "pre" if name == "eva_config" else "post"
            if sub.layernorm_order != expected:
                raise CheckpointError(f"{source}: {name}.layernorm_order={sub.layernorm_order!r}; "
                                      f"BLIP-2 uses {expected!r}")
    return cfg


def load_config(model_dir: str | Path) -> ChatGLMConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "chatglm" or "multi_query_group_num" in raw:
        raise CheckpointError(f"{path}: not a ChatGLM-6B / VisualGLM-6B config (model_type chatglm, 2023 format)")
    return config_from_dict(raw, str(path))
