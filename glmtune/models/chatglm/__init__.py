"""ChatGLM-6B (THUDM/chatglm-6b): VisualGLM-6B's text model, same native code without the image encoder."""

from __future__ import annotations

from functools import partial

from glmtune.models.visualglm import COMPONENTS as _VISION_COMPONENTS
from glmtune.models.visualglm import LORA_TARGETS as _VISION_TARGETS
from glmtune.models.visualglm import (
    OUTPUT_LAYER,
    add_prefix,
    build_model,
    generate,
    generation_eos,
    load_model,
    load_processor,
    stream,
)
from glmtune.models.visualglm.tiny import make_tiny as _make_tiny

COMPONENTS = {"language": _VISION_COMPONENTS["language"]}
LORA_TARGETS = {"language": _VISION_TARGETS["language"]}
make_tiny = partial(_make_tiny, vision=False)

__all__ = ["COMPONENTS", "OUTPUT_LAYER", "add_prefix", "LORA_TARGETS", "build_model", "load_model", "load_processor",
           "make_tiny", "generation_eos", "generate", "stream"]
