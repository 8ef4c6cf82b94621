"""`glmtune eval`: loss, perplexity and generation metrics of a checkpoint on a data file -> eval.json, with
every prediction in predictions.jsonl beside it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from glmtune.chat import load_for_inference
from glmtune.checkpoint import checkpoint_recipe
from glmtune.data.formats import iter_records
from glmtune.data.sample import SampleError
from glmtune.data.stream import StreamSpec, image_base, load_sample
from glmtune.generation import GenerationOptions, generate_text
from glmtune.metrics import generation_metrics, normalize, perplexity

__all__ = ["evaluate", "normalize", "data_defaults"]


def data_defaults(target: str | Path) -> dict:
    """A training checkpoint's data settings (format, image_dir, max_length), else generic defaults."""
    if (Path(target) / "recipe.yaml").is_file():
        d = checkpoint_recipe(target).data
        return {"format": d.format, "image_dir": d.image_dir, "max_length": d.max_length}
    return {"format": "auto", "image_dir": None, "max_length": 4096}


def evaluate(target: str | Path, data: str | Path, out: str | Path | None = None, adapter=None,
             max_samples: int = 200, max_new_tokens: int = 32, batch_size: int = 8, data_format: str | None = None,
             on_bad_sample: str = "error", image_dir: str | None = None, print_fn=print,
             options: GenerationOptions | None = None, quant: int | None = None) -> dict:
    """`data_format` / `image_dir` default to the checkpoint recipe's (when `target` is a training checkpoint).
    Generation is greedy with `max_new_tokens` unless `options` say otherwise."""
    from glmtune.train import eval_loss

    data = Path(data)
    if not data.is_file():
        raise FileNotFoundError(f"--data {data}: file not found")
    defaults = data_defaults(target)
    data_format = data_format or defaults["format"]
    image_dir = image_dir or defaults["image_dir"]
    options = options or GenerationOptions(max_new_tokens)
    family, model, processor = load_for_inference(target, adapter, quant=quant)
    spec = StreamSpec(files=[str(data)], format=data_format, image_dir=image_dir, max_length=defaults["max_length"],
                      on_bad_sample=on_bad_sample, batch_size=batch_size, epochs=1, max_records=max_samples)
    loss = eval_loss(model, processor, spec)

    pending, results, skipped = [], [], []

    def flush():
        answers = generate_text(family, model, processor, [(s.turns[:-1], imgs) for s, imgs in pending], options)
        for (s, _), pred in zip(pending, answers):
            ref = s.turns[-1].text
            results.append({"source": s.source, "question": s.turns[-2].text, "reference": ref,
                            "prediction": pred, "exact": normalize(pred) == normalize(ref)})
        pending.clear()

    base = image_base(data, image_dir)
    for source, record in iter_records(data):
        if len(results) + len(pending) >= max_samples:
            break
        try:
            pending.append(load_sample(source, record, base, data_format))
        except SampleError as e:
            if on_bad_sample == "error":
                raise
            skipped.append({"source": e.source, "reason": e.reason})
            continue
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    n = len(results)
    scores = generation_metrics([r["prediction"] for r in results], [r["reference"] for r in results])
    report = {
        "target": str(target), "adapter": str(adapter) if adapter else None, "data": str(data),
        "loss": loss["loss"], "perplexity": perplexity(loss["loss"]), "loss_tokens": loss["tokens"], "samples": n,
        **scores, "generation": asdict(options), "quant": quant,
        "skipped": skipped, "examples": results[:20],
    }
    out = Path(out) if out else (Path(adapter or target) / "eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    with open(out.parent / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    em = "n/a" if report["exact_match"] is None else f"{report['exact_match']:.3f}"
    rouge = "n/a" if n == 0 else f"{report['rouge-l']:.1f}"
    print_fn(f"eval: loss {report['loss']:.4f} (ppl {report['perplexity']:.2f}) | exact match {em} | ROUGE-L {rouge} "
             f"on {n} samples | skipped {len(skipped)} | -> {out}")
    report["path"] = str(out)
    return report
