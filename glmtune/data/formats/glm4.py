"""GLM-4 finetune-demo messages (THUDM/GLM-4 finetune_demo, .jsonl, one conversation per line).

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "What is this?", "image": "images/cat.png"},
                  {"role": "assistant", "content": "A cat."}]}

An image belongs to a user message and goes before that message's text, as the GLM-4V chat
template puts `<|begin_of_image|>...<|end_of_image|>` before the content. Tool use (`tools` in
the system message, `observation`/`tool` roles) is not supported and says so.
"""

from __future__ import annotations

from pathlib import Path

from glmtune.data.formats import parse_turns, resolve_image
from glmtune.data.sample import IMAGE_PLACEHOLDER, Sample, SampleError

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def matches(record: dict) -> bool:
    # "images" (plural, top level) means LLaMA-Factory ShareGPT, which also uses "messages".
    return "messages" in record and "images" not in record


def parse(record: dict, source: str, base_dir: Path) -> Sample:
    turns = parse_turns(record, "messages", "role", "content", ROLES, source)
    images = []
    for i, (message, turn) in enumerate(zip(record["messages"], turns)):
        where = f"messages[{i}]."
        if message.get("tools"):
            raise SampleError(source, f"field '{where}tools': tool definitions are not supported")
        if IMAGE_PLACEHOLDER in turn.text:
            # In this format images come only from the "image" field; a literal marker in the text
            # would silently pair with the wrong image.
            raise SampleError(
                source, f"field '{where}content' contains {IMAGE_PLACEHOLDER}; glm4 data gives images in 'image'"
            )
        image = message.get("image")
        if image is None:  # absent or null: a text-only message
            continue
        if turn.role != "user":
            raise SampleError(source, f"field '{where}image': only user messages may have an image, not {turn.role}")
        images.append(resolve_image(image, base_dir, source, where + "image"))
        turn.text = IMAGE_PLACEHOLDER + turn.text
    return Sample(turns=turns, images=images, source=source)
