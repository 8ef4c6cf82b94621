"""ShareGPT multimodal data as LLaMA-Factory reads it (data/mllm_demo.json and the like).

    {"messages": [{"role": "user", "content": "<image>What is this?"},
                  {"role": "assistant", "content": "A cat."}],
     "images": ["images/cat.png"]}

or with LLaMA-Factory's default ShareGPT tags:

    {"conversations": [{"from": "human", "value": "<image>What is this?"},
                       {"from": "gpt", "value": "A cat."}],
     "images": ["images/cat.png"], "system": "optional system prompt"}

The top-level `images` list (plural) tells it from glm4/llava. Each `<image>` marker takes the next
image; markers and images must be equally many (as current LLaMA-Factory requires). An optional
top-level `system` string becomes the system turn. Videos, audios and tools are not supported.
"""

from __future__ import annotations

from pathlib import Path

from glmtune.data.formats import parse_turns, require, resolve_image
from glmtune.data.sample import Sample, SampleError, Turn

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def matches(record: dict) -> bool:
    return "images" in record


def parse(record: dict, source: str, base_dir: Path) -> Sample:
    for key in ("videos", "audios", "tools"):
        if record.get(key):
            raise SampleError(source, f"field {key!r} is not supported")
    if "messages" in record and "conversations" in record:
        raise SampleError(source, "both 'messages' and 'conversations' given; expected one of them")
    if "conversations" in record:
        turns = parse_turns(record, "conversations", "from", "value", ROLES, source)
    else:  # also the "missing field 'messages'" error when neither is there
        turns = parse_turns(record, "messages", "role", "content", ROLES, source)
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise SampleError(source, f"field 'system' must be a string, got {type(system).__name__}")
        if turns and turns[0].role == "system":
            raise SampleError(source, "a system prompt is given both in 'system' and as the first message")
        if system:  # LLaMA-Factory writes "" for "no system prompt"
            turns.insert(0, Turn("system", system))
    images = require(record, "images", list, source)
    paths = [resolve_image(p, base_dir, source, f"images[{i}]") for i, p in enumerate(images)]
    return Sample(turns=turns, images=paths, source=source)
