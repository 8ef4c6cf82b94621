"""Benchmark: glmtune against a plain transformers Trainer + PEFT script (bench/plain_trainer.py), written as JSON.

    python bench/bench_speed.py --out bench/results/speed.json [--samples 2000 --longtail 400 --repeats 2]

Tiny GLM-4.1V, LoRA r8 on the language model only, batch 4, fp32, 2 data workers, one epoch, both tools run as
`python` processes in this invocation, interleaved (plain, glmtune configs..., repeated):
  - short mix: `--samples` samples of 37-100 tokens, 16 image tokens each; long-tail mix: `--longtail` samples,
    lengths log-normal from ~40 to ~2000 tokens, with images;
  - per run: time to first step (launch -> end of optimizer step 1), samples/s and non-pad tokens/s over the
    epoch after step 1 (both tools train on the same samples, so non-pad tokens are glmtune's count);
    glmtune's median data_wait_s per step;
  - ratio glmtune / plain of the medians over repeats, and every repeat's value (the noise);
  - glmtune's time to first step and peak RSS with 1k and 100k samples (streaming: both should stay flat);
  - the start-up of 2 data workers (fork server) to the first batch, against reading it in the trainer;
  - `glmtune merge` throughput against copying the same checkpoint, and merge peak RSS against the largest shard.
Nothing here is asserted: numbers are data.

CONFIGS lists glmtune configurations as override lists: a new entry (e.g. packing) is one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import write_report  # bench/report.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
RECIPE = ROOT / "recipes" / "glm41v" / "quickstart.yaml"
BATCH, WORKERS, RANK, LR = 4, 2, 8, 1e-3
# What the plain script does, as a recipe: LoRA r8 on the language model only, fp32, one epoch, no eval/saves.
BASE = [f"train.batch_size={BATCH}", f"data.num_workers={WORKERS}", f"adapter.r={RANK}", f"adapter.alpha={2 * RANK}",
        "adapter.dropout=0.0", "adapter.components.vision=frozen", "adapter.components.projector=frozen",
        "adapter.components.language=lora", "model.dtype=float32", "train.mixed_precision=no", f"train.lr={LR}",
        "train.warmup_ratio=0.05", "train.lr_scheduler=cosine", "train.weight_decay=0.0", "train.save_every=0",
        "train.eval_every=0", "data.val=null", "train.resume=never", "log.progress_bar=false",
        "log.report_to=[jsonl]", "data.max_length=2048", "data.on_bad_sample=skip", "train.grad_accum=1"]
CONFIGS = {
    "glmtune": [],
    "glmtune_packed": ["data.packing=true"],  # samples share rows up to data.max_length, each seeing only itself
}
WORDS = ("the red blue green yellow circle square triangle shape colour top left right bottom image is in of a "
         "what where which picture there one small large").split()


def write_mix(processor, images: list[str], out: Path, lengths: list[int], seed: int) -> dict:
    """GLM-4 messages jsonl whose samples have about `lengths` tokens each (one image each); returns stats."""
    from glmtune.data.sample import Turn

    rng = random.Random(seed)
    base = processor.encode([Turn("user", "<image>Q"), Turn("assistant", "A")], [_image(images[0])])
    fixed = len(base["input_ids"]) - 2  # template + image tokens
    rows, real = [], []
    for n in lengths:
        words = [rng.choice(WORDS) for _ in range(max(0, n - fixed))]  # then drop answer words down to n
        q_words, a_words = words[: len(words) // 3], words[len(words) // 3:]
        q = "What colour is the shape? " + " ".join(q_words)
        a = " ".join(a_words) or "red"
        count = fixed + len(processor.text(q)) + len(processor.text(a))
        while count > n and a_words:
            a_words.pop()
            a = " ".join(a_words) or "red"
            count = fixed + len(processor.text(q)) + len(processor.text(a))
        real.append(count)
        rows.append({"messages": [{"role": "user", "content": q, "image": rng.choice(images)},
                                  {"role": "assistant", "content": a}]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"samples": len(rows), "tokens_min": min(real), "tokens_median": statistics.median(real),
            "tokens_max": max(real), "image_tokens_each": int(base["mm_token_type_ids"].sum())}


def _image(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def run_glmtune(model: Path, data: Path, out: Path, overrides: list[str], steps: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "glmtune", "train", str(RECIPE), f"model.path={model}", f"data.train={data}",
           f"train.output_dir={out}", f"train.max_steps={steps}", *BASE, *overrides]
    launched = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    summary = json.loads((out / "summary.json").read_text())
    return {"launched": launched, "ends": [r["time"] for r in rows], "tokens": summary["tokens_seen"],
            "samples": summary["samples_seen"], "data_wait_s": statistics.median(r["data_wait_s"] for r in rows),
            "peak_rss_mb": summary["memory_per_rank"][0]["peak_rss_bytes"] / 2**20, "summary": summary}


def run_plain(model: Path, data: Path, out: Path, steps: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "bench" / "plain_trainer.py"), str(model), str(data), str(out),
           "--steps", str(steps), "--batch", str(BATCH), "--workers", str(WORKERS), "--r", str(RANK), "--lr", str(LR)]
    launched = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    timing = json.loads((out / "timing.json").read_text())
    return {"launched": launched, "ends": timing["step_end_times"], "samples": timing["samples"]}


def rates(run: dict, tokens: int, n_samples: int) -> dict:
    """Time to first step, and samples/s + non-pad tokens/s over the steps after the first (steady state)."""
    ends = run["ends"]
    span = ends[-1] - ends[0]
    later = (len(ends) - 1) / len(ends)  # share of the epoch after step 1
    return {"first_step_s": round(ends[0] - run["launched"], 2),
            "samples_per_s": round(n_samples * later / span, 2),
            "tokens_per_s": round(tokens * later / span, 1),
            "epoch_wall_s": round(ends[-1] - run["launched"], 2)}


def compare(name: str, model: Path, data: Path, stats: dict, tmp: Path, repeats: int) -> dict:
    steps = math.ceil(stats["samples"] / BATCH)  # one epoch
    runs = {"plain": []} | {c: [] for c in CONFIGS}
    tokens = None
    for rep in range(repeats):
        plain = run_plain(model, data, tmp / f"{name}-plain", steps)
        results = {}
        for config, overrides in CONFIGS.items():
            results[config] = run_glmtune(model, data, tmp / f"{name}-{config}", overrides, steps)
            tokens = tokens or results[config]["tokens"]  # one epoch: the same samples for every tool
        runs["plain"].append(rates(plain, tokens, stats["samples"]))
        for config, r in results.items():
            runs[config].append({**rates(r, tokens, stats["samples"]), "median_data_wait_s": round(r["data_wait_s"], 4)})
    median = {tool: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for tool, rs in runs.items()}
    ratios = {config: {"samples_per_s": round(median[config]["samples_per_s"] / median["plain"]["samples_per_s"], 3),
                       "tokens_per_s": round(median[config]["tokens_per_s"] / median["plain"]["tokens_per_s"], 3),
                       "first_step_s": round(median[config]["first_step_s"] / median["plain"]["first_step_s"], 3)}
              for config in CONFIGS}
    return {"data": stats, "steps": steps, "non_pad_tokens": tokens, "runs": runs, "median": median,
            "ratio_vs_plain": ratios}


def scale(model: Path, short: Path, tmp: Path) -> dict:
    """glmtune's time to first step and peak RSS (trainer process) with 1k and 100k samples."""
    lines = short.read_text().splitlines(keepends=True)
    out = {}
    for n in (1_000, 100_000):
        data = tmp / f"scale_{n}.jsonl"
        with open(data, "w") as f:
            f.writelines(lines[i % len(lines)] for i in range(n))
        r = run_glmtune(model, data, tmp / f"scale-{n}", ["data.shuffle_buffer=512"], steps=5)
        out[f"samples_{n}"] = {"first_step_s": round(r["ends"][0] - r["launched"], 2),
                               "peak_rss_mb": round(r["peak_rss_mb"], 1)}
    return out


