"""Fold a checkpoint into its base model, shard by shard, into the official layout.

Each base shard is read, the LoRA deltas (B @ A * scale, computed in fp32) are added to the weights they
adapt (DoRA: then rescaled row-wise to the learned magnitude; QLoRA: onto dequantize(quantize(W)), the
weights the adapter was trained against; never re-quantized), trained `full` components replace their
tensors, and the shard is written under the same file
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
from glmtune.adapters.qlora import QUANT_FILE, nf4_roundtrip
from glmtune.checkpoint import check_adapter_fits, checkpoint_recipe
from glmtune.config import RecipeError
from glmtune.models import detect_family, get_family
from glmtune.models.weights import INDEX_FILES, iter_shard, weight_files

PEFT_PREFIX = "base_model.model."


def adapter_updates(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """What the checkpoint changes, keyed by official parameter name:
    "delta" (s * B @ A, fp32), "magnitude" (DoRA), "replace" (full tensors: modules_to_save, method none)."""
    from safetensors.torch import load_file

    if (ckpt / FULL_WEIGHTS).is_file():
        return {"delta": {}, "magnitude": {}, "replace": load_file(str(ckpt / FULL_WEIGHTS))}
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise RecipeError(f"{ckpt}: merge folds LoRA / DoRA adapters; this one is {cfg.get('peft_type')}")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    out = {"delta": {}, "magnitude": {}, "replace": {}}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            b = tensors[key.replace(".lora_A.weight", ".lora_B.weight")]
            out["delta"][module + ".weight"] = (b.double() @ value.double()).float() * scale
        elif name.endswith(".lora_magnitude_vector"):
            out["magnitude"][name[: -len(".lora_magnitude_vector")] + ".weight"] = value.float()
        elif not name.endswith(".lora_B.weight"):  # modules_to_save: full tensors
            out["replace"][name] = value
    return out


def merged_weight(name: str, w: torch.Tensor, updates: dict, quantized: dict) -> torch.Tensor:
    """One base weight with the adapter folded in, computed in fp32, returned in the file's dtype."""
    if name in updates["replace"]:
        if updates["replace"][name].shape != w.shape:
            raise RecipeError(f"{name}: adapter has shape {tuple(updates['replace'][name].shape)}, "
                              f"base has {tuple(w.shape)}")
        return updates["replace"][name].to(w.dtype)
    # QLoRA trained against dequantize(quantize(W)): fold onto exactly that
    base = nf4_roundtrip(w, quantized["input_dtype"]) if name in quantized.get("weights", ()) else w.float()
    merged = base + updates["delta"].get(name, 0.0)
    if name in updates["magnitude"]:  # DoRA: W' = m / ||W + sBA||_row * (W + sBA)
        merged = merged * (updates["magnitude"][name] / merged.norm(dim=1))[:, None]
    return merged.to(w.dtype)


PREFIX = "transformer.prefix_encoder."


