"""`glmtune check RECIPE --memory [--gpus N]`: a per-GPU memory model of a recipe, without loading weights.

Weights, trainable parameters, gradients and optimizer states come from the model the recipe's config.json
describes, built on the meta device with the recipe's adapter attached (so the counts are the real module
tree's, in the dtypes PEFT gives them). QLoRA is not quantized on meta: the linears
glmtune.adapters.qlora.quantizable() picks are counted as NF4 with double quantization,
0.5 B/weight + 1 B (8-bit absmax) per 64-weight block + 4 B (fp32 second-level absmax) per 256 blocks.

Engines (N GPUs): torch AdamW keeps 2 moments in the parameter dtype and a 4-byte step count per tensor (one
GPU, DDP; DDP adds its all-reduce buckets, a copy of the gradients); DeepSpeed keeps an fp32 master copy + 2 fp32
moments (12 B per trainable parameter) and fp32 gradients, partitioned over the N ranks (ZeRO-2: optimizer +
gradients; ZeRO-3: also the weights; ZeRO-3 + offload: optimizer states and gradients in CPU memory). One process
is checked against summary.json "memory_per_rank"; the DeepSpeed rules are those bench/bench_distributed.py
measured (DDP 340/680 MiB, ZeRO-2 340/510, ZeRO-3 170/510 params/optimizer for 89M fp32 parameters on 2 ranks).
Not counted: the CUDA context and allocator slack, ZeRO-3's gathered layer weights, and the transient forward
memory of the frozen vision tower.

Activations are structural: per layer, the tensors autograd saves for backward, counted from the widths
(hidden h, ffn f, heads, head dim d, kv width, LoRA rank r), plus the fp32 log-softmax of the loss. The counts
come from the saved-tensor hooks of each architecture's code (measure_saved_bytes, checked in
tests/test_memory.py). Data-dependent code (image positions, rope index) cannot run on meta, hence structural.
The frozen vision tower and projector save nothing (no input or weight of theirs needs a gradient).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

GIB = 1024 ** 3
ENGINES = ("single", "ddp", "zero2", "zero3", "zero3_offload")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def nf4_bytes(n: int) -> float:
    """Bytes of n weights in bitsandbytes NF4 with double quantization (blocksize 64, absmax blocks of 256)."""
    return n * 0.5 + n / 64 + n / (64 * 256) * 4


def parameter_counts(recipe) -> dict:
    """Frozen and trainable parameter bytes of the recipe's model, built on the meta device."""
    import dataclasses

    from glmtune.adapters import attach
    from glmtune.adapters.lora import layer_index
    from glmtune.adapters.qlora import quantizable
    from glmtune.adapters.trainable import component_of
    from glmtune.models import get_family

    fam = get_family(recipe.model.family)
    dtype = getattr(torch, recipe.model.dtype)
    model = fam.build_model(recipe.model.path, meta=True).to(dtype)
    quant = set()
    cfg = recipe.adapter
    if cfg.method == "qlora":
        names, _ = quantizable(model, fam, cfg.components, cfg.quantize_vision)
        quant = {n + ".weight" for n in names}
        cfg = dataclasses.replace(cfg, method="lora")  # the trainable part is plain LoRA on top
    wrapped = attach(model, fam, cfg)
    frozen = quantized = quantized_n = trainable = trainable_n = tensors = 0
    for name, p in wrapped.named_parameters():
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        if p.requires_grad:
            trainable += p.numel() * p.element_size()
            trainable_n += p.numel()
            tensors += 1
        elif plain in quant:
            quantized += nf4_bytes(p.numel())
            quantized_n += p.numel()
        else:
            frozen += p.numel() * p.element_size()
    # the LoRA inputs of one layer (the first adapted one; the estimate assumes every layer is alike)
    lora = [(n, m.in_features) for n, m in wrapped.named_modules() if n.endswith(".lora_A.default")
            and fam.components and component_of(n.replace("base_model.model.", "") + ".weight",
                                                fam.components) == "language"]
    first = min((layer_index(n) for n, _ in lora if layer_index(n) is not None), default=None)
    return {"frozen_bytes": frozen, "quantized_bytes": quantized, "quantized_params": quantized_n,
            "trainable_bytes": trainable,
            "trainable_params": trainable_n, "trainable_tensors": tensors,
            "lora_inputs": [(n.split(".")[-3], i) for n, i in lora if layer_index(n) == first],
            "lora_layers": len({layer_index(n) for n, _ in lora} - {None})}