def worker_start(processor, data: Path) -> dict:
    """Seconds to the first batch with 2 fork-server workers (their start-up) and with none (in the trainer)."""
    from glmtune.data.stream import StreamSpec, make_loader

    spec = StreamSpec(files=[str(data)], format="glm4", max_length=2048, batch_size=BATCH)
    out = {}
    for workers in (0, WORKERS):
        tic = time.perf_counter()
        next(iter(make_loader(spec, processor, num_workers=workers)))
        out[f"first_batch_s_workers_{workers}"] = round(time.perf_counter() - tic, 3)
    return out


def merge_speed(model: Path, ckpt: Path, tmp: Path) -> dict:
    """`glmtune merge` (own process) against copying the checkpoint it reads; its peak RSS against the largest
    shard of the base model."""
    tic = time.perf_counter()
    shutil.copytree(model, tmp / "copy")
    copy_s = time.perf_counter() - tic
    code = ("import resource, sys; from glmtune.cli import main; code = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "merge", str(ckpt), "--out", str(tmp / "merged")],
                          check=True, capture_output=True, text=True, cwd=ROOT)
    merge_s = time.perf_counter() - tic
    size = sum(f.stat().st_size for f in (tmp / "merged").rglob("*") if f.is_file())
    shards = [f.stat().st_size for f in model.glob("*.safetensors")]
    return {"copy_s": round(copy_s, 3), "merge_s": round(merge_s, 2), "merged_mb": round(size / 2**20, 2),
            "merge_mb_per_s": round(size / 2**20 / merge_s, 2),
            "copy_mb_per_s": round(size / 2**20 / max(copy_s, 1e-6), 2),
            "merge_peak_rss_mb": round(int(done.stdout.split()[-1]) / 1024, 1),
            "largest_shard_mb": round(max(shards) / 2**20, 2)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/speed.json")
    parser.add_argument("--samples", type=int, default=2000, help="short-mix samples (one epoch is trained)")
    parser.add_argument("--longtail", type=int, default=400, help="long-tail samples (0: skip)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-scale", action="store_true", help="skip the 1k/100k and merge measurements")
    args = parser.parse_args()
    from make_shapes_data import make_shapes_data

    from glmtune.models import get_family

    fam = get_family("glm41v")
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "load_average_at_start": os.getloadavg()[0],
                          "cpu": platform.processor() or platform.machine()},
              "setup": {"batch": BATCH, "workers": WORKERS, "lora_r": RANK, "configs": CONFIGS}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(fam.make_tiny(tmp / "tiny"))
        make_shapes_data(tmp / "data", n_train=200, n_val=1, seed=0)
        images = [f"images/{p.name}" for p in sorted((tmp / "data" / "images").glob("train_*.png"))]
        processor = fam.load_processor(model)
        rng = random.Random(0)
        with_images = [str(tmp / "data" / i) for i in images]
        short = tmp / "data" / "short.jsonl"
        result["short"] = compare("short", model, short, write_mix(
            processor, with_images, short, [rng.randint(37, 100) for _ in range(args.samples)], 0), tmp, args.repeats)
        if args.longtail:
            longtail = tmp / "data" / "longtail.jsonl"
            lengths = [min(2000, max(40, round(rng.lognormvariate(math.log(200), 1.0)))) for _ in range(args.longtail)]
            result["longtail"] = compare("longtail", model, longtail, write_mix(
                processor, with_images, longtail, lengths, 1), tmp, args.repeats)
        result["worker_start"] = worker_start(processor, short)
        if not args.no_scale:
            result["scale"] = scale(model, short, tmp / "data")
            result["merge"] = merge_speed(model, tmp / "scale-1000" / "checkpoint-final", tmp)
        result["machine"]["load_average_at_end"] = os.getloadavg()[0]
    return write_report(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
