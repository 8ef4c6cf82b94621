"""GLM-4-9B-Chat's functions: GLM-4V-9B's native code; only the tiny checkpoint differs (no vision tower)."""

from __future__ import annotations

from functools import partial

from glmtune.models.glm4v.api import (  # noqa: F401  (the family's functions)
    add_prefix,
    build_model,
    generate,
    generation_eos,
    load_model,
    load_processor,
    stream,
)
from glmtune.models.glm4v.tiny import make_tiny as _make_tiny

make_tiny = partial(_make_tiny, vision=False)
