"""`glmtune check`: validate a recipe and its data without training.

Reads every record once (streaming), reports the sample count, every bad sample (file:line and why),
the token length distribution including image tokens, and how many samples `data.max_length` would cut.
"""

from __future__ import annotations

from glmtune.config import Recipe
from glmtune.data.formats import iter_records
from glmtune.data.sample import SampleError
from glmtune.data.stream import image_base, load_sample, start_verdict
from glmtune.models import get_family


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]  # noqa: E731
    return {"min": v[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": v[-1],
            "mean": round(sum(v) / len(v), 1)}


def check_file(path: str, recipe: Recipe, processor) -> dict:
    base = image_base(path, recipe.data.image_dir)
    lengths, image_tokens, bad, over, read, first_bad = [], [], [], 0, 0, 0
    for source, record in iter_records(path):
        read += 1
        try:
            sample, images = load_sample(source, record, base, recipe.data.format, recipe.data.max_image_pixels)
            item = processor.encode(sample.turns, images, source, max_length=None)
        except SampleError as e:
            bad.append({"source": e.source, "reason": e.reason})
            first_bad += read <= recipe.data.check_first
            continue
        n = len(item["input_ids"])
        lengths.append(n)
        image_tokens.append(processor.image_token_count(item))
        over += n > recipe.data.max_length
    # the verdict training gives before step 1 on its first data.check_first records (with on_bad_sample=error
    # it stops at the first bad sample instead, as reported below)
    first = [(b["source"], b["reason"]) for b in bad[:first_bad]]
    verdict = start_verdict(min(read, recipe.data.check_first), first, recipe.data.max_bad_fraction) \
        if recipe.data.on_bad_sample == "skip" or read == 0 else None
    return {"file": path, "records": read, "samples": len(lengths), "bad_samples": len(bad), "bad": bad,
            "error": verdict,
            "tokens": _percentiles(lengths), "image_tokens": _percentiles(image_tokens),
            "over_max_length": over, "max_length": recipe.data.max_length}


def check(recipe: Recipe, print_fn=print) -> dict:
    processor = get_family(recipe.model.family).load_processor(recipe.model.path)
    reports = [check_file(recipe.data.train, recipe, processor)]
    if recipe.data.val:
        reports.append(check_file(recipe.data.val, recipe, processor))
    for r in reports:
        print_fn(f"{r['file']}: {r['samples']} good samples, {r['bad_samples']} bad")
        if r["error"]:
            print_fn(f"  error: {r['file']}: {r['error']}")
        for b in r["bad"][:50]:
            print_fn(f"  bad sample {b['source']}: {b['reason']}")
        if r["bad_samples"] > 50:
            print_fn(f"  ... and {r['bad_samples'] - 50} more")
        if r["tokens"]:
            t, im = r["tokens"], r["image_tokens"]
            print_fn(f"  tokens per sample (incl. image tokens): min {t['min']} p50 {t['p50']} p90 {t['p90']} "
                     f"p99 {t['p99']} max {t['max']} mean {t['mean']}")
            print_fn(f"  image tokens per sample: min {im['min']} p50 {im['p50']} max {im['max']}")
            print_fn(f"  over data.max_length={r['max_length']}: {r['over_max_length']} samples "
                     f"(truncated after the image if possible, else handled as bad samples: "
                     f"data.on_bad_sample={recipe.data.on_bad_sample})")
    errors = [f"{r['file']}: {r['error']}" for r in reports if r["error"]]
    ok = not errors and (all(r["bad_samples"] == 0 for r in reports) or recipe.data.on_bad_sample == "skip")
    if errors:
        print_fn(f"check: training would stop before step 1: {errors[0]}")
    else:
        print_fn("check: OK" if ok else "check: bad samples found and data.on_bad_sample=error: fix them or set "
                                        "data.on_bad_sample=skip")
    return {"ok": ok, "files": reports}
