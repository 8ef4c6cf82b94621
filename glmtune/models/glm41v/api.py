"""GLM-4.1V through transformers' own `Glm4vForConditionalGeneration` (no native code needed).

Official parameter names (model.safetensors.index.json of zai-org/GLM-4.1V-9B-Thinking) are the
module names of transformers' class, so PEFT adapter keys and merged shards use them unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmtune.models.glm41v.template import Glm41vProcessor
from glmtune.models.packed_attention import PackedRows, segment_spans, varlen_attention
from glmtune.models.glm41v.tiny import make_tiny

# Keys of the flat July-2025 config.json (transformers 4.53) that moved into `text_config` later.
_FLAT_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "attention_dropout", "attention_bias", "pad_token_id", "eos_token_id",
)


def normalize_config(raw: dict) -> dict:
    """Return the config in the nested layout transformers 5 reads.

    The first GLM-4.1V release wrote a flat config.json (text keys at the top level, `rope_theta`,
    `partial_rotary_factor`, `rope_scaling.mrope_section`); current transformers silently ignores those
    keys and would build a default-size text model, so convert them explicitly.
    """
    if "text_config" in raw:
        return raw
    out = {k: v for k, v in raw.items() if k not in _FLAT_TEXT_KEYS}
    text = {k: raw[k] for k in _FLAT_TEXT_KEYS if k in raw}
    rope = dict(raw.get("rope_scaling") or {})
    rope.pop("type", None)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0),
                               "partial_rotary_factor": raw.get("partial_rotary_factor", 0.5), **rope}
    for k in ("rope_theta", "partial_rotary_factor", "rope_scaling", "torch_dtype"):
        out.pop(k, None)
    text["model_type"] = "glm4v_text"
    out["text_config"] = text
    return out


def build_config(path: str | Path):
    from transformers import Glm4vConfig

    raw = json.loads((Path(path) / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type != "glm4v":  # e.g. GLM-4.5V's glm4v_moe would silently build a dense model of the wrong shape
        from glmtune.errors import CheckpointError

        raise CheckpointError(f"{Path(path) / 'config.json'}: model_type {model_type!r}, but the glm41v family reads "
                              f"GLM-4.1V checkpoints (model_type 'glm4v'); `glmtune inspect` names the family of a "
                              f"checkpoint folder")
    return Glm4vConfig(**{k: v for k, v in normalize_config(raw).items()
                          if k not in ("architectures", "transformers_version", "model_type")})


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Official checkpoint folder -> Glm4vForConditionalGeneration, shard by shard (transformers' loader)."""
    from transformers import Glm4vForConditionalGeneration

    model = Glm4vForConditionalGeneration.from_pretrained(str(path), config=build_config(path), dtype=dtype)
    return model.eval()


def load_processor(path: str | Path) -> Glm41vProcessor:
    return Glm41vProcessor(path)


def generation_eos(model) -> list[int]:
    eos = model.config.text_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def blank_image_features(model) -> torch.Tensor:
    """The vision tower and merger on the smallest blank image (one merged token): DeepSpeed runs it for
    text-only batches too (see distributed.py)."""
    v, tower = model.config.vision_config, model.model.visual
    m = v.spatial_merge_size
    weight = next(tower.parameters())
    pixels = torch.zeros(m * m, v.in_channels * v.temporal_patch_size * v.patch_size**2, dtype=weight.dtype)
    return tower(pixels, grid_thw=torch.tensor([[1, m, m]])).pooler_output


PACKED_ATTENTION = "glmtune_packed"


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: SDPA per packed segment when the text model gets packed positions
    (no attention mask, sequence positions restarting at 0), transformers' own SDPA otherwise (generation, padding)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seq_positions = kwargs.pop("position_ids", None)
    if attention_mask is not None or seq_positions is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    def one(q, k, v, _):
        return sdpa_attention_forward(module, q, k, v, None, dropout, scaling, is_causal=True)[0]

    packed = PackedRows(segment_spans(seq_positions))  # per layer: transformers passes only the positions
    return varlen_attention(one, query, key, value, packed, scaling, dropout), None


def _packed_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed rows (the attention isolates segments); transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def enable_packing(model) -> None:
    """Route the text model's attention through `_packed_attention` (data.packing); the vision tower is
    per image already."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    model.config.text_config._attn_implementation = PACKED_ATTENTION


def build_model(path: str | Path, meta: bool = False):
    """The model config.json describes, on the meta device (no memory) or with fresh weights."""
    from transformers import Glm4vForConditionalGeneration

    with torch.device("meta" if meta else "cpu"):
        return Glm4vForConditionalGeneration(build_config(path))


def stream(model, batch: dict, options, eos: list[int], pad_id: int):
    """Decoding steps through transformers' generate (M-RoPE positions, KV cache), tokens chosen by
    glmtune.generation's rule."""
    from glmtune.generation import hf_generate_steps

    return hf_generate_steps(model, batch, options, eos, pad_id)


def generate(model, batch: dict, max_new_tokens: int, eos: list[int], pad_id: int) -> torch.Tensor:
    """Greedy new tokens (B, <= max_new_tokens)."""
    from glmtune.generation import GenerationOptions, collect

    return collect(stream(model, batch, GenerationOptions(max_new_tokens=max_new_tokens), eos, pad_id))


