"""QLoRA: the frozen base linears of the `lora` components as bitsandbytes NF4 (double quantization), LoRA on top.

Works on CPU as well as GPU (bitsandbytes >= 0.49). Two CPU facts (DESIGN.md section 6): the CPU kernel packs
weights in blocks of 64 input features, so a linear whose in_features is not a multiple of 64 stays in full
precision; and an eval forward repacks the weights for a bf16 fast path that breaks later training, so that
path is switched off on every layer (`support_avx512bf16_for_cpu = False`).

The checkpoint records what was quantized (QUANT_FILE), so that eval/chat rebuild the same base and merge can
fold the adapter onto exactly the weights it was trained against: dequantize(quantize(W)) in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from glmtune.adapters.trainable import component_of
from glmtune.config import RecipeError

QUANT_FILE = "quantization.json"
BLOCKSIZE = 64  # bitsandbytes' default NF4 block size


def quantizable(model: nn.Module, family, modes: dict[str, str], quantize_vision: bool) -> tuple[list[str], list[str]]:
    """(linears to quantize, linears kept in full precision because in_features % 64 != 0).

    The output head is never quantized (as transformers' bitsandbytes integration skips lm_head)."""
    components = family.components
    chosen, kept = [], []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name == family.output_layer:
            continue
        comp = component_of(name + ".weight", components)
        if modes.get(comp) != "lora" or (comp == "vision" and not quantize_vision):
            continue
        (chosen if module.in_features % BLOCKSIZE == 0 else kept).append(name)
    return chosen, kept


def quantize_linears(model: nn.Module, names: list[str], compute_dtype: torch.dtype) -> None:
    """Replace each named nn.Linear by a frozen bitsandbytes NF4 Linear4bit holding the same weights."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RecipeError("adapter.method=qlora needs bitsandbytes: pip install 'glmtune[qlora]'") from None

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old: nn.Linear = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(old.weight.data.contiguous(), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", blocksize=BLOCKSIZE)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        new = new.to(old.weight.device)  # quantizes
        new.support_avx512bf16_for_cpu = False
        setattr(parent, child, new)


def prepare_qlora(model: nn.Module, family, cfg, dtype: torch.dtype) -> dict:
    """Quantize the base in place; return the record written to the checkpoint's QUANT_FILE."""
    names, kept = quantizable(model, family, cfg.components, cfg.quantize_vision)
    if not names:
        raise RecipeError("adapter.method=qlora found no linear layer to quantize in the `lora` components "
                         f"(in_features must be a multiple of {BLOCKSIZE}; vision needs adapter.quantize_vision)")
    quantize_linears(model, names, dtype)
    return {"quant_type": "nf4", "double_quant": True, "blocksize": BLOCKSIZE, "input_dtype": str(dtype),
            "modules": names, "kept_full_precision": kept}


def quantize_like(model: nn.Module, ckpt: Path) -> bool:
    """Rebuild a checkpoint's quantized base (eval / chat); False if it is not a QLoRA checkpoint."""
    path = Path(ckpt) / QUANT_FILE
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    quantize_linears(model, record["modules"], getattr(torch, record["input_dtype"].removeprefix("torch.")))
    return True


def nf4_roundtrip(weight: torch.Tensor, input_dtype: str) -> torch.Tensor:
    """dequantize(quantize(W)) exactly as Linear4bit stores W, in fp32."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = weight.to(getattr(torch, input_dtype.removeprefix("torch."))).contiguous()
    packed, state = quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    return dequantize_4bit(packed, state).float()
