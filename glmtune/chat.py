"""Conversation with a (tuned) model: one-shot or interactive, as the upstream cli_demo.

`glmtune chat MODEL [--adapter CKPT] --image FILE [--prompt TEXT]`. MODEL is a checkpoint folder in the
official layout (e.g. a merged model) or a glmtune training checkpoint (then its base and adapter are used).
Sampling options, `--quant 4|8` and `--english` as the upstream cli_demo.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmtune.config import CheckpointError, RecipeError
from glmtune.data.sample import IMAGE_PLACEHOLDER, Turn
from glmtune.generation import GenerationOptions, generate_text, stream_text
from glmtune.models import detect_family, get_family

QUANT_BLOCK = 64  # bitsandbytes' CPU 4-bit kernel packs 64 input features per block


def adapter_owned_linears(adapter: Path | None) -> set[str]:
    """Module names whose weights an adapter replaces wholesale (full components, PEFT modules_to_save):
    they stay unquantized, since their trained weights are loaded onto them."""
    if adapter is None:
        return set()
    owned = set()
    full = Path(adapter) / "full_weights.safetensors"
    if full.is_file():
        from safetensors import safe_open

        with safe_open(str(full), "pt") as f:
            owned |= {k.rsplit(".", 1)[0] for k in f.keys()}
    config = Path(adapter) / "adapter_config.json"
    if config.is_file():
        owned |= set(json.loads(config.read_text()).get("modules_to_save") or [])
    return owned


def quantize_for_inference(model, family, bits: int, keep: set[str] = frozenset()) -> list[str]:
    """The language model's linears (not the output head) as bitsandbytes int8 (LLM.int8, threshold 6 as
    transformers' load_in_8bit) or NF4 4-bit, as the seeds' `--quant` quantizes the GLM layers only; returns
    the quantized names. 4-bit needs in_features % 64 == 0 on the CPU kernel: other linears stay as they are."""
    import bitsandbytes as bnb

    from glmtune.adapters.qlora import quantize_linears
    from glmtune.adapters.trainable import component_of

    names = [n for n, m in model.named_modules()
             if type(m) is torch.nn.Linear and n != family.output_layer
             and component_of(n + ".weight", family.components) == "language"
             and not any(n == k or n.startswith(k + ".") or n.endswith("." + k) for k in keep)
             and (bits == 8 or m.in_features % QUANT_BLOCK == 0)]
    if bits == 4:
        quantize_linears(model, names, next(model.parameters()).dtype)
        return names
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                  has_fp16_weights=False, threshold=6.0)
        new.weight = bnb.nn.Int8Params(old.weight.data.contiguous(), requires_grad=False, has_fp16_weights=False)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
        setattr(parent, child, new.to(old.weight.device))  # .to quantizes
    return names


def load_for_inference(model_path: str | Path, adapter: str | Path | None = None, dtype=torch.float32,
                       quant: int | None = None):
    """(family, model, processor) for a model folder or a training checkpoint, with an optional adapter;
    `quant` 4 or 8 loads the language model's linears quantized (bitsandbytes) before the adapter goes on."""
    from glmtune.adapters import load_trained
    from glmtune.checkpoint import check_adapter_fits, checkpoint_recipe

    model_path = Path(model_path)
    if (model_path / "recipe.yaml").is_file():  # a training checkpoint: base + its own adapter
        if adapter is not None:
            raise RecipeError(f"{model_path} is a training checkpoint; pass its base model with --adapter instead")
        adapter, recipe = model_path, checkpoint_recipe(model_path)
        model_path, family_name = Path(recipe.model.path), recipe.model.family
    else:
        family_name = detect_family(model_path)
    family = get_family(family_name)
    if adapter is not None:  # before loading the weights: a meta-device build has the shapes
        check_adapter_fits(adapter, family_name, model_path, family.build_model(model_path, meta=True))
    model = family.load_model(model_path, dtype)
    if quant is not None:
        if quant not in (4, 8):
            raise RecipeError(f"--quant {quant}: choose 4 or 8")
        if adapter is not None and (Path(adapter) / "quantization.json").is_file():
            raise CheckpointError(f"--quant {quant}: {adapter} is a QLoRA checkpoint, its base is NF4 already; "
                                  f"drop --quant")
        quantize_for_inference(model, family, quant, adapter_owned_linears(Path(adapter) if adapter else None))
    if adapter is not None:
        model = load_trained(model, Path(adapter), family)
    return family, model.eval(), family.load_processor(model_path)


def generate(family, model, processor, conversations: list[tuple[list[Turn], list]], max_new_tokens: int = 64,
             options: GenerationOptions | None = None) -> list[str]:
    """Answers for a batch of (turns ending with a user turn, PIL images); greedy unless `options` say otherwise."""
    return generate_text(family, model, processor, conversations, options or GenerationOptions(max_new_tokens))


def set_english(family, processor, english: bool) -> None:
    """`--english`: VisualGLM-6B's English prompt (`Q:{q}\\nA:`) whatever the question's language, as the seed's
    cli_demo.py --english (without it, glmtune picks the prompt language from the question)."""
    if not english:
        return
    if not hasattr(processor, "language") or getattr(processor.cfg, "eva_config", None) is None:
        raise RecipeError(f"--english: only VisualGLM-6B has an English prompt variant, not the {family.name} family")
    processor.language = "en"


def chat(model_path, image=None, prompt=None, adapter=None, max_new_tokens: int = 256, input_fn=input, print_fn=print,
         options: GenerationOptions | None = None, quant: int | None = None, english: bool = False, stream_fn=None):
    """One answer for `prompt` (printed, returned) or, without it, an interactive session. With `stream_fn`,
    answers are handed to it piece by piece as they are generated instead of printed whole."""
    from glmtune.data.images import load_image

    options = options or GenerationOptions(max_new_tokens)
    family, model, processor = load_for_inference(model_path, adapter, quant=quant)
    set_english(family, processor, english)
    images = [load_image(Path(image), str(image))] if image else []

    def answer(history: list[Turn], question: str) -> str:
        first = not any(t.role == "user" for t in history)
        text = (IMAGE_PLACEHOLDER if images and first else "") + question
        turns = history + [Turn("user", text)]
        if stream_fn is None:
            reply = generate_text(family, model, processor, [(turns, images)], options)[0]
        else:
            pieces = []
            for piece in stream_text(family, model, processor, (turns, images), options):
                stream_fn(piece)
                pieces.append(piece)
            stream_fn("\n")
            reply = "".join(pieces)
        history.extend([turns[-1], Turn("assistant", reply)])
        return reply

    if prompt is not None:
        reply = answer([], prompt)
        if stream_fn is None:
            print_fn(reply)
        return reply
    print_fn("glmtune chat: type a question; `clear` resets the history, `stop` (or Ctrl-D) quits.")
    history: list[Turn] = []
    while True:
        try:
            query = input_fn("\nUser: ").strip()
        except EOFError:
            break
        if query == "stop":
            break
        if query == "clear":
            history.clear()
            print_fn("(history cleared)")
            continue
        if not query:
            continue
        if stream_fn is None:
            print_fn(f"\nGLM: {answer(history, query)}")
        else:
            stream_fn("\nGLM: ")
            answer(history, query)
    return None
