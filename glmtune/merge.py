"""Fold a checkpoint into its base model, shard by shard, into the official layout.

Each base shard is read, the LoRA deltas (B @ A * scale, computed in fp32) are added to the weights they
adapt, trained `full` components replace their tensors, and the shard is written under the same file
name with the same tensor names and dtypes. Every other file of the base folder (config, tokenizer,
processor, chat template, generation config, index) is copied, so nothing is lost. Peak memory is one
shard plus the adapter. Any adapter tensor that finds no base weight is an error, never silently dropped.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from glmtune.adapters import FULL_WEIGHTS
from glmtune.checkpoint import checkpoint_recipe
from glmtune.config import RecipeError
from glmtune.models.weights import weight_files

PEFT_PREFIX = "base_model.model."


def adapter_updates(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(deltas to add, tensors to replace), keyed by official parameter name."""
    from safetensors.torch import load_file

    if (ckpt / FULL_WEIGHTS).is_file():
        return {}, load_file(str(ckpt / FULL_WEIGHTS))
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise RecipeError(f"{ckpt}: merge supports plain LoRA adapters; this one is "
                          f"{cfg.get('peft_type')}{' (DoRA)' if cfg.get('use_dora') else ''}")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    deltas, replace = {}, {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            b = tensors[key.replace(".lora_A.weight", ".lora_B.weight")]
            deltas[module + ".weight"] = (b.double() @ value.double()).float() * scale
        elif name.endswith(".lora_B.weight"):
            continue
        else:  # modules_to_save: full tensors
            replace[name] = value
    return deltas, replace


def merge(ckpt: str | Path, out_dir: str | Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt, out = Path(ckpt), Path(out_dir)
    recipe = checkpoint_recipe(ckpt)
    base = Path(recipe.model.path)
    if out.resolve() == base.resolve():
        raise RecipeError(f"--out {out} is the base model folder; choose a new folder")
    shards = weight_files(base)
    if any(s.suffix != ".safetensors" for s in shards):
        raise RecipeError(f"{base}: merge writes safetensors shards and needs a safetensors base checkpoint")
    deltas, replace = adapter_updates(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    shard_names = {s.name for s in shards}
    for f in base.iterdir():  # everything that is not a weight shard: config, tokenizer, processor, index...
        if f.is_file() and f.name not in shard_names:
            shutil.copy2(f, out / f.name)
    used = set()
    for shard in shards:
        merged = {}
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for name in f.keys():
                w = f.get_tensor(name)
                if name in replace:
                    if replace[name].shape != w.shape:
                        raise RecipeError(f"{ckpt}: {name} has shape {tuple(replace[name].shape)}, "
                                          f"base has {tuple(w.shape)}")
                    w = replace[name].to(w.dtype)
                    used.add(name)
                elif name in deltas:
                    w = (w.float() + deltas[name]).to(w.dtype)
                    used.add(name)
                merged[name] = w.contiguous()
        save_file(merged, str(out / shard.name), metadata=metadata)
    unused = sorted((set(deltas) | set(replace)) - used)
    if unused:
        raise RecipeError(f"{ckpt}: {len(unused)} adapter tensors match no weight of {base} (e.g. {unused[0]}); "
                          f"was it trained on another base model?")
    return out