def prefix_table(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The effective P-tuning prefix rows: the embedding, through the reparameterisation MLP if trained with one."""
    rows = state[PREFIX + "embedding.weight"].float()
    if PREFIX + "trans.0.weight" in state:
        hidden = torch.tanh(rows @ state[PREFIX + "trans.0.weight"].float().T + state[PREFIX + "trans.0.bias"].float())
        rows = hidden @ state[PREFIX + "trans.2.weight"].float().T + state[PREFIX + "trans.2.bias"].float()
    return rows


def export_prefix(out: Path, prefix: dict, dtype: torch.dtype) -> torch.Tensor:
    """The prefix as the upstream P-tuning form: a plain embedding table, declared in config.json."""
    table = prefix_table(prefix).to(dtype).contiguous()
    config = json.loads((out / "config.json").read_text())
    config.update(pre_seq_len=table.shape[0], prefix_projection=False)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return table


def output_name(shard: Path) -> str:
    """Shard name in the output: safetensors keep theirs; `pytorch_model-0000N-of-0000M.bin` -> `model-...`."""
    if shard.suffix == ".safetensors":
        return shard.name
    return shard.name.replace("pytorch_model", "model", 1).removesuffix(".bin") + ".safetensors"


def tied_names(base: Path, family) -> dict[str, list[str]]:
    """Parameter name -> the other names of the same tensor in the model config.json describes (VisualGLM-6B's
    lm_head.weight is its word embeddings): the checkpoint holds one of them, the base shards may hold each, and
    a loader would read the stale copy last. Built on the meta device: no memory."""
    groups: dict[int, list[str]] = {}
    for name, p in family.build_model(base, meta=True).named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: [o for o in g if o != n] for g in groups.values() if len(g) > 1 for n in g}


def merge(ckpt: str | Path, out_dir: str | Path, print_fn=print) -> Path:
    """Write base + checkpoint as one model in the official layout, always as safetensors (a `.bin` base,
    VisualGLM-6B / ChatGLM-6B, becomes `model-0000N-of-0000M.safetensors` + model.safetensors.index.json)."""
    from safetensors.torch import save_file

    ckpt, out = Path(ckpt), Path(out_dir)
    recipe = checkpoint_recipe(ckpt)
    base = Path(recipe.model.path)
    if out.resolve() == base.resolve():
        raise RecipeError(f"--out {out} is the base model folder; choose a new folder")
    family = detect_family(base)  # the base folder may hold another model by now
    check_adapter_fits(ckpt, family, base, get_family(family).build_model(base, meta=True))
    shards = weight_files(base)
    updates = adapter_updates(ckpt)
    prefix = {k: updates["replace"].pop(k) for k in list(updates["replace"]) if k.startswith(PREFIX)}
    quantized = {}
    if (ckpt / QUANT_FILE).is_file():
        record = json.loads((ckpt / QUANT_FILE).read_text())
        quantized = {"input_dtype": record["input_dtype"], "weights": {m + ".weight" for m in record["modules"]}}
    out.mkdir(parents=True, exist_ok=True)
    skip = {s.name for s in shards} | set(INDEX_FILES)
    for f in base.iterdir():  # everything but the weights: config, tokenizer, processor, chat template...
        if f.is_file() and f.name not in skip:
            shutil.copy2(f, out / f.name)
    # QLoRA: every quantized weight is written as the dequantized NF4 weight the model was trained with
    wanted, used = set(updates["delta"]) | set(updates["replace"]) | quantized.get("weights", set()), set()
    aliases = {alias: name for name, others in tied_names(base, get_family(recipe.model.family)).items()
               if name in updates["replace"] for alias in others if alias not in wanted}
    updates["replace"].update({alias: updates["replace"][name] for alias, name in aliases.items()})
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        merged = {}
        for name, w in iter_shard(shard):
            if name in wanted or name in aliases:  # a tied copy, if the base shards hold one, gets the same tensor
                w = merged_weight(name, w, updates, quantized)
                used.add(name)
            merged[name] = w.clone() if shard.suffix == ".bin" else w.contiguous()  # .bin: tied tensors share storage
        if prefix and i == len(shards) - 1:  # P-tuning: a prefix cannot be folded into weights
            table = export_prefix(out, prefix, next(iter(merged.values())).dtype)
            merged[PREFIX + "embedding.weight"] = table
            print_fn(f"merge: a P-tuning v2 prefix cannot be folded into weights; wrote it as "
                     f"{PREFIX}embedding.weight with pre_seq_len={len(table)} in config.json "
                     f"(the form upstream GLM code reads)")
        save_file(merged, str(out / output_name(shard)), metadata={"format": "pt"})
        weight_map.update({name: output_name(shard) for name in merged})
        total += sum(t.numel() * t.element_size() for t in merged.values())
    base_index = next((base / i for i in INDEX_FILES if (base / i).is_file()), None)
    if base_index is not None or len(shards) > 1:  # keep the base index's other metadata (e.g. total_parameters)
        metadata = json.loads(base_index.read_text()).get("metadata", {}) if base_index else {}
        metadata["total_size"] = total
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2))
    unused = sorted(wanted - used)
    if unused:
        raise RecipeError(f"{ckpt}: {len(unused)} adapter tensors match no weight of {base} (e.g. {unused[0]}); "
                          f"was it trained on another base model?")
    return out