def engine_bytes(counts: dict, engine: str, gpus: int) -> dict:
    """Per-GPU bytes of weights, gradients and optimizer states (and what ZeRO-3 + offload keeps on CPU)."""
    n = 1 if engine == "single" else gpus
    base = counts["frozen_bytes"] + counts["quantized_bytes"]
    t, tn = counts["trainable_bytes"], counts["trainable_params"]
    if engine in ("single", "ddp"):
        # + AdamW's fp32 step counter per tensor; DDP also holds its all-reduce buckets, a copy of the gradients
        return {"weights": base + t, "gradients": t * (2 if engine == "ddp" else 1),
                "optimizer": 2 * t + 4 * counts["trainable_tensors"], "cpu": 0}
    if engine == "zero2":
        return {"weights": base + t, "gradients": 4 * tn / n, "optimizer": 12 * tn / n, "cpu": 0}
    if engine == "zero3":
        return {"weights": (base + t) / n, "gradients": 4 * tn / n, "optimizer": 12 * tn / n, "cpu": 0}
    return {"weights": (base + t) / n, "gradients": 0, "optimizer": 0, "cpu": 16 * tn / n}


def _dims(config: dict) -> dict:
    """The widths the activation count needs, from an official config.json (three architectures)."""
    if config.get("model_type") == "glm4v":  # GLM-4.1V through transformers
        c = config.get("text_config", config)
        heads = c["num_attention_heads"]
        d = c.get("head_dim") or c["hidden_size"] // heads
        return {"arch": "glm41v", "h": c["hidden_size"], "f": c["intermediate_size"], "heads": heads, "d": d,
                "kv": c["num_key_value_heads"] * d, "layers": c["num_hidden_layers"], "vocab": c["vocab_size"],
                "rot": int(d * c.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5)))}
    if "ffn_hidden_size" in config:  # GLM-4 / GLM-4V native
        heads, d = config["num_attention_heads"], config["kv_channels"]
        groups = config["multi_query_group_num"] if config.get("multi_query_attention") else heads
        return {"arch": "glm4", "h": config["hidden_size"], "f": config["ffn_hidden_size"], "heads": heads, "d": d,
                "kv": groups * d, "layers": config["num_layers"], "vocab": config["padded_vocab_size"],
                "rot": d // 4}
    heads = config["num_attention_heads"]  # ChatGLM-6B / VisualGLM-6B
    return {"arch": "chatglm", "h": config["hidden_size"], "f": config["inner_hidden_size"], "heads": heads,
            "d": config["hidden_size"] // heads, "kv": config["hidden_size"], "layers": config["num_layers"],
            "vocab": config["vocab_size"], "rot": config["hidden_size"] // heads // 2}


def lora_bytes(lora_inputs: list[tuple[str, int]], r: int, dropout: float, e: int, device: str = "cuda") -> float:
    """Bytes per token the LoRA branches of one layer save: lora_A's input and output (r). Without dropout the
    input is the base layer's own input, shared by q/k/v_proj (one storage); with dropout each module saves its
    own dropped-out copy and what the dropout keeps for backward: on CUDA the fused kernel's bool mask (1 B per
    element); on CPU (ATen's unfused dropout) the noise tensor in the branch's fp32 adapter dtype (4 B)."""
    mask = 1 if device == "cuda" else 4
    names = {n for n, _ in lora_inputs}
    out = 0.0
    for name, width in lora_inputs:
        out += r * e
        if dropout > 0:
            out += width * (e + mask)
        elif name not in ("k_proj", "v_proj") or "q_proj" not in names:
            out += width * e
    return out


def _layer_bytes(m: dict, e: int) -> float:
    """Bytes per token one decoder layer saves for backward, besides its LoRA branches, with weights and
    activations of e bytes (bf16/fp16: 2, under autocast as training runs; fp32: 4). Norm statistics and the
    attention logsumexp are fp32 whenever the code computes them in fp32; with a half dtype GLM-4's RMSNorms
    also keep fp32 copies of their inputs."""
    h, f, heads, d, kv = m["h"], m["f"], m["heads"], m["d"], m["kv"]
    q = heads * d
    half = e < 4
    if m["arch"] == "glm4":
        # 2 RMSNorm inputs + their fp32 rstd; q and k after rope, k and v repeated to all heads, SDPA output and
        # its fp32 logsumexp; cos/sin; SwiGLU: dense_h_to_4h output (2f) and silu(gate) (f); half: the RMSNorms'
        # fp32 input copies
        return e * (2 * h + 4 * q + m["rot"] + 3 * f) + 4 * (2 + heads) + half * 4 * 2 * h
    if m["arch"] == "chatglm":
        # 2 LayerNorm inputs + mean/rstd; the fused qkv output (3h) and q, k after 2-D rope and v (3h); cos/sin
        # of the two position ids (d); fp32 logsumexp; the tanh-approximated gelu's 7 intermediates (f each)
        return e * (2 * h + 4 + 3 * h + 3 * q + d + 7 * f) + 4 * heads
    # glm41v: 4 RMSNorm inputs, kept in fp32, + fp32 rstd; q (after rope) and SDPA output, k after rope and v (kv
    # each); cos/sin (partial rotary); fp32 logsumexp; SwiGLU gate_up output (2f) + silu (f)
    return 4 * (4 * h + 4 + heads) + e * (2 * q + 2 * kv + m["rot"] + 3 * f)


def activation_bytes(config: dict, tokens: int, batch: int, dtype_bytes: int, checkpointing: bool,
                     lora_per_token: float = 0.0) -> dict:
    """Bytes autograd keeps between forward and backward for `batch` rows of `tokens` tokens.

    saved: what the forward leaves for backward. With gradient checkpointing that is each layer's input
    hidden state; backward then recomputes one layer at a time, which adds `recompute` at the peak."""
    m = _dims(config)
    n = batch * tokens
    layer = (_layer_bytes(m, dtype_bytes) + lora_per_token) * n
    # the loss: fp32 log-softmax over the vocabulary for every predicted token, and the int64 targets
    loss = batch * (tokens - 1) * (m["vocab"] * 4 + 8)
    # final norm input + its statistics (fp32 copy with a half dtype)
    final = n * (m["h"] * dtype_bytes + 4 + (dtype_bytes < 4) * 4 * m["h"])
    mask = batch * tokens * tokens * dtype_bytes if m["arch"] == "chatglm" else 0  # ChatGLM's float mask
    if checkpointing:
        saved = m["layers"] * n * m["h"] * dtype_bytes + final + loss + mask
        return {"saved": saved, "recompute": layer}
    return {"saved": m["layers"] * layer + final + loss + mask, "recompute": 0}


def measure_saved_bytes(model, batch: dict) -> int:
    """Bytes of the tensors one training forward (with its loss) saves for backward: saved-tensor hooks,
    de-duplicated by storage, parameters skipped; under gradient checkpointing, the inputs each checkpointed
    call keeps (its own hooks hide the rest, which backward recomputes)."""
    import torch.utils.checkpoint as ckpt

    from glmtune.train import token_loss_sum

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def note(t):
        if torch.is_tensor(t) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    original = ckpt.checkpoint

    def recording(fn, *args, **kwargs):
        for a in args:
            note(a)
        return original(fn, *args, **kwargs)

    wrapped = []  # transformers binds the checkpoint function per layer when it is enabled
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            wrapped.append((module, module._gradient_checkpointing_func))
            module._gradient_checkpointing_func = lambda fn, *a, _f=module._gradient_checkpointing_func, **k: \
                (list(map(note, a)), _f(fn, *a, **k))[1]
    ckpt.checkpoint = recording
    try:
        with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
            token_loss_sum(model, batch)
    finally:
        ckpt.checkpoint = original
        for module, fn in wrapped:
            module._gradient_checkpointing_func = fn
    return sum(seen.values())


def memory_table(recipe, gpus: int, device: str = "cuda") -> dict:
    """The per-GPU estimate for every engine, at the recipe's max_length and batch size."""
    from glmtune.config import CheckpointError

    path = Path(recipe.model.path) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; --memory needs the model's config.json (set model.path)")
    config = json.loads(path.read_text())
    counts = parameter_counts(recipe)
    e = DTYPE_BYTES[recipe.model.dtype]
    a = recipe.adapter
    lora = 0.0
    if a.method in ("lora", "qlora", "dora"):  # per adapted layer, spread over all layers (adapter.layers)
        lora = lora_bytes(counts["lora_inputs"], a.r, a.dropout, e, device) * counts["lora_layers"] / \
            _dims(config)["layers"]
    act = activation_bytes(config, recipe.data.max_length, recipe.train.batch_size, e,
                           recipe.model.gradient_checkpointing, lora)
    rows = {}
    for engine in ENGINES:
        if engine.startswith("zero3") and recipe.adapter.method == "qlora":
            continue  # training refuses it (the 4-bit base cannot be partitioned)
        b = engine_bytes(counts, engine, gpus)
        b["activations"] = act["saved"] + act["recompute"]
        b["total"] = b["weights"] + b["gradients"] + b["optimizer"] + b["activations"]
        rows[engine] = b
    return {"counts": counts, "activations": act, "gpus": gpus, "engines": rows}


def format_table(report: dict) -> list[str]:
    lines = [f"memory per GPU (GiB), {report['gpus']} GPUs for ddp/zero: weights, gradients, optimizer, "
             f"activations, total (cpu: zero3_offload's optimizer in CPU memory)"]
    lines.append(f"{'engine':<14}{'weights':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'total':>9}{'cpu':>9}")
    for engine, b in report["engines"].items():
        lines.append(f"{engine:<14}" + "".join(f"{b[k] / GIB:>9.2f}" for k in
                     ("weights", "gradients", "optimizer", "activations", "total", "cpu")))
    return lines
