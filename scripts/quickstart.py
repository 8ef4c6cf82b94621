"""The README quickstart, end to end on a CPU in a few minutes:

tiny GLM-4.1V in the official layout -> synthetic shapes data -> LoRA training -> eval -> merge -> chat.
Every step is the `glmtune` command a user would type; each is printed before it runs.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_shapes_data import blind_baseline_exact_match  # noqa: E402

RUNS = ROOT / "runs"
MODEL, DATA, OUT, MERGED = RUNS / "tiny-glm41v", RUNS / "shapes-data", RUNS / "quickstart", RUNS / "quickstart-merged"


def run(*cmd: str) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    glmtune = [sys.executable, "-m", "glmtune"]
    run(*glmtune, "make-tiny", "glm41v", str(MODEL))
    run(sys.executable, "scripts/make_shapes_data.py", str(DATA), "--train", "2000", "--val", "200", "--seed", "0")
    run(*glmtune, "check", "recipes/glm41v/quickstart.yaml")
    # resume=never: the quickstart always trains from scratch, even if runs/quickstart exists.
    run(*glmtune, "train", "recipes/glm41v/quickstart.yaml", "train.resume=never")
    run(*glmtune, "eval", str(OUT / "checkpoint-final"), "--data", str(DATA / "val.jsonl"))
    run(*glmtune, "merge", str(OUT / "checkpoint-final"), "--out", str(MERGED))
    first = json.loads((DATA / "val.jsonl").read_text().splitlines()[0])["messages"]
    image = DATA / first[0]["image"]
    run(*glmtune, "chat", str(MERGED), "--image", str(image), "--prompt", first[0]["content"])

    report = json.loads((OUT / "checkpoint-final" / "eval.json").read_text())
    blind = blind_baseline_exact_match(DATA / "train.jsonl", DATA / "val.jsonl")
    print(f"\nquestion about {image.name}: {first[0]['content']!r}, reference answer {first[1]['content']!r}")
    print(f"held-out exact match: {report['exact_match']:.3f} on {report['samples']} samples "
          f"(best possible without looking at the image: {blind:.3f})")
    print("where everything went:")
    for what, path in [("tiny base model", MODEL), ("data", DATA), ("training run (metrics.jsonl, "
                       "summary.json, loss_curve.png, checkpoints)", OUT), ("eval report", OUT / "checkpoint-final" /
                       "eval.json"), ("merged model (official layout)", MERGED)]:
        print(f"  {what}: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
