"""Adapter methods: attach to a base model, save what trained, load it back.

Checkpoint contents by method:
  lora, dora  PEFT adapter folder: adapter_config.json + adapter_model.safetensors (full components inside,
              as PEFT modules_to_save, and plain entries for parameters PEFT cannot wrap)
  qlora       the same, plus quantization.json (which base linears were NF4)
  ptuning     full_weights.safetensors (the prefix encoder + any full component) and ptuning.json
  none        full_weights.safetensors: the trained `full` components under their official names
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmtune.adapters.lora import attach_lora
from glmtune.adapters.ptuning import add_prefix_like, attach_ptuning, load_upstream_prefix, write_record
from glmtune.adapters.qlora import QUANT_FILE, prepare_qlora, quantize_like
from glmtune.adapters.trainable import set_trainable
from glmtune.config import CheckpointError

FULL_WEIGHTS = "full_weights.safetensors"


def attach_qlora(model, family, cfg):
    record = prepare_qlora(model, family, cfg, next(model.parameters()).dtype)
    model = attach_lora(model, family, cfg)
    model.get_base_model().glmtune_quantization = record  # saved with every checkpoint
    return model


# adapter.method -> attach(model, family, cfg); "none" needs no wrapper
METHODS = {"lora": attach_lora, "dora": attach_lora, "qlora": attach_qlora, "ptuning": attach_ptuning}
FULL_STATE_METHODS = ("none", "ptuning")  # checkpoints hold plain tensors under official names


def attach(model, family, cfg):
    """Return the model to train: frozen base with the recipe's adapters and trainable components."""
    if cfg.method == "none":
        set_trainable(model, family.components, cfg.components)
        return model
    return METHODS[cfg.method](model, family, cfg)


def trained_state(model, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Trainable parameters under official names (methods none, ptuning); from `state_dict` when the
    parameters themselves are partitioned (DeepSpeed ZeRO-3 hands a gathered copy)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    return {n: source[n].detach().contiguous() for n in names}


def add_loose_parameters(model, adapter_file: Path, state_dict: dict | None = None) -> None:
    """Add to PEFT's adapter file the trainable parameters PEFT does not manage (a `full` component's parameters
    that no modules_to_save wrapper can hold, see peft_full_targets), under their PEFT names: PEFT's own loading
    (PeftModel.from_pretrained, set_peft_model_state_dict) copies such entries into the model unchanged."""
    from safetensors.torch import load_file, save_file

    loose = [n for n, p in model.named_parameters()
             if p.requires_grad and ".lora_" not in n and ".modules_to_save." not in n]
    if not loose:
        return
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    tensors = load_file(str(adapter_file))
    tensors.update({n: source[n].detach().contiguous() for n in loose})
    save_file(tensors, str(adapter_file), metadata={"format": "pt"})


def save_trained(model, out_dir: Path, method: str, state_dict: dict | None = None) -> None:
    from safetensors.torch import save_file

    if method in FULL_STATE_METHODS:
        save_file(trained_state(model, state_dict), str(out_dir / FULL_WEIGHTS), metadata={"format": "pt"})
        if method == "ptuning":
            write_record(model, out_dir)
        return
    model.save_pretrained(str(out_dir), state_dict=state_dict)
    add_loose_parameters(model, out_dir / "adapter_model.safetensors", state_dict)
    record = getattr(model.get_base_model(), "glmtune_quantization", None)
    if record is not None:
        (out_dir / QUANT_FILE).write_text(json.dumps(record, indent=2))


def load_trained(model, ckpt: Path, family, trainable: bool = False):
    """Apply a checkpoint's adapter (or full weights, or P-tuning prefix) to a freshly loaded base model; also
    the output folder of an upstream P-tuning v2 run (config.json with pre_seq_len + the prefix weights)."""
    ckpt = Path(ckpt)
    if load_upstream_prefix(model, family, ckpt, trainable):
        return model
    add_prefix_like(model, family, ckpt)
    if (ckpt / "adapter_config.json").is_file():
        from peft import PeftModel

        quantize_like(model, ckpt)  # QLoRA: the adapter was trained on the NF4 base
        return PeftModel.from_pretrained(model, str(ckpt), is_trainable=trainable)
    if (ckpt / FULL_WEIGHTS).is_file():
        from safetensors.torch import load_file

        state = load_file(str(ckpt / FULL_WEIGHTS))
        own = dict(model.named_parameters())
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise CheckpointError(f"{ckpt / FULL_WEIGHTS}: {len(unknown)} tensors do not exist in the model, "
                             f"e.g. {unknown[0]}; was it trained on another model family?")
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise CheckpointError(f"{ckpt / FULL_WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                                     f"the model has {tuple(own[name].shape)}")
                own[name].copy_(tensor)
                own[name].requires_grad_(trainable)
        return model
    raise FileNotFoundError(f"{ckpt} holds neither adapter_config.json nor {FULL_WEIGHTS} (nor an upstream P-tuning "
                            f"v2 prefix): not a glmtune checkpoint")
