"""The memory model (glmtune/memory.py) against what training and autograd really hold, on the tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from glmtune.config import load_recipe
from glmtune.data.sample import Turn
from glmtune.memory import activation_bytes, engine_bytes, lora_bytes, measure_saved_bytes, parameter_counts

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("glm4", "glm4v", "chatglm", "visualglm", "glm41v")


def tiny_recipe(family: str, model: Path, *extra: str):
    return load_recipe(ROOT / "recipes" / family / "lora.yaml",
                       [f"model.path={model}", "data.train=unused.jsonl", *extra], check_files=False)


CASES = [(f, c, "bfloat16") for f in FAMILIES for c in (False, True)] + \
    [(f, False, "float32") for f in ("glm4", "chatglm", "glm41v")]


@pytest.mark.parametrize("family,checkpointing,dtype", CASES)
def test_activations_match_saved_tensors(family, checkpointing, dtype, request):
    """The structural estimate within 15% of the bytes one training forward saves for backward, at the
    recipe's max_length, batch size, LoRA targets and dropout, in its bf16 under autocast as training runs it,
    and in float32 (measured: within 4% for every case)."""
    from glmtune.adapters import attach
    from glmtune.models import get_family

    path = request.getfixturevalue(f"tiny_{family}")
    recipe = tiny_recipe(family, path, f"model.gradient_checkpointing={checkpointing}",
                         f"model.dtype={dtype}",
                         f"train.mixed_precision={'bf16' if dtype == 'bfloat16' else 'no'}", "adapter.layers=[]")
    fam = get_family(family)
    model = fam.load_model(path, getattr(torch, recipe.model.dtype))
    if checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.enable_input_require_grads()
    model = attach(model, fam, recipe.adapter)
    model.train()
    processor = fam.load_processor(path)
    T, B = recipe.data.max_length, recipe.train.batch_size
    vision = "vision" in fam.components
    item = processor.encode([Turn("user", ("<image>" if vision else "") + "hi"), Turn("assistant", "so " * T)],
                            [Image.new("RGB", (64, 64), (200, 10, 10))] if vision else [], "x", max_length=T)
    item.pop("truncated")
    assert len(item["input_ids"]) == T
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.train.mixed_precision == "bf16"):
        got = measure_saved_bytes(model, processor.collate([item] * B))
    a = recipe.adapter
    counts = parameter_counts(recipe)
    e = 4 if dtype == "float32" else 2
    est = activation_bytes(json.loads((path / "config.json").read_text()), T, B, e, checkpointing,
                           lora_bytes(counts["lora_inputs"], a.r, a.dropout, e, "cpu"))["saved"]
    print(f"{family} checkpointing={checkpointing} {dtype}: estimate/measured {est / got:.3f}")
    assert abs(est / got - 1) < 0.15, (est, got)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_weights_and_optimizer_equal_what_training_measures(method, tiny_glm4, text_data, tmp_path):
    """One process (DDP-like): param_bytes and optimizer_bytes of summary.json equal the meta-device counts
    (QLoRA: the packed 4-bit weights are parameters, half a byte each; their absmax statistics are not)."""
    from glmtune.train import train

    out = tmp_path / "run"
    recipe = load_recipe(ROOT / "recipes" / "glm4" / f"{method}.yaml", [
        f"model.path={tiny_glm4}", f"data.train={text_data / 'train.jsonl'}", f"train.output_dir={out}",
        "train.max_steps=1", "train.resume=never", "log.progress_bar=false", "log.report_to=[jsonl]"])
    train(recipe)
    measured = json.loads((out / "summary.json").read_text())["memory_per_rank"][0]
    counts = parameter_counts(recipe)
    b = engine_bytes(counts, "ddp", 1)
    assert (method == "qlora") == (counts["quantized_params"] > 0)
    absmax = counts["quantized_bytes"] - counts["quantized_params"] / 2
    assert b["weights"] - absmax == measured["param_bytes"]
    assert b["optimizer"] == measured["optimizer_bytes"]


def test_cli_prints_the_table_for_a_full_size_config():
    cmd = [sys.executable, "-m", "glmtune", "check", str(ROOT / "recipes" / "glm4v" / "lora.yaml"),
           f"model.path={ROOT / 'tests' / 'reference' / 'glm-4v-9b'}", "--memory", "--gpus", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"single", "ddp", "zero2", "zero3", "zero3_offload"}
    # GLM-4V-9B: 13.9e9 parameters in bf16 = 25.9 GiB on one GPU; ZeRO-3 splits them over 8
    assert 25 < float(rows["single"][0]) < 27 and abs(float(rows["zero3"][0]) * 8 - float(rows["single"][0])) < 0.1


def test_memory_without_config_json_is_one_clear_error(tmp_path):
    from glmtune.config import CheckpointError
    from glmtune.memory import memory_table

    with pytest.raises(CheckpointError, match=r"config\.json: no such file.*model\.path"):
        memory_table(tiny_recipe("glm4", tmp_path), gpus=8)
