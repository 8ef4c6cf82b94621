"""Checkpoints: atomic save, keep-last-N, exact resume state.

OUTPUT/checkpoint-STEP/ (and checkpoint-final/) hold
  adapter_config.json + adapter_model.safetensors   (or full_weights.safetensors for method none)
  recipe.yaml              the resolved recipe: eval / merge / chat find the base model and family here
  trainer_state.json       step, data position (records consumed over all ranks), process count, counters
  optimizer.pt, scheduler.pt   exact resume (loaded with weights_only=True); randomness needs no state: the loop
                           seeds each step from (seed, step, rank)
  deepspeed/               under DeepSpeed ZeRO instead of optimizer.pt: the engine's partitioned state
A checkpoint is written to a temporary folder and renamed when complete, so a killed run never leaves a
half-written checkpoint that `resume: auto` would pick up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from glmtune.adapters import FULL_STATE_METHODS, FULL_WEIGHTS, save_trained
from glmtune.config import CheckpointError, Recipe, load_recipe, save_recipe

STATE = "trainer_state.json"
_NUMBERED = re.compile(r"^checkpoint-(\d+)$")


def numbered_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _NUMBERED.match(p.name)
        if m and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(out: Path, model, optimizer, scheduler, recipe: Recipe, state: dict, keep_last: int | None,
                    state_dict: dict | None = None):
    """Write one checkpoint atomically; then prune numbered checkpoints beyond `keep_last`."""

    tmp = out.with_name(out.name + ".tmp")  # the caller starts it empty (DeepSpeed ranks may have written into it)
    tmp.mkdir(parents=True, exist_ok=True)
    save_trained(model, tmp, recipe.adapter.method, state_dict)
    save_recipe(recipe, tmp / "recipe.yaml")
    if optimizer is not None:  # under DeepSpeed its state is in tmp/deepspeed, one part per rank
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / STATE).write_text(json.dumps(state, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    if keep_last is not None:
        numbered = numbered_checkpoints(out.parent)
        for _, old in numbered[: max(len(numbered) - keep_last, 0)]:
            shutil.rmtree(old)


def find_resume(recipe: Recipe) -> Path | None:
    """The checkpoint `train.resume` points at: auto = latest numbered checkpoint in output_dir."""
    mode = recipe.train.resume
    if mode == "never":
        return None
    if mode != "auto":
        path = Path(mode)
        if not (path / STATE).is_file():
            raise FileNotFoundError(f"train.resume={mode}: no {STATE} there; is it a glmtune checkpoint folder?")
        return path
    numbered = numbered_checkpoints(Path(recipe.train.output_dir))
    return numbered[-1][1] if numbered else None


def gathered(param):
    """A ZeRO-3 partitioned parameter gathered whole for writing (a collective; every process loads the same
    file in the same order), else nothing to do."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def saved_world_size(ckpt: Path) -> int:
    """How many processes wrote the checkpoint."""
    return json.loads((ckpt / STATE).read_text()).get("world_size", 1)


def load_resume_state(ckpt: Path, model, optimizer, scheduler, method: str) -> dict:
    """Restore adapter weights, optimizer and scheduler; return trainer_state.json."""
    from safetensors.torch import load_file

    if method in FULL_STATE_METHODS:
        own = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(ckpt / FULL_WEIGHTS)).items():
                with gathered(own[name]):
                    own[name].copy_(tensor)
    else:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        unused = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
        if unused:
            raise CheckpointError(f"{ckpt}: adapter does not fit the model (e.g. {unused[0]}); was the recipe changed?")
    if (ckpt / "optimizer.pt").is_file():  # else a DeepSpeed checkpoint: the engine restores it after prepare
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    state = json.loads((ckpt / STATE).read_text())
    if "records" not in state:
        raise CheckpointError(f"{ckpt / STATE} has no data position ('records'): it was written by an older glmtune "
                              f"whose stream positions were per rank; start a new train.output_dir")
    return state


def checkpoint_recipe(ckpt: str | Path) -> Recipe:
    """The recipe a checkpoint was trained with (for eval / merge / chat)."""
    ckpt = Path(ckpt)
    path = ckpt / "recipe.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} has no recipe.yaml; pass a checkpoint folder written by `glmtune train` "
                                f"(e.g. runs/NAME/checkpoint-final)")
    return load_recipe(path, check_files=False)
