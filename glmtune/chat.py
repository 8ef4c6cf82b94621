"""Conversation with a (tuned) model: one-shot or interactive, as the upstream cli_demo.

`glmtune chat MODEL [--adapter CKPT] --image FILE [--prompt TEXT]`. MODEL is a checkpoint folder in the
official layout (e.g. a merged model) or a glmtune training checkpoint (then its base and adapter are used).
"""

from __future__ import annotations

from pathlib import Path

import torch

from glmtune.config import RecipeError
from glmtune.data.sample import IMAGE_PLACEHOLDER, Turn
from glmtune.models import detect_family, get_family


def load_for_inference(model_path: str | Path, adapter: str | Path | None = None, dtype=torch.float32):
    """(family, model, processor) for a model folder or a training checkpoint, with an optional adapter."""
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
    if adapter is not None:
        model = load_trained(model, Path(adapter), family)
    return family, model.eval(), family.load_processor(model_path)


@torch.no_grad()
def generate(family, model, processor, conversations: list[tuple[list[Turn], list]],
             max_new_tokens: int = 64) -> list[str]:
    """Greedy answers for a batch of (turns ending with a user turn, PIL images)."""
    items = [processor.encode(turns, images, generation=True) for turns, images in conversations]
    batch = processor.collate(items, pad_left=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    eos = family.generation_eos(model.get_base_model() if hasattr(model, "get_base_model") else model)
    new = family.generate(model, batch, max_new_tokens, eos, processor.pad_id)
    return [processor.decode([t for t in row.tolist() if t not in eos]).strip() for row in new]


def chat(model_path, image=None, prompt=None, adapter=None, max_new_tokens: int = 256, input_fn=input, print_fn=print):
    from glmtune.data.images import load_image

    family, model, processor = load_for_inference(model_path, adapter)
    images = [load_image(Path(image), str(image))] if image else []

    def answer(history: list[Turn], question: str) -> str:
        first = not any(t.role == "user" for t in history)
        text = (IMAGE_PLACEHOLDER if images and first else "") + question
        turns = history + [Turn("user", text)]
        reply = generate(family, model, processor, [(turns, images)], max_new_tokens)[0]
        history.extend([turns[-1], Turn("assistant", reply)])
        return reply

    if prompt is not None:
        reply = answer([], prompt)
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
        if query:
            print_fn(f"\nGLM: {answer(history, query)}")
    return None

