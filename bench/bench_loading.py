"""Benchmark: peak memory of loading a sharded checkpoint with the native streaming loader, as JSON.

    python bench/bench_loading.py --out bench/results/loading.json

Writes a mid-size GLM-4 checkpoint (hidden 2048, 12 layers, about 2.4 GB in fp32) in ~100 MB shards, then
loads it in a fresh process with `glmtune.models.get_family("glm4").load_model` and reports that
process's peak resident memory next to the model's own size and the largest shard: the design promise is
peak ~ model + one shard (plus the Python/torch baseline, measured separately in an empty process).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from report import write_report  # bench/report.py (scripts run from bench/)

MID = {"hidden_size": 2048, "num_layers": 12, "num_hidden_layers": 12, "num_attention_heads": 16, "kv_channels": 128,
       "multi_query_group_num": 2, "ffn_hidden_size": 5632, "padded_vocab_size": 16384}

# VmHWM (peak resident set of this process image): ru_maxrss would include the parent's peak across exec.
CHILD = """
import sys, json, torch
import glmtune.models.glm4v, glmtune.models.glm4
if sys.argv[1] != "-":
    from glmtune.models import get_family
    model = get_family("glm4").load_model(sys.argv[1])
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
else:
    n = 0
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) * 1024
print(json.dumps({"peak_rss_bytes": hwm, "model_bytes": n}))
"""


def measure(path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/loading.json")
    args = parser.parse_args()
    import torch

    from glmtune.models.glm4v.config import config_from_dict
    from glmtune.models.glm4v.model import ChatGLMForConditionalGeneration
    from glmtune.models.glm4v.tiny import OFFICIAL_TEXT
    from glmtune.models.weights import init_random, save_sharded

    with tempfile.TemporaryDirectory() as tmp:
        raw = dict(OFFICIAL_TEXT, **MID, torch_dtype="float32", eos_token_id=[16383], pad_token_id=16383)
        model = ChatGLMForConditionalGeneration(config_from_dict(raw))
        init_random(model, std=0.02)
        shards = save_sharded(model.state_dict(), tmp, 100 * 2**20)
        (Path(tmp) / "config.json").write_text(json.dumps(raw))
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        baseline = measure("-")
        loaded = measure(tmp)
        largest = max(p.stat().st_size for p in shards)
    report = {
        "config": MID, "shards": len(shards), "largest_shard_bytes": largest,
        "model_bytes": loaded["model_bytes"], "baseline_rss_bytes": baseline["peak_rss_bytes"],
        "peak_rss_bytes": loaded["peak_rss_bytes"],
        "peak_minus_baseline_over_model": round((loaded["peak_rss_bytes"] - baseline["peak_rss_bytes"])
                                                / loaded["model_bytes"], 3),
        "peak_minus_baseline_minus_model_over_largest_shard": round(
            (loaded["peak_rss_bytes"] - baseline["peak_rss_bytes"] - loaded["model_bytes"]) / largest, 3),
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
