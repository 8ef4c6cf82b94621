"""FAMILIES: the only registry of model families, of declared `Family` objects (glmtune/models/family.py).

Importing this module imports no torch: each declaration names the module of its functions, imported on first use.
Recipe validation, `detect_family`, capability errors and the tests' family matrices all derive from these objects.
A new family plugs in with its own package and one line here.
"""

from __future__ import annotations

import json
from pathlib import Path

from glmtune.errors import CheckpointError, RecipeError
from glmtune.models.chatglm import FAMILY as CHATGLM
from glmtune.models.family import Family
from glmtune.models.glm4 import FAMILY as GLM4
from glmtune.models.glm41v import FAMILY as GLM41V
from glmtune.models.glm4v import FAMILY as GLM4V
from glmtune.models.visualglm import FAMILY as VISUALGLM

FAMILIES: dict[str, Family] = {f.name: f for f in (
    GLM41V,  # GLM-4.1V (transformers Glm4vForConditionalGeneration)
    GLM4V,  # GLM-4V-9B, native (GLM-4 + EVA2-CLIP-E)
    GLM4,  # GLM-4-9B-Chat, native (GLM-4V-9B's text model)
    VISUALGLM,  # VisualGLM-6B, native (ChatGLM-6B + BLIP-2)
    CHATGLM,  # ChatGLM-6B, native (VisualGLM-6B's text model)
)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise RecipeError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def families_with(capability: str) -> list[str]:
    return [name for name, family in FAMILIES.items() if family.has(capability)]


def detect_family(model_dir: str | Path) -> str:
    """Family of a model folder from its config.json (for merged models, chat and eval without a recipe)."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a model folder in the official layout "
                                f"or a checkpoint folder written by `glmtune train`")
    try:
        raw = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e}); re-download the checkpoint's config.json") from None
    found = [name for name, family in FAMILIES.items() if family.recognizes(raw)]
    if len(found) == 1:
        return found[0]
    if found:  # two declarations claim the same config: a bug in the registry, not in the user's files
        raise AssertionError(f"{cfg}: recognised by several families {found}")
    raise CheckpointError(f"{cfg}: model_type {raw.get('model_type', '')!r} (architectures "
                          f"{raw.get('architectures')}) is not a supported family; known: "
                          + "; ".join(f"{f.name} ({f.title})" for f in FAMILIES.values()))
