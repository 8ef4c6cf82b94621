"""The four questions of the `memorised_glm4` fixture (tests/conftest.py), importable by the tests that check
the answers (a plain module: `conftest` may name tests/models/conftest.py once that is imported)."""

from __future__ import annotations

import json
from pathlib import Path

# four questions whose answers only memory gives (one in Chinese)
QA = [("What colour is the sky?", "blue"), ("What colour is grass?", "green"), ("天空是什么颜色？", "蓝色"),
      ("How many legs has a cat?", "four")]


def write_jsonl(path: Path, pairs) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for q, a in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                               ensure_ascii=False) + "\n")
    return path
