"""P-tuning v2: learned per-layer prefix keys/values in the language model's attention.

The family builds the prefix module (`family.add_prefix(model, num_virtual_tokens, projection)`), shaped for
its attention (KV groups for GLM-4); the base stays frozen, `full` components may train beside it. A
checkpoint holds the prefix (and any full component) as full_weights.safetensors under official names plus
PTUNING_FILE. `glmtune merge` cannot fold a prefix into weights: it writes the official layout plus the
effective prefix table as `transformer.prefix_encoder.embedding.weight` with `pre_seq_len` in config.json,
the form the upstream GLM code reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from glmtune.adapters.trainable import set_trainable
from glmtune.config import RecipeError

PTUNING_FILE = "ptuning.json"


def attach_ptuning(model, family, cfg):
    if not hasattr(family, "add_prefix"):
        raise RecipeError("adapter.method=ptuning is not implemented for this family yet "
                          "(available for: glm4v, glm4); use lora/dora/qlora")
    set_trainable(model, family.COMPONENTS, cfg.components)
    family.add_prefix(model, cfg.num_virtual_tokens, cfg.prefix_projection)
    model.glmtune_ptuning = {"num_virtual_tokens": cfg.num_virtual_tokens, "prefix_projection": cfg.prefix_projection}
    return model


def write_record(model, out_dir: Path) -> None:
    (out_dir / PTUNING_FILE).write_text(json.dumps(model.glmtune_ptuning, indent=2))


def add_prefix_like(model, family, ckpt: Path) -> bool:
    """Give a fresh base the prefix module a checkpoint was trained with; False if not a P-tuning checkpoint."""
    path = Path(ckpt) / PTUNING_FILE
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    family.add_prefix(model, record["num_virtual_tokens"], record["prefix_projection"])
    model.glmtune_ptuning = record
    return True
