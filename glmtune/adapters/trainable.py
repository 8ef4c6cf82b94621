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


def peft_full_targets(model: nn.Module, components: dict[str, list[str]], comp: str) -> tuple[list[str], list[str]]:
    """A `full` component beside LoRA: (modules for PEFT `modules_to_save`, parameters to train as they are).

    PEFT refuses containers (ModuleList / ModuleDict: GLM-4.1V's `model.visual.blocks`) and matches
    `modules_to_save` by name suffix (VisualGLM's `transformer` would also catch `image_encoder.vit.transformer`):
    such modules are replaced by their children. A wrapper trains a copy, which would untie a tied weight
    (VisualGLM's lm_head is its word embeddings), so modules holding one are not wrapped either. Parameters held
    directly by a module that cannot be wrapped (GLM-4V's learned boi/eoi on `transformer.vision`, whose conv and
    GLU are the projector) train as plain parameters, saved in the adapter file under their PEFT names (see
    save_trained), which PEFT loads back as they are."""
    all_names = [n for n, _ in model.named_modules()]
    seen: set[int] = set()
    tied = set()  # ids of parameters reachable under two names (VisualGLM's lm_head = word embeddings)
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    modules: list[str] = []

    def wrappable(name: str, module: nn.Module) -> bool:
        return (bool(name) and not isinstance(module, (nn.ModuleList, nn.ModuleDict))
                and not any(other != name and other.endswith(name) for other in all_names)
                and not any(id(p) in tied for p in module.parameters()))

    def split(name: str):
        module = model.get_submodule(name)
        if wrappable(name, module):
            modules.append(name)
            return
        for child, _ in module.named_children():  # the module's own parameters stay loose
            split(f"{name}.{child}" if name else child)

    for name in covering_modules(model, components, comp):
        split(name)
    inside = tuple(m + "." for m in modules)
    loose = [n for n, _ in model.named_parameters() if component_of(n, components) == comp and not n.startswith(inside)]
    return modules, loose


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
