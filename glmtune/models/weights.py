"""Official checkpoint files <-> native modules: streaming, strict loading and sharded saving.

Loading builds the model on the meta device, allocates it once (`to_empty`), then copies shard by shard,
so peak memory is the model plus one shard (under ZeRO-3: each process's partition plus one tensor). The
check is strict: every checkpoint tensor is used, every parameter and persistent buffer is filled, shapes are
equal; a mismatch names the tensor and the file.
`.bin` shards (VisualGLM-6B / ChatGLM-6B) are read with `torch.load(weights_only=True)`: no pickle code runs.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from glmtune.config import CheckpointError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's weight shards in index order, or its single weight file."""
    model_dir = Path(model_dir)
    for index in INDEX_FILES:
        if (model_dir / index).is_file():
            names = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
            missing = [n for n in names if not (model_dir / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{model_dir / index} lists {missing[0]}, which is not in {model_dir}")
            return [model_dir / n for n in names]
    for single in SINGLE_FILES:
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise FileNotFoundError(f"{model_dir}: no {' / '.join(INDEX_FILES + SINGLE_FILES)}")


def index_map(model_dir: str | Path) -> dict[str, str]:
    """The checkpoint index's tensor -> file map ({} for single-file checkpoints)."""
    for index in INDEX_FILES:
        path = Path(model_dir) / index
        if path.is_file():
            return json.loads(path.read_text())["weight_map"]
    return {}


def iter_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()


def load_official(build: Callable[[bool], nn.Module], model_dir: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model `build(meta)` describes, filled from the checkpoint folder: on the meta device then strictly
    shard by shard, or, when accelerate runs DeepSpeed ZeRO-3, partitioned from the start (`load_zero3`)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return load_zero3(build, model_dir, dtype)
    return load_strict(build(True), model_dir, dtype)


@contextlib.contextmanager
def skip_default_init():
    """Module constructors skip their random init (every tensor is loaded next anyway)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def load_zero3(build: Callable[[bool], nn.Module], model_dir: str | Path, dtype: torch.dtype) -> nn.Module:
    """Under ZeRO-3: build the model already partitioned (deepspeed.zero.Init: each process keeps 1/N of every
    weight), then fill it tensor by tensor, every process gathering the one weight being loaded; so no process
    ever holds more than its partition plus one tensor, instead of the whole model before DeepSpeed splits it.
    Every process reads the same shards in the same order (the gathers are collectives)."""
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    # the dtype goes through the config: DeepSpeed 0.19's Init ignores its `dtype` argument on devices without
    # fp16 (an operator-precedence slip picks bfloat16 on CPUs)
    config = dict(deepspeed_config(), bf16={"enabled": dtype == torch.bfloat16},
                  fp16={"enabled": dtype == torch.float16})
    with skip_default_init(), deepspeed.zero.Init(config_dict_or_path=config):
        model = build(False)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names share one parameter
    buffers = dict(model.named_buffers(remove_duplicate=False))
    filled = set()
    with torch.no_grad():
        for shard in weight_files(model_dir):
            for name, tensor in iter_shard(shard):
                if name in buffers:  # buffers are not partitioned
                    buffers[name].copy_(tensor)
                    filled.add(name)
                    continue
                if name not in params:
                    raise CheckpointError(f"{shard}: tensor {name} has no place in the model; is this checkpoint of "
                                          f"another family or size? (model has e.g. {next(iter(params))})")
                target = params[name]
                shape = tuple(getattr(target, "ds_shape", target.shape))
                if shape != tuple(tensor.shape):
                    raise CheckpointError(f"{shard}: {name} has shape {tuple(tensor.shape)}, the model built from "
                                          f"config.json expects {shape}")
                with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    target.data.copy_(tensor)
                filled.add(name)
    missing = sorted((set(params) | set(buffers)) - filled)
    if missing:
        raise CheckpointError(f"{model_dir}: {len(missing)} model tensors are not in the checkpoint, e.g. {missing[0]}")
    for module in model.modules():  # as load_strict's model.to(dtype) does for the buffers
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[key] = buf.to(dtype)
    return model


def load_strict(model: nn.Module, model_dir: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Fill a (meta or materialised) model from the checkpoint folder, strictly, shard by shard."""
    if any(p.is_meta for p in model.parameters()):
        # to_empty gives every name its own tensor: remember tied groups (ChatGLM-6B's lm_head = word
        # embeddings) and tie them again, so that the model holds one copy and trains it as one
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        model.to_empty(device="cpu")
        for names in (n for n in groups.values() if len(n) > 1):
            first = model.get_parameter(names[0])
            for name in names[1:]:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, first)
    # tied weights (ChatGLM-6B's lm_head = word embeddings) appear under both official names
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    filled = set()
    with torch.no_grad():
        for shard in weight_files(model_dir):
            for name, tensor in iter_shard(shard):
                if name not in targets:
                    raise CheckpointError(f"{shard}: tensor {name} has no place in the model; is this checkpoint of "
                                     f"another family or size? (model has e.g. {next(iter(targets))})")
                target = targets[name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise CheckpointError(f"{shard}: {name} has shape {tuple(tensor.shape)}, the model built from "
                                     f"config.json expects {tuple(target.shape)}")
                target.copy_(tensor)
                filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        listed = index_map(model_dir).get(missing[0])
        where = (f"{Path(model_dir) / listed} should hold it (per the index) but does not" if listed
                 else f"no weight file in {model_dir} holds it")
        raise CheckpointError(f"{model_dir}: {len(missing)} model tensors are not in the checkpoint, "
                         f"e.g. {missing[0]} ({where})")
    if dtype is not None:
        model.to(dtype)
    return model


def save_sharded(state: dict[str, torch.Tensor], out_dir: str | Path, max_shard_bytes: int,
                 prefix: str = "model", ext: str = "safetensors") -> list[Path]:
    """Write `prefix-0000N-of-0000M.{ext}` shards plus the official index json (weight_map + total_size)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        n = tensor.numel() * tensor.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += n
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        if ext == "safetensors":
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        else:
            torch.save(shard, out_dir / name)
        weight_map.update({k: name for k in shard})
        paths.append(out_dir / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
    (out_dir / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths


def init_random(model: nn.Module, std: float) -> None:
    """Random weights for tiny checkpoints, all of them (upstream leaves many uninitialised with skip_init):
    norm weights 1, biases 0, everything else N(0, std); a tied tensor is drawn once."""
    seen = set()
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm"
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if name == "bias":
                    p.zero_()
                elif is_norm:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std)
