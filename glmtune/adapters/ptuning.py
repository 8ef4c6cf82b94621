"""P-tuning v2: learned per-layer prefix keys/values in the language model's attention.

The family builds the prefix module (`family.add_prefix(model, num_virtual_tokens, projection)`), shaped for
its attention (KV groups for GLM-4); the base stays frozen, `full` components may train beside it. A
checkpoint holds the prefix (and any full component) as full_weights.safetensors under official names plus
PTUNING_FILE. `glmtune merge` cannot fold a prefix into weights: it writes the official layout plus the
effective prefix table as `transformer.prefix_encoder.embedding.weight` with `pre_seq_len` in config.json,
the form the upstream GLM code reads. `load_upstream_prefix` reads the other upstream form: the output folder of
ChatGLM-6B's ptuning/main.py (config.json with `pre_seq_len`, weights holding only the prefix encoder), applied to
a base model like a glmtune checkpoint (`glmtune chat BASE --adapter FOLDER`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmtune.adapters.trainable import set_trainable
from glmtune.errors import CheckpointError, RecipeError
from glmtune.models import families_with

PTUNING_FILE = "ptuning.json"
PREFIX_MODULE = "transformer.prefix_encoder"


def attach_ptuning(model, family, cfg):
    if not family.has("ptuning"):
        raise RecipeError(f"adapter.method=ptuning is not implemented for {family.name} yet "
                          f"(available for: {', '.join(families_with('ptuning'))}); use lora/dora/qlora")
    set_trainable(model, family.components, cfg.components)
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


def upstream_prefix(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(config, prefix tensors) of an upstream P-tuning v2 output folder: config.json with `pre_seq_len` and weight
    files that hold `transformer.prefix_encoder.*` tensors only (ChatGLM-6B's ptuning trainer saves just what
    trained). None for anything else, e.g. a full model folder with a prefix (that one loads as a model)."""
    from glmtune.models.weights import index_map, iter_shard, weight_files

    path = Path(ckpt) / "config.json"
    if not path.is_file() or not json.loads(path.read_text()).get("pre_seq_len"):
        return None
    try:
        files = weight_files(ckpt)
    except FileNotFoundError:
        return None
    if any(not name.startswith(PREFIX_MODULE + ".") for name in index_map(ckpt)):
        return None
    state = {}
    for file in files:
        for name, tensor in iter_shard(file):
            if not name.startswith(PREFIX_MODULE + "."):
                return None
            state[name] = tensor
    return json.loads(path.read_text()), state


def load_upstream_prefix(model, family, ckpt: Path, trainable: bool = False) -> bool:
    """Give the base the prefix of an upstream P-tuning v2 output folder; False if `ckpt` is not one."""
    found = upstream_prefix(ckpt)
    if found is None:
        return False
    config, state = found
    if not family.has("ptuning"):
        raise CheckpointError(f"{ckpt}: a P-tuning v2 prefix, but P-tuning is not implemented for {family.name} "
                              f"(available for: {', '.join(families_with('ptuning'))})")
    record = {"num_virtual_tokens": config["pre_seq_len"], "prefix_projection": bool(config.get("prefix_projection"))}
    family.add_prefix(model, record["num_virtual_tokens"], record["prefix_projection"])
    model.glmtune_ptuning = record
    own = {n: p for n, p in model.named_parameters() if n.startswith(PREFIX_MODULE + ".")}
    if sorted(own) != sorted(state):
        raise CheckpointError(f"{ckpt}: prefix tensors {sorted(state)}, the model's prefix encoder (pre_seq_len "
                              f"{record['num_virtual_tokens']}, prefix_projection {record['prefix_projection']}) "
                              f"has {sorted(own)}")
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise CheckpointError(f"{ckpt}: {name} has shape {tuple(tensor.shape)}, the base model's prefix "
                                      f"encoder expects {tuple(own[name].shape)}; was it trained on another model?")
            own[name].copy_(tensor)
            own[name].requires_grad_(trainable)
    return True
