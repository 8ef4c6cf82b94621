"""`glmtune {train,check,eval,merge,chat,predict,serve,inspect,make-tiny}`: thin argument parsing over the modules."""

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

    recipe = load_recipe(args.recipe, args.overrides, check_files=not args.memory)
    if args.memory:  # the model's memory only: no data, no weights (built on the meta device)
        from glmtune.memory import format_table, memory_table

        report = memory_table(recipe, args.gpus)
        print("\n".join(format_table(report)))
        if args.json:
            print(json.dumps(report, indent=2))
        return 0
    report = check(recipe)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if report["ok"] else 1


def generation_options(args):
    from glmtune.generation import GenerationOptions

    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                             stop_ids=tuple(args.stop_id))


def cmd_eval(args):
    from glmtune.evaluate import evaluate

    evaluate(args.checkpoint, args.data, out=args.out, adapter=args.adapter, max_samples=args.max_samples,
             max_new_tokens=args.max_new_tokens, data_format=args.format, on_bad_sample=args.on_bad_sample,
             image_dir=args.image_dir, batch_size=args.batch_size, options=generation_options(args), quant=args.quant)


def cmd_predict(args):
    from glmtune.predict import predict

    predict(args.model, args.data, args.out, adapter=args.adapter, batch_size=args.batch_size,
            data_format=args.format, image_dir=args.image_dir, on_bad_sample=args.on_bad_sample,
            max_samples=args.max_samples, options=generation_options(args), quant=args.quant, english=args.english)


def cmd_merge(args):
    from glmtune.merge import merge

    out = merge(args.checkpoint, args.out)
    print(f"merge: wrote {out} in the official layout")


def cmd_chat(args):
    from glmtune.chat import chat

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    chat(args.model, image=args.image, prompt=args.prompt, adapter=args.adapter, options=generation_options(args),
         quant=args.quant, english=args.english, stream_fn=None if args.no_stream else write)


def cmd_serve(args):
    from pathlib import Path

    from glmtune.serve import ServeLimits, serve

    for flag, value in (("--max-request-bytes", args.max_request_bytes), ("--max-image-pixels", args.max_image_pixels),
                        ("--max-tokens-cap", args.max_tokens_cap)):
        if value < 1:
            raise RecipeError(f"{flag} {value}: must be at least 1")
    if args.max_queue < 0:
        raise RecipeError(f"--max-queue {args.max_queue}: must be >= 0")
    dirs = []
    for d in args.allow_image_dir:
        if not Path(d).is_dir():
            raise RecipeError(f"--allow-image-dir {d}: not a folder")
        dirs.append(Path(d).resolve())
    limits = ServeLimits(max_request_bytes=args.max_request_bytes, max_image_pixels=args.max_image_pixels,
                         max_tokens_cap=args.max_tokens_cap, max_queue=args.max_queue, allowed_image_dirs=tuple(dirs))
    options = generation_options(args)
    if options.max_new_tokens > limits.max_tokens_cap:
        raise RecipeError(f"--max-new-tokens {options.max_new_tokens}: over --max-tokens-cap {limits.max_tokens_cap}")
    serve(args.model, adapter=args.adapter, host=args.host, port=args.port, model_name=args.model_name,
          options=options, limits=limits, api_key=args.api_key or os.environ.get("GLMTUNE_API_KEY") or None,
          quant=args.quant, english=args.english)


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


def add_generation_args(s, max_new_tokens: int, english: bool = True) -> None:
    """Decoding options shared by eval, chat and predict (greedy unless --temperature > 0)."""
    g = s.add_argument_group("generation (greedy by default; the seed's cli_demo: --temperature 0.8 --top-p 0.4 "
                             "--top-k 100)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="> 0 samples (default 0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, help="sampling seed (default: a fresh one per run)")
    g.add_argument("--stop-id", type=int, action="append", default=[], help="extra token id that ends an answer "
                   "(repeatable; the model's eos ids always do)")
    g.add_argument("--quant", type=int, choices=[4, 8], help="load the language model's linears in 4-bit (NF4) or "
                   "8-bit (LLM.int8) with bitsandbytes")
    if english:
        g.add_argument("--english", action="store_true", help="VisualGLM-6B: English prompt (Q:/A:) as the seed's "
                       "cli_demo --english")


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
            s.add_argument("--memory", action="store_true", help="print the per-GPU memory estimate of the recipe "
                           "for one GPU, DDP, ZeRO-2, ZeRO-3 and ZeRO-3 + offload (needs only config.json)")
            s.add_argument("--gpus", type=int, default=8, help="GPUs for --memory's DDP/ZeRO columns (default 8)")
        s.set_defaults(fn=fn)

    s = sub.add_parser("eval", help="loss, perplexity, exact match, VQA accuracy, ROUGE and BLEU on a data file")
    s.add_argument("checkpoint", help="training checkpoint folder, or a model folder (with --adapter)")
    s.add_argument("--data", required=True)
    s.add_argument("--out", help="where to write eval.json (default: next to the checkpoint); predictions.jsonl "
                                 "goes beside it")
    s.add_argument("--adapter", help="adapter checkpoint to apply to a model folder")
    s.add_argument("--max-samples", type=int, default=200)
    s.add_argument("--batch-size", type=int, default=8)
    add_generation_args(s, max_new_tokens=32, english=False)
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
    s.add_argument("--no-stream", action="store_true", help="print each answer whole instead of as it is generated")
    add_generation_args(s, max_new_tokens=256)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("predict", help="batch inference over a data file into a jsonl (resumes after a kill)")
    s.add_argument("model", help="model folder (official layout) or training checkpoint")
    s.add_argument("--data", required=True, help="data file in a supported format; the last answer is the reference")
    s.add_argument("--out", required=True, help="jsonl to append to; sources already in it are skipped")
    s.add_argument("--adapter")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-samples", type=int, help="only the first N records")
    s.add_argument("--format", default="auto", choices=["auto", "glm4", "visualglm", "llava", "sharegpt"])
    s.add_argument("--image-dir", help="resolve relative image paths here (default: next to the data file)")
    s.add_argument("--on-bad-sample", default="error", choices=["error", "skip"],
                   help="skip writes the record's error to the output instead of stopping")
    add_generation_args(s, max_new_tokens=256)
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (and the seed's simple API) for a model")
    s.add_argument("model", help="model folder (official layout) or training checkpoint")
    s.add_argument("--adapter")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", help="model id in /v1/models and requests (default: the folder's name)")
    s.add_argument("--api-key", help="clients must send `Authorization: Bearer KEY` (default: $GLMTUNE_API_KEY; "
                   "none: no key)")
    s.add_argument("--max-request-bytes", type=int, default=20_000_000, help="larger bodies get 413")
    s.add_argument("--max-image-pixels", type=int, default=16_000_000, help="larger images get 413")
    s.add_argument("--max-tokens-cap", type=int, default=1024, help="larger max_tokens get 400")
    s.add_argument("--max-queue", type=int, default=8, help="requests waiting for the model; more get 429")
    s.add_argument("--allow-image-dir", action="append", default=[],
                   help="image_url may name local files under this folder (repeatable; default: data: URIs only)")
    add_generation_args(s, max_new_tokens=256)
    s.set_defaults(fn=cmd_serve)

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
    # --quant 8 on a float32 model: bitsandbytes logs at every layer that it computes in fp16, as intended.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except USER_ERRORS as e:
        print(f"glmtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
