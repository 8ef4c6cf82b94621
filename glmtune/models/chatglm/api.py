"""ChatGLM-6B's functions: VisualGLM-6B's native code; only the tiny checkpoint differs (no image encoder)."""

from __future__ import annotations

from functools import partial

from glmtune.models.visualglm.api import (  # noqa: F401  (the family's functions)
    add_prefix,
    build_model,
    generate,
    generation_eos,
    load_model,
    load_processor,
    stream,
)
from glmtune.models.visualglm.tiny import make_tiny as _make_tiny

make_tiny = partial(_make_tiny, vision=False)
