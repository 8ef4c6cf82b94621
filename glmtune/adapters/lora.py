"""LoRA through PEFT, per component; `full` components become PEFT `modules_to_save`.

Adapter files are plain PEFT (adapter_config.json + adapter_model.safetensors) with the key names PEFT
gives on the official model, so `PeftModel.from_pretrained(base, ckpt)` works without glmtune.
"""

from __future__ import annotations

from glmtune.adapters.trainable import covering_modules, lora_target_regex
from glmtune.config import RecipeError


def attach_lora(model, family, cfg):
    from peft import LoraConfig, get_peft_model

    modes = cfg.components
    lora_comps = [c for c, m in modes.items() if m == "lora"]
    leaves = {c: list(cfg.target) or family.LORA_TARGETS[c] for c in lora_comps}
    full = [name for c, m in modes.items() if m == "full"
            for name in covering_modules(model, family.COMPONENTS, c)]
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none", use_rslora=cfg.rslora,
        use_dora=cfg.method == "dora",
        target_modules=lora_target_regex(family.COMPONENTS, lora_comps, leaves),
        modules_to_save=full or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # PEFT: "Target modules ... not found in the base model"
        raise RecipeError(f"adapter.target {list(cfg.target)} matched no Linear layer in components "
                         f"{lora_comps}; defaults are {family.LORA_TARGETS} ({e})") from None
