"""GLM-4V-9B (THUDM/glm-4v-9b): native GLM-4 + EVA2-CLIP-E, loaded from the official layout, no remote code."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from glmtune.generation import GenerationOptions, collect, decode_steps
from glmtune.models.glm4v.config import load_config
from glmtune.models.glm4v.model import ChatGLMForConditionalGeneration
from glmtune.models.glm4v.template import Glm4Processor
from glmtune.models.glm4v.tiny import make_tiny
from glmtune.models.weights import load_official


def build_model(path: str | Path, meta: bool = False) -> ChatGLMForConditionalGeneration:
    """The model config.json describes, on the meta device (no memory) or with uninitialised weights."""
    cfg = load_config(path)
    with torch.device("meta" if meta else "cpu"):
        return ChatGLMForConditionalGeneration(cfg)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Official checkpoint folder -> model, shard by shard, with a strict name and shape check."""
    return load_official(partial(build_model, path), path, dtype).eval()


def load_processor(path: str | Path) -> Glm4Processor:
    return Glm4Processor(path)


def add_prefix(model, num_virtual_tokens: int, projection: bool) -> None:
    """P-tuning v2: a trainable `transformer.prefix_encoder` (fp32) with GQA-shaped keys/values per layer."""
    from glmtune.models.glm4v.model import PrefixEncoder

    device = model.transformer.embedding.word_embeddings.weight.device
    model.transformer.prefix_encoder = PrefixEncoder(model.config, num_virtual_tokens, projection).to(device)


def generation_eos(model) -> list[int]:
    return list(model.config.eos_token_id)


def blank_image_features(model) -> torch.Tensor:
    """The vision tower on one blank image: DeepSpeed runs it for text-only batches too (see distributed.py)."""
    tower, size = model.transformer.vision, model.config.vision_config.image_size
    weight = next(tower.parameters())
    return tower(torch.zeros(1, model.config.vision_config.in_channels, size, size, dtype=weight.dtype))


def stream(model, batch: dict, options: GenerationOptions, eos: list[int], pad_id: int):
    """Decoding steps with the KV cache. The next token's position continues the unexpanded prompt
    positions (last position + 1) while the cache holds the expanded image positions, as upstream."""
    last = batch["position_ids"].max(dim=1).values[:, None]  # (B, 1)
    return decode_steps(model, batch, options, eos, pad_id, lambda pos: pos + 1, last)


def generate(model, batch: dict, max_new_tokens: int, eos: list[int], pad_id: int) -> torch.Tensor:
    """Greedy new tokens (B, <= max_new_tokens)."""
    return collect(stream(model, batch, GenerationOptions(max_new_tokens=max_new_tokens), eos, pad_id))


