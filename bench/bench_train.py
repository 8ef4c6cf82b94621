"""Benchmark: data-stream throughput and training step time on the tiny GLM-4.1V, written as JSON.

    python bench/bench_train.py --out bench/results/train.json

Measures (median of repeated runs after a warm-up): samples/s of the streaming loader (parse + image
decode + tokenise, 0 and 1 workers), and seconds per optimizer step for LoRA (language only; vision +
projector + language) and for method none (projector full). Nothing here is asserted: numbers are data.
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
sys.path.insert(0, str(ROOT / "scripts"))


def loader_rate(processor, data: Path, workers: int, n_batches: int = 20) -> float:
    from glmtune.data.stream import StreamSpec, make_loader

    spec = StreamSpec(files=[str(data)], format="glm4", max_length=128, batch_size=16, shuffle_buffer=64)
    it = iter(make_loader(spec, processor, num_workers=workers))
    next(it)  # worker start-up is not throughput
    tic, samples = time.perf_counter(), 0
    for _ in range(n_batches):
        samples += next(it)["samples"]
    return samples / (time.perf_counter() - tic)


def step_time(model_dir: Path, data: Path, out: Path, overrides: list[str], steps: int = 20) -> dict:
    from glmtune.config import load_recipe
    from glmtune.train import train

    recipe = load_recipe(ROOT / "recipes/glm41v/quickstart.yaml", [
        f"model.path={model_dir}", f"data.train={data / 'train.jsonl'}", "data.val=null", f"train.output_dir={out}",
        f"train.max_steps={steps}", "train.save_every=0", "train.resume=never", "log.progress_bar=false", *overrides])
    summary = train(recipe)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    tps = [x["tokens_per_s"] for x in lines[2:]]  # skip warm-up steps
    return {"overrides": overrides, "steps": steps, "wall_time_s": summary["wall_time_s"],
            "median_tokens_per_s": statistics.median(tps), "tokens_seen": summary["tokens_seen"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/train.json")
    args = parser.parse_args()
    from make_shapes_data import make_shapes_data

    from glmtune.models import get_family

    fam = get_family("glm41v")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = fam.make_tiny(tmp / "tiny")
        make_shapes_data(tmp / "data", n_train=1000, n_val=10, seed=0)
        processor = fam.load_processor(model_dir)
        result = {
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
            "loader_samples_per_s": {f"workers_{w}": round(loader_rate(processor, tmp / "data/train.jsonl", w), 1)
                                     for w in (0, 1)},
            "train": [
                step_time(model_dir, tmp / "data", tmp / "r1", ["adapter.components.vision=frozen",
                                                                "adapter.components.projector=frozen"]),
                step_time(model_dir, tmp / "data", tmp / "r2", []),
                step_time(model_dir, tmp / "data", tmp / "r3", ["adapter.method=none",
                                                                "adapter.components.vision=frozen",
                                                                "adapter.components.language=frozen"]),
            ],
        }
    return write_report(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
