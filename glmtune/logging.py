"""Metrics: JSONL file, wandb, tensorboard, a loss-curve PNG, and the run summary.

Only the main process logs (`enabled=False` elsewhere makes every method a no-op). metrics.jsonl is
appended to, so a resumed run continues the same file and the loss curve covers the whole run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

REPORT_TO = ("jsonl", "wandb", "tensorboard")


class MetricsLogger:
    def __init__(self, output_dir, report_to: list[str], run_name: str, config: dict, enabled: bool = True):
        unknown = [r for r in report_to if r not in REPORT_TO]
        if unknown:
            raise ValueError(f"log.report_to: unknown {unknown[0]!r}; choose from {list(REPORT_TO)}")
        self.enabled = enabled
        self.out = Path(output_dir)
        self.jsonl = self.wandb = self.tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if "jsonl" in report_to:
            self.jsonl = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ImportError("log.report_to has wandb but the package is missing: pip install wandb") from None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "glmtune"), name=run_name,
                                    config=config, dir=str(self.out))
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "split": split, **metrics, "time": time.time()}) + "\n")
            self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.close()
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(metrics_jsonl: Path, png: Path) -> Path | None:
    """Train (and eval) loss against step from metrics.jsonl; the last value per step wins (resumed runs)."""
    curves: dict[str, dict[int, float]] = {}
    for line in metrics_jsonl.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            curves.setdefault(row["split"], {})[row["step"]] = row["loss"]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for split, points in sorted(curves.items()):
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], marker="o" if split != "train" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def write_summary(output_dir, summary: dict) -> Path:
    """OUTPUT/summary.json, written atomically."""
    path = Path(output_dir) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    os.replace(tmp, path)
    return path
