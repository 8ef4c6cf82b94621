"""Benchmark: resident bytes of the base weights and step time under adapter methods, as JSON.

    python bench/bench_methods.py --out bench/results/methods.json

A mid-size native GLM-4 language model (hidden 1024, 8 layers, FFN 2816, vocab 8192) built from a
config.json written to a temp folder, with adapter.method none (language full), lora, qlora (NF4 base),
dora and ptuning attached by glmtune's own `attach`. Bytes are counted from the tensors' storages
(packed NF4 weights and their quantization statistics included); step time is the median of timed
forward + backward + AdamW steps on a random batch (batch 2, 256 tokens) after warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import write_report  # bench/report.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parent.parent
MID = {"hidden_size": 1024, "num_layers": 8, "num_hidden_layers": 8, "num_attention_heads": 16, "kv_channels": 64,
       "multi_query_group_num": 2, "ffn_hidden_size": 2816, "padded_vocab_size": 8192}


def base_bytes(model) -> int:
    """Bytes held by frozen tensors (params, buffers and bitsandbytes quant states), each storage once."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor):
            return
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for p in model.parameters():
        if not p.requires_grad:
            add(p)
            state = getattr(p, "quant_state", None)
            if state is not None:
                add(state.absmax)
                add(state.code)
                if state.state2 is not None:
                    add(state.state2.absmax)
                    add(state.state2.code)
    for b in model.buffers():
        add(b)
    return total


def run(method: str, model_dir: Path, steps: int) -> dict:
    from glmtune.adapters import attach
    from glmtune.config import AdapterConfig
    from glmtune.models import get_family

    fam = get_family("glm4")
    model = fam.load_model(model_dir)
    components = {"language": "full" if method == "none" else ("frozen" if method == "ptuning" else "lora")}
    cfg = AdapterConfig(method=method, r=16, alpha=32, components=components, num_virtual_tokens=32)
    model = attach(model, fam, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MID["padded_vocab_size"] - 64, (2, 256), generator=g)
    pos = torch.arange(256).expand(2, 256)
    times = []
    for step in range(steps + 2):
        tic = time.perf_counter()
        logits = model(input_ids=ids, position_ids=pos).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - tic)
    return {"method": method, "base_weight_bytes": base_bytes(model),
            "trainable_parameters": sum(p.numel() for p in params),
            "median_step_s": round(statistics.median(times), 4), "steps_timed": len(times)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/methods.json")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    from glmtune.models.glm4v.config import config_from_dict
    from glmtune.models.glm4v.model import ChatGLMForConditionalGeneration
    from glmtune.models.glm4v.tiny import OFFICIAL_TEXT
    from glmtune.models.weights import init_random, save_sharded

    with tempfile.TemporaryDirectory() as tmp:
        raw = dict(OFFICIAL_TEXT, **MID, torch_dtype="float32", eos_token_id=[8191], pad_token_id=8191)
        model = ChatGLMForConditionalGeneration(config_from_dict(raw))
        init_random(model, std=0.02)
        save_sharded(model.state_dict(), tmp, 1 << 30)
        (Path(tmp) / "config.json").write_text(json.dumps(raw))
        del model
        results = [run(m, Path(tmp), args.steps) for m in ("none", "lora", "dora", "qlora", "ptuning")]
    report = {"config": MID, "batch": [2, 256], "machine": {"python": platform.python_version(),
              "torch": torch.__version__, "threads": torch.get_num_threads()}, "results": results}
    return write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
