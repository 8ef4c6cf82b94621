"""LoRA through PEFT, per component; `full` components become PEFT `modules_to_save` (see peft_full_targets).

Adapter files are plain PEFT (adapter_config.json + adapter_model.safetensors) with the key names PEFT
gives on the official model, so `PeftModel.from_pretrained(base, ckpt)` works without glmtune.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager

from glmtune.adapters.trainable import component_of, lora_target_regex, peft_full_targets
from glmtune.config import RecipeError


def layer_index(module_name: str) -> int | None:
    """The N of the first `.layers.N.` in a module name."""
    m = re.search(r"\.layers\.(\d+)\.", module_name)
    return int(m.group(1)) if m else None


@contextmanager
def without_bitsandbytes(needed: bool):
    """Keep PEFT from importing bitsandbytes (seconds of start-up: `import peft` imports it whenever it is
    installed) when the recipe does not quantize. A None entry in sys.modules makes `import bitsandbytes` an
    ImportError and find_spec() None, so PEFT takes it as absent; afterwards PEFT's cached answers are
    cleared, so a later QLoRA model in the same process still finds it."""
    if needed or "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None
    try:
        yield
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
        import_utils = sys.modules.get("peft.import_utils")
        for name in ("is_bnb_available", "is_bnb_4bit_available"):
            getattr(getattr(import_utils, name, None), "cache_clear", lambda: None)()


def attach_lora(model, family, cfg):
    with without_bitsandbytes(cfg.method == "qlora"):
        return _attach_lora(model, family, cfg)


def _attach_lora(model, family, cfg):
    from peft import LoraConfig, get_peft_model

    modes = cfg.components
    lora_comps = [c for c, m in modes.items() if m == "lora"]
    leaves = {c: list(cfg.target) or family.lora_targets[c] for c in lora_comps}
    full, loose = [], []
    for comp in [c for c, m in modes.items() if m == "full"]:
        modules, params = peft_full_targets(model, family.components, comp)
        full, loose = full + modules, loose + params
    targets = lora_target_regex(family.components, lora_comps, leaves)
    if cfg.layers:  # only these language-model layers (other components keep every layer)
        targets = [name for name, _ in model.named_modules() if re.fullmatch(targets, name)
                   and (component_of(name, family.components) != "language" or layer_index(name) in cfg.layers)]
        found = {layer_index(n) for n in targets if component_of(n, family.components) == "language"}
        if set(cfg.layers) - found:
            n_layers = 1 + max((layer_index(n) for n, _ in model.named_modules()
                                if component_of(n, family.components) == "language" and layer_index(n) is not None),
                               default=-1)
            raise RecipeError(f"adapter.layers={list(cfg.layers)}: layer {sorted(set(cfg.layers) - found)[0]} does "
                              f"not exist or has no LoRA target; the language model has layers 0..{n_layers - 1}")
        # a list would be matched by suffix (vision layers share the names): match the full names exactly
        targets = "^(?:" + "|".join(re.escape(n) for n in targets) + ")$"
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none", use_rslora=cfg.rslora,
        use_dora=cfg.method == "dora",
        target_modules=targets,
        modules_to_save=full or None,
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # PEFT: "Target modules ... not found in the base model"
        raise RecipeError(f"adapter.target {list(cfg.target)} matched no Linear layer in components "
                         f"{lora_comps}; defaults are {family.lora_targets} ({e})") from None
    for name in loose:  # parameters of a `full` component that PEFT cannot wrap
        model.get_parameter(name).requires_grad_(True)
    return peft_model
