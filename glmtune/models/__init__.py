"""FAMILIES: the only registry of model families.

A family is a module exposing:
  COMPONENTS      {"vision" | "projector" | "language": [module-name prefixes]} (official names)
  LORA_TARGETS    {component: [module-name leaves adapted by default]}
  load_model(path, dtype) -> nn.Module        official checkpoint folder -> model (eval mode)
  load_processor(path) -> processor           .encode(turns, images, source, max_length, generation)
                                              .collate(items, pad_left) .decode(ids) .pad_id
  generation_eos(model) -> list[int]
  make_tiny(out_dir, seed) -> Path            tiny checkpoint in the official layout
New families (native GLM-4V-9B, VisualGLM-6B) plug in by adding one line here.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

FAMILIES = {
    "glm41v": "glmtune.models.glm41v",  # GLM-4.1V / GLM-4.5V (transformers Glm4vForConditionalGeneration)
}


def get_family(name: str) -> ModuleType:
    """Import a family lazily so that `glmtune --help` does not import torch/transformers."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name])


# config.json `model_type` -> family, for folders given without a recipe (merged models, chat, eval).
MODEL_TYPES = {"glm4v": "glm41v"}


def detect_family(model_dir: str | Path) -> str:
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a model folder in the official layout "
                                f"or a checkpoint folder written by `glmtune train`")
    model_type = json.loads(cfg.read_text()).get("model_type", "")
    if model_type not in MODEL_TYPES:
        raise KeyError(f"{cfg}: model_type {model_type!r} is not a supported family; known: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]
