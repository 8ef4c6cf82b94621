"""Which parameters train: vision / projector / language, each frozen | lora | full.

A family describes its components as module-name prefixes (official names); a parameter belongs to the
longest matching prefix, so e.g. GLM-4.1V's projector `model.visual.merger` is carved out of the vision
tower `model.visual`.
"""

from __future__ import annotations

import re

import torch.nn as nn


def component_of(name: str, components: dict[str, list[str]]) -> str | None:
    best, best_len = None, -1
    for comp, prefixes in components.items():
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                best, best_len = comp, len(p)
    return best


def lora_target_regex(components: dict[str, list[str]], chosen: list[str], leaves: dict[str, list[str]]) -> str:
    """One PEFT `target_modules` regex (full match) for the Linear layers named `leaves` in `chosen`.

    Deeper prefixes of other components are excluded with a negative lookahead, so that a compact
    pattern (not a list of hundreds of names) lands in adapter_config.json.
    """
    parts = []
    for comp in chosen:
        own = components[comp]
        others = [p for c, ps in components.items() if c != comp for p in ps
                  if any(p.startswith(o + ".") for o in own)]
        guard = "".join(f"(?!{re.escape(o)}\\.)" for o in others)
        prefix = "|".join(re.escape(p) for p in own)
        leaf = "|".join(re.escape(x) for x in leaves[comp])
        parts.append(f"{guard}(?:{prefix})\\.(?:.*\\.)?(?:{leaf})")
    return "^(?:" + "|".join(parts) + ")$"


def covering_modules(model: nn.Module, components: dict[str, list[str]], comp: str) -> list[str]:
    """Smallest set of module names whose parameters are exactly the component's parameters."""
    chosen: list[str] = []

    def owned(mod_name: str, module: nn.Module) -> bool:
        names = [f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters()]
        return bool(names) and all(component_of(n, components) == comp for n in names)

    def walk(name: str, module: nn.Module):
        if owned(name, module):
            chosen.append(name)
            return
        for child, sub in module.named_children():
            walk(f"{name}.{child}" if name else child, sub)

    walk("", model)
    return chosen


def set_trainable(model: nn.Module, components: dict[str, list[str]], modes: dict[str, str]) -> None:
    """Freeze everything, then unfreeze the parameters of the `full` components (no PEFT involved)."""
    for name, p in model.named_parameters():
        p.requires_grad_(modes.get(component_of(name, components)) == "full")


def trainable_summary(model: nn.Module, components: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """Per component: trainable and total parameter counts (PEFT wrapper prefixes stripped)."""
    out: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        clean = re.sub(r"^base_model\.model\.", "", name)
        clean = re.sub(r"\.(modules_to_save|original_module)\.default", "", clean)
        clean = re.sub(r"\.base_layer", "", clean)
        comp = component_of(clean, components) or "other"
        row = out.setdefault(comp, {"trainable": 0, "total": 0})
        row["total"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
    return out
