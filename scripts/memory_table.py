"""Print the README's memory table: glmtune check --memory for the full-size configs in tests/reference/.

    python scripts/memory_table.py [--gpus 8] [--max-length 2048] [--batch 1]

Each family's recipes/<family>/lora.yaml (and the same with adapter.method=qlora), bf16, at the given length and
batch, with and without gradient checkpointing; per-GPU GiB of the total for every engine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glmtune.config import load_recipe
from glmtune.memory import ENGINES, GIB, memory_table

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"glm4v": "glm-4v-9b", "glm4": "glm-4-9b-chat", "glm41v": "GLM-4.1V-9B-Thinking",
          "visualglm": "visualglm-6b", "chatglm": "chatglm-6b"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    print(f"| model | method | grad. ckpt | weights | {' | '.join(ENGINES)} |")
    print("|---|---|---|---|" + "---|" * len(ENGINES))
    for family, folder in MODELS.items():
        for method in ("lora", "qlora"):
            for ckpt in (True, False):
                recipe = load_recipe(ROOT / "recipes" / family / "lora.yaml", [
                    f"model.path={ROOT / 'tests' / 'reference' / folder}", "data.train=unused.jsonl",
                    f"adapter.method={method}", f"model.gradient_checkpointing={ckpt}", "model.dtype=bfloat16",
                    f"data.max_length={args.max_length}", f"train.batch_size={args.batch}"], check_files=False)
                report = memory_table(recipe, args.gpus)
                rows = report["engines"]
                cells = [f"{rows[e]['total'] / GIB:.1f}" if e in rows else "n/a" for e in ENGINES]
                weights = rows["single"]["weights"] / GIB
                print(f"| {folder} | {method} | {'yes' if ckpt else 'no'} | {weights:.1f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
