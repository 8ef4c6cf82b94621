"""Benchmark: per-rank memory of parameters + optimizer state under DDP, ZeRO-2, ZeRO-3 (and ZeRO-3 with CPU
offload) at 2 processes, as JSON, so that the partitioning is measured, not assumed.

    python bench/bench_distributed.py --out bench/results/distributed.json

A mid-size GLM-4 language model (hidden 1024, 8 layers, FFN 2816: ~110M parameters) written in the official
layout (the tiny tokenizer of `glmtune make-tiny glm4`, mid-size config and weights), trained in full
(adapter.method=none, fp32, AdamW) for 2 steps by `launch.sh 2` (torchrun, gloo on a CPU machine) under each
engine. Each rank reports (summary.json "memory_per_rank", glmtune/distributed.py) the bytes of the parameters
it holds (its partition under ZeRO-3), of its optimizer state (Adam moments plus DeepSpeed's fp32 master copy
of its partition) and its peak resident memory after loading and at the end. Expected: DDP holds everything on
every rank; ZeRO-2 halves the optimizer state; ZeRO-3 halves the parameters too (it loads partitioned). The
final peak under ZeRO-3 includes DeepSpeed's cache of gathered weights (stage3_max_live_parameters: 1e9
elements by default, more than this whole model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_report  # bench/report.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parent.parent
MID = {"hidden_size": 1024, "num_layers": 8, "num_hidden_layers": 8, "num_attention_heads": 16, "kv_channels": 64,
       "multi_query_group_num": 2, "ffn_hidden_size": 2816}
ENGINES = ("ddp", "zero2", "zero3", "zero3_offload")


def make_mid_model(out: Path) -> int:
    """`make-tiny glm4` for the tokenizer and layout, then mid-size config.json and weights in its place."""
    from glmtune.models import get_family
    from glmtune.models.glm4v.config import config_from_dict
    from glmtune.models.glm4v.model import ChatGLMForConditionalGeneration
    from glmtune.models.weights import init_random, save_sharded

    get_family("glm4").make_tiny(out, seed=0)
    raw = json.loads((out / "config.json").read_text())
    raw.update(MID)  # keeps the tiny tokenizer's vocabulary
    for old in list(out.glob("model*.safetensors*")):
        old.unlink()
    model = ChatGLMForConditionalGeneration(config_from_dict(raw))
    init_random(model, std=0.02)
    save_sharded(model.state_dict(), out, 200_000_000)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return sum(p.numel() for p in model.parameters())


def make_data(out: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"There is a {c} shape. What colour is it?"},
                          {"role": "assistant", "content": c}]} for c in ("red", "green", "blue", "yellow") * 8]
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(engine: str, model: Path, data: Path, out: Path) -> dict:
    args = [f"model.path={model}", f"data.train={data}", "data.val=null", "model.dtype=float32",
            "train.mixed_precision=no", "model.gradient_checkpointing=false", "adapter.method=none",
            "adapter.components.language=full", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
            "train.save_every=0", "train.resume=never", "log.progress_bar=false", "log.report_to=[jsonl]",
            "data.max_length=64", f"train.distributed={engine}", f"train.output_dir={out}"]
    cmd = ["bash", str(ROOT / "launch.sh"), "2", str(ROOT / "recipes/glm4/lora.yaml"),
           "--master", f"127.0.0.1:{free_port()}", *args]
    tic = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{r.stderr[-3000:]}")
    ranks = json.loads((out / "summary.json").read_text())["memory_per_rank"]
    mib = 1 << 20
    return {"engine": engine, "wall_s": round(time.time() - tic, 1),
            "per_rank": [{"rank": m["rank"], "param_mib": round(m["param_bytes"] / mib, 1),
                          "optimizer_mib": round(m["optimizer_bytes"] / mib, 1),
                          "params_plus_optimizer_mib": round((m["param_bytes"] + m["optimizer_bytes"]) / mib, 1),
                          "peak_rss_after_setup_mib": round(m["peak_rss_after_setup_bytes"] / mib, 1),
                          "peak_rss_mib": round(m["peak_rss_bytes"] / mib, 1)} for m in ranks]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/distributed.json")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        n_params = make_mid_model(model)
        data = make_data(tmp)
        results = [run(e, model, data, tmp / e) for e in ENGINES]
    report = {"model": dict(MID, family="glm4", parameters=n_params), "processes": 2,
              "training": "full (adapter.method=none), fp32, AdamW, batch 2 x 64 tokens per rank",
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "backend": "gloo (CPU)"}, "results": results}
    return write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
