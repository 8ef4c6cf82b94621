"""`glmtune inspect`: parameter names and shapes of the model a config.json describes, and what would train.

With `--meta` the model is built on the meta device, so the full-size 9B/13B configs cost no memory; the
names and shapes are those the loader expects in the official checkpoint files.
"""

from __future__ import annotations

from pathlib import Path

from glmtune.adapters import attach
from glmtune.adapters.trainable import component_of, trainable_summary
from glmtune.config import Recipe
from glmtune.models import detect_family, get_family


def inspect_model(model_dir: str | Path, family: str | None = None, meta: bool = True,
                  recipe: Recipe | None = None) -> dict:
    name = family or (recipe.model.family if recipe else detect_family(model_dir))
    fam = get_family(name)
    model = fam.build_model(model_dir, meta=meta)
    tensors = dict(model.state_dict())
    report = {
        "family": name,
        "model_dir": str(model_dir),
        "parameters": {k: list(v.shape) for k, v in tensors.items()},
        "total_parameters": sum(v.numel() for v in tensors.values()),
        "components": {},
    }
    for k, v in tensors.items():
        comp = component_of(k, fam.components) or "other"
        report["components"][comp] = report["components"].get(comp, 0) + v.numel()
    if recipe is not None:
        wrapped = attach(model, fam, recipe.adapter)
        report["trainable"] = trainable_summary(wrapped, fam.components)
        report["trainable_parameters"] = {n: list(p.shape) for n, p in wrapped.named_parameters() if p.requires_grad}
    return report
