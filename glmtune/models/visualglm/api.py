"""VisualGLM-6B (THUDM/visualglm-6b): native ChatGLM-6B + BLIP-2 (EVA-CLIP + Q-Former), official `.bin` layout."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from glmtune.generation import GenerationOptions, collect, decode_steps
from glmtune.models.visualglm.config import load_config
from glmtune.models.visualglm.model import ChatGLMForConditionalGeneration
from glmtune.models.visualglm.template import ChatGLMProcessor
from glmtune.models.visualglm.tiny import make_tiny
from glmtune.models.weights import load_official


def build_model(path: str | Path, meta: bool = False) -> ChatGLMForConditionalGeneration:
    cfg = load_config(path)
    with torch.device("meta" if meta else "cpu"):
        return ChatGLMForConditionalGeneration(cfg)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Official checkpoint folder (sharded .bin, read with weights_only=True, or safetensors) -> model."""
    return load_official(partial(build_model, path), path, dtype).eval()


def load_processor(path: str | Path) -> ChatGLMProcessor:
    return ChatGLMProcessor(path)


def add_prefix(model, num_virtual_tokens: int, projection: bool) -> None:
    """P-tuning v2: a trainable `transformer.prefix_encoder` (fp32) shaped as ChatGLM-6B's remote code builds it
    (one key and one value of hidden width per layer and virtual token; with `projection`, its MLP)."""
    from glmtune.models.visualglm.model import PrefixEncoder

    device = model.transformer.word_embeddings.weight.device
    model.transformer.prefix_encoder = PrefixEncoder(model.config, num_virtual_tokens, projection).to(device)


def generation_eos(model) -> list[int]:
    return [model.config.eos_token_id]


def blank_image_features(model) -> torch.Tensor:
    """BLIP-2 on one blank image: DeepSpeed runs it for text-only batches too (see distributed.py)."""
    eva = model.config.eva_config
    weight = next(model.image_encoder.parameters())
    return model.image_encoder(torch.zeros(1, eva.in_channels, *eva.image_size, dtype=weight.dtype))


def stream(model, batch: dict, options: GenerationOptions, eos: list[int], pad_id: int):
    """Decoding steps with the KV cache: new tokens keep the [gMASK] position, block position counts on."""

    def advance(pos):  # (B, 2, 1): [position, block position]
        return torch.stack([pos[:, 0], pos[:, 1] + 1], dim=1)

    last = batch["position_ids"][:, :, -1:]  # left padding keeps the last column real
    return decode_steps(model, batch, options, eos, pad_id, advance, last)


def generate(model, batch: dict, max_new_tokens: int, eos: list[int], pad_id: int) -> torch.Tensor:
    """Greedy new tokens (B, <= max_new_tokens)."""
    return collect(stream(model, batch, GenerationOptions(max_new_tokens=max_new_tokens), eos, pad_id))


