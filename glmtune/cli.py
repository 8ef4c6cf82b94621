"""`glmtune {train,check,eval,merge,chat,inspect,make-tiny}`: thin argument parsing over the modules."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys

from glmtune.config import CheckpointError, RecipeError
from glmtune.data.sample import SampleError

# Errors that are the user's to fix: printed as one clear line, never as a traceback.
USER_ERRORS = (RecipeError, CheckpointError, SampleError, FileNotFoundError)


def cmd_train(args):
    from glmtune.config import load_recipe
    from glmtune.train import train

    summary = train(load_recipe(args.recipe, args.overrides))
    is_main = os.environ.get("RANK", "0") == "0"  # one report per job, from the main process
    if "stopped_by" in summary:
        if is_main:
            again = ["glmtune", "train", args.recipe, *[o for o in args.overrides if not o.startswith("train.resume=")],
                     "train.resume=auto"]
            how = (f"run: {shlex.join(again)}" if int(os.environ.get("WORLD_SIZE", 1)) == 1 else
                   "launch the job again with the same arguments and train.resume=auto")
            print(f"glmtune train: stopped by {summary['stopped_by']} after step {summary['steps']} of "
                  f"{summary['max_steps']}; saved {summary['checkpoint']}; to resume, {how}", file=sys.stderr)
        # as a shell reports a process ended by that signal, so `glmtune train ... && next` does not go on
        return 128 + getattr(signal, summary["stopped_by"], signal.SIGTERM)
    if not is_main:
        return
    print(f"train: {summary['steps']} steps, loss {summary['first_train_loss']:.4f} -> "
          f"{summary['final_train_loss']:.4f}, skipped {summary['skipped_samples']} bad samples")
    print(f"train: checkpoint {summary['checkpoint']} | summary {summary['output_dir']}/summary.json")


def cmd_check(args):
    from glmtune.check import check
    from glmtune.config import load_recipe

    report = check(load_recipe(args.recipe, args.overrides))
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if report["ok"] else 1


def cmd_eval(args):
    from glmtune.evaluate import evaluate

    evaluate(args.checkpoint, args.data, out=args.out, adapter=args.adapter, max_samples=args.max_samples,
             max_new_tokens=args.max_new_tokens, data_format=args.format, on_bad_sample=args.on_bad_sample,
             image_dir=args.image_dir)


def cmd_merge(args):
    from glmtune.merge import merge

    out = merge(args.checkpoint, args.out)
    print(f"merge: wrote {out} in the official layout")


def cmd_chat(args):
    from glmtune.chat import chat

    chat(args.model, image=args.image, prompt=args.prompt, adapter=args.adapter, max_new_tokens=args.max_new_tokens)


def cmd_inspect(args):
    from glmtune.config import load_recipe
    from glmtune.inspect import inspect_model

    recipe = load_recipe(args.recipe, args.overrides, check_files=False) if args.recipe else None
    report = inspect_model(args.model, family=args.family, meta=args.meta, recipe=recipe)
    print(json.dumps(report, indent=1))


def cmd_make_tiny(args):
    from glmtune.models import get_family

    out = get_family(args.family).make_tiny(args.dir, seed=args.seed)
    print(f"make-tiny: wrote a tiny {args.family} checkpoint to {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmtune", description="Fine-tune GLM vision-language models.")
    sub = p.add_subparsers(dest="command", required=True)

    for name, fn, help_ in (("train", cmd_train, "train a recipe"),
                            ("check", cmd_check, "validate a recipe and its data without training")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", help="recipe YAML file")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
        if name == "check":
            s.add_argument("--json", action="store_true", help="also print the full report as JSON")
        s.set_defaults(fn=fn)

    s = sub.add_parser("eval", help="loss and exact match of a checkpoint on a data file")
    s.add_argument("checkpoint", help="training checkpoint folder, or a model folder (with --adapter)")
    s.add_argument("--data", required=True)
    s.add_argument("--out", help="where to write eval.json (default: next to the checkpoint)")
    s.add_argument("--adapter", help="adapter checkpoint to apply to a model folder")
    s.add_argument("--max-samples", type=int, default=200)
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--format", choices=["auto", "glm4", "visualglm", "llava", "sharegpt"],
                   help="data format (default: the checkpoint recipe's, else auto)")
    s.add_argument("--on-bad-sample", default="error", choices=["error", "skip"])
    s.add_argument("--image-dir", help="resolve relative image paths here (default: next to the data file)")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("merge", help="fold a checkpoint into its base model, official layout")
    s.add_argument("checkpoint")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("chat", help="talk to a model about an image")
    s.add_argument("model", help="model folder (official layout) or training checkpoint")
    s.add_argument("--adapter")
    s.add_argument("--image")
    s.add_argument("--prompt", help="one question, one answer; without it: interactive")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("inspect", help="parameter names/shapes (JSON) and what a recipe would train")
    s.add_argument("model", help="folder with config.json (weights are not read)")
    s.add_argument("--meta", action="store_true", help="build on the meta device: full-size configs cost no memory")
    s.add_argument("--family", help="model family (default: from config.json, or the recipe's)")
    s.add_argument("--recipe", help="recipe whose adapter settings decide what trains")
    s.add_argument("overrides", nargs="*", help="key=value overrides for --recipe")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("make-tiny", help="write a tiny checkpoint in the official layout")
    s.add_argument("family")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_make_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    # bitsandbytes' CPU backend announces that an optional hub-downloaded kernel is absent; glmtune never
    # downloads kernels, and the built-in CPU path is what it uses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # PEFT 0.21 calls a transformers 5 property that transformers itself deprecated; not the user's concern.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except USER_ERRORS as e:
        print(f"glmtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
