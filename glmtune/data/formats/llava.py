"""LLaVA instruction data (LLaVA-Instruct-150K, llava_v1_5_mix665k: a JSON array; .jsonl also read).

    {"id": "000000033471", "image": "coco/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

`image` is optional (text-only records), a path or a list of paths; the `<image>` markers in the
values say where each image goes, in order, and their count must equal the number of images.
Texts are kept verbatim, including the "\n" LLaVA puts after a leading `<image>`: the family
template decides what surrounds an image, and stripping here would make the two disagree.
`id` is ignored. "user"/"assistant" are accepted besides LLaVA's "human"/"gpt".
"""

from __future__ import annotations

from pathlib import Path

from glmtune.data.formats import parse_turns, resolve_image
from glmtune.data.sample import Sample, SampleError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def matches(record: dict) -> bool:
    # "images" (plural) is LLaMA-Factory ShareGPT with the same "conversations" list.
    return "conversations" in record and "images" not in record


def parse(record: dict, source: str, base_dir: Path) -> Sample:
    turns = parse_turns(record, "conversations", "from", "value", ROLES, source)
    image = record.get("image")
    if image is None:  # absent or null: text-only
        paths = []
    elif isinstance(image, str):
        paths = [resolve_image(image, base_dir, source, "image")]
    elif isinstance(image, list):
        paths = [resolve_image(p, base_dir, source, f"image[{i}]") for i, p in enumerate(image)]
    else:
        raise SampleError(source, f"field 'image' must be a path or a list of paths, got {type(image).__name__}")
    return Sample(turns=turns, images=paths, source=source)
