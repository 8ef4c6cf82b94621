"""FAMILIES: the only registry of model families.

A family is a module exposing:
  COMPONENTS      {"vision" | "projector" | "language": [module-name prefixes]} (official names)
  LORA_TARGETS    {component: [module-name leaves adapted by default]}
  OUTPUT_LAYER    name of the output head (kept in full precision under QLoRA)
  add_prefix(model, num_virtual_tokens, projection)   optional: P-tuning v2 prefix module
  load_model(path, dtype) -> nn.Module        official checkpoint folder -> model (eval mode)
  load_processor(path) -> processor           .encode(turns, images, source, max_length, generation)
                                              .collate(items, pad_left) .decode(ids) .pad_id
                                              .collate_packed(items, max_length)   (data.packing)
                                              .token_count(turns, image_sizes)      (data.batch_tokens)
  enable_packing(model)                       optional: switch the model to attention that isolates packed
                                              samples (families whose native model does so by itself lack it)
  build_model(path, meta) -> nn.Module        the model config.json describes (meta device: no memory)
  generation_eos(model) -> list[int]
  stream(model, batch, options, eos, pad_id) -> iterator of each step's new tokens (B,): glmtune.generation's
                                              decode loop with the family's position rule (KV cache)
  generate(model, batch, max_new_tokens, eos, pad_id) -> new token ids (greedy)
  make_tiny(out_dir, seed) -> Path            tiny checkpoint in the official layout
A new family plugs in by adding one line here.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

FAMILIES = {
    "glm41v": "glmtune.models.glm41v",  # GLM-4.1V (transformers Glm4vForConditionalGeneration)
    "glm4v": "glmtune.models.glm4v",  # GLM-4V-9B, native (GLM-4 + EVA2-CLIP-E)
    "glm4": "glmtune.models.glm4",  # GLM-4-9B-Chat, native (GLM-4V-9B's text model)
    "visualglm": "glmtune.models.visualglm",  # VisualGLM-6B, native (ChatGLM-6B + BLIP-2)
    "chatglm": "glmtune.models.chatglm",  # ChatGLM-6B, native (VisualGLM-6B's text model)
}

# Families whose processor has `collate_packed(items, max_length)` and whose model isolates packed samples
# (after `enable_packing(model)` where the family has one): data.packing=true is accepted for these.
PACKING_FAMILIES = ("glm41v", "glm4v", "glm4", "visualglm", "chatglm")
# What config validation checks before anything heavy is imported; tests/test_component_matrix.py checks these
# against each family module (its COMPONENTS, its add_prefix).
FAMILY_COMPONENTS = {
    "glm41v": ("vision", "projector", "language"),
    "glm4v": ("vision", "projector", "language"),
    "glm4": ("language",),
    "visualglm": ("vision", "projector", "language"),
    "chatglm": ("language",),
}
PTUNING_FAMILIES = ("glm4v", "glm4", "visualglm", "chatglm")  # P-tuning v2 (adapter.method=ptuning)
# Related checkpoints of another architecture, named in the error rather than built as the wrong model.
UNSUPPORTED = {"glm4v_moe": "; GLM-4.5V / GLM-4.6V (Glm4vMoeForConditionalGeneration, model_type 'glm4v_moe') are "
                            "not supported yet"}


def get_family(name: str) -> ModuleType:
    """Import a family lazily so that `glmtune --help` does not import torch/transformers."""
    if name not in FAMILIES:
        from glmtune.config import RecipeError

        raise RecipeError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name])


def detect_family(model_dir: str | Path) -> str:
    """Family of a model folder from its config.json (for merged models, chat and eval without a recipe)."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a model folder in the official layout "
                                f"or a checkpoint folder written by `glmtune train`")
    raw = json.loads(cfg.read_text())
    model_type = raw.get("model_type", "")
    if model_type == "glm4v":
        return "glm41v"
    if model_type == "chatglm" and "multi_query_group_num" in raw:  # GLM-4 generation of the chatglm format
        return "glm4v" if raw.get("vision_config") else "glm4"
    if model_type == "chatglm" and raw.get("position_encoding_2d"):  # the 2023 ChatGLM-6B format
        return "visualglm" if raw.get("eva_config") else "chatglm"
    from glmtune.config import CheckpointError

    raise CheckpointError(f"{cfg}: model_type {model_type!r} with these keys is not a supported family; "
                   f"known: {', '.join(sorted(FAMILIES))}" + UNSUPPORTED.get(model_type, ""))
