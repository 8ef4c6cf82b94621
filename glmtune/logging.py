"""Metrics logging for training runs: JSONL file, wandb, tensorboard, loss-curve PNG and run summary.

`MetricsLogger` is created once per run, on every rank; only the main rank passes enabled=True, so callers never
branch on the rank themselves. The JSONL file is the record of truth: it is appended to (a resumed run continues
it) and the loss curve is drawn from it, so a resumed run's PNG shows the whole run, not only its last part.

This module is `glmtune.logging`; it needs nothing from the standard `logging` module, so it does not import it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

VALID_REPORT_TO = ("jsonl", "wandb", "tensorboard")
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "summary.json"
# Keys every JSONL line carries; a metric with one of these names would silently overwrite them.
_RESERVED = ("step", "split", "time")


def _scalar(value):
    """A plain Python number from a float, int, numpy or 0-d torch value (JSON and tensorboard need one)."""
    if hasattr(value, "item"):  # torch / numpy scalars, without importing either here
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    raise TypeError(f"metric values must be numbers, got {type(value).__name__}: {value!r}")


def _read_jsonl(path: Path) -> list[dict]:
    """Parsed lines of an earlier metrics.jsonl; a line cut short by a crash is skipped, not fatal."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


class MetricsLogger:
    """Send each `log(step, metrics, split)` to the backends named in `report_to`."""

    def __init__(self, output_dir, report_to: list[str], run_name: str, config: dict, enabled: bool = True,
                 start_step: int = 0):
        """`start_step`: the step this run starts from (a resumed checkpoint's, else 0). Rows of an earlier
        metrics.jsonl after it (a killed run went on past its last checkpoint, or an old run in the same
        folder) are dropped, so the file and the loss curve describe the run that produced the weights."""
        if isinstance(report_to, str):  # "wandb" instead of ["wandb"] would otherwise be read letter by letter
            report_to = [report_to]
        # Validate on every rank, so a typo fails the same way everywhere and not only on rank 0.
        for item in report_to:
            if item not in VALID_REPORT_TO:
                raise ValueError(f"unknown report_to item {item!r}; valid items are {', '.join(VALID_REPORT_TO)}")
        self.output_dir = Path(output_dir)
        self.report_to = list(dict.fromkeys(report_to))
        self.run_name = run_name
        self.enabled = enabled
        self._closed = False
        self._jsonl = None
        self._wandb_run = None
        self._tb_writer = None
        self._earlier: list[dict] = []  # rows of metrics.jsonl written before this process started
        self._history: list[dict] = []  # rows logged by this process
        if not enabled:
            return

        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.output_dir / METRICS_FILE
        self._earlier = [row for row in _read_jsonl(metrics_path) if row.get("step", 0) <= start_step]
        if "jsonl" in self.report_to:
            with open(metrics_path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in self._earlier)
            self._jsonl = open(metrics_path, "a", encoding="utf-8")
        if "wandb" in self.report_to:
            self._wandb_run = self._init_wandb(config)
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard, slow to import

            self._tb_writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    def _init_wandb(self, config: dict):
        try:
            import wandb  # lazy: only runs that ask for wandb need it installed
        except ImportError as err:
            raise ImportError("report_to includes 'wandb' but the wandb package is not installed: "
                              "pip install wandb (or remove 'wandb' from report_to)") from err
        # Mode (online/offline/disabled), entity and API key come from wandb's own environment variables.
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "glmtune"), name=self.run_name, config=config,
                         dir=str(self.output_dir))
        # Plot everything against our optimizer step, not wandb's internal call counter: train and eval rows of
        # the same step then line up, and a resumed run's steps do not have to exceed wandb's counter.
        run.define_metric("global_step")
        run.define_metric("*", step_metric="global_step")
        return run

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log() called after close()")
        clash = [k for k in metrics if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the JSONL line itself; rename them")
        step = int(step)
        values = {k: _scalar(v) for k, v in metrics.items()}
        row = {"step": step, "split": split, **values, "time": time.time()}
        self._history.append(row)
        if self._jsonl is not None:
            # Flush each line: after a crash the file holds everything up to the last step, which resume relies on.
            # NaN/inf are written as JSON's NaN/Infinity extension (Python reads them back); a diverged loss is
            # exactly what the file must show.
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({"global_step": step, **{f"{split}/{k}": v for k, v in values.items()}})
        if self._tb_writer is not None:
            for k, v in values.items():
                self._tb_writer.add_scalar(f"{split}/{k}", v, global_step=step)

    def close(self) -> None:
        """Flush and finish every backend, then draw OUTPUT/loss_curve.png. Safe to call twice."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb_writer is not None:
            self._tb_writer.flush()
            self._tb_writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        plot_loss_curve(self._earlier + self._history, self.output_dir / LOSS_CURVE_FILE)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _loss_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{split: (steps, losses)} sorted by step; a step logged again (a resumed run redoing steps after its last
    checkpoint) keeps the later value, which is the one the final model descends from."""
    by_split: dict[str, dict[int, float]] = {}
    for row in rows:
        loss = row.get("loss")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            by_split.setdefault(row.get("split", "train"), {})[int(row["step"])] = float(loss)
    return {split: (sorted(points), [points[s] for s in sorted(points)]) for split, points in by_split.items()}


def plot_loss_curve(rows: list[dict], path) -> Path | None:
    """Loss vs step for every split that logged a `loss` (train first); None and no file if there is none."""
    series = _loss_series(rows)
    if not series:
        return None
    # The Figure API with the Agg canvas draws without pyplot, so the caller's matplotlib backend and global
    # figure state are left alone (and no display is needed).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for split in sorted(series, key=lambda s: (s != "train", s)):
        steps, losses = series[split]
        # Evaluations are sparse: markers keep a handful of points readable.
        marker = None if split == "train" and len(steps) > 20 else "o"
        ax.plot(steps, losses, marker=marker, markersize=4, linewidth=1.2, label=f"{split} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    finite = [v for _, losses in series.values() for v in losses if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        ax.set_yscale("log")  # losses spanning orders of magnitude are unreadable on a linear axis
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")  # keeps the suffix, which savefig uses to pick the format
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def write_summary(output_dir, summary: dict) -> Path:
    """Write OUTPUT/summary.json (pretty JSON) atomically: a reader never sees a half-written file."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    # default=str: paths, dtypes and similar values in a summary are written as text rather than failing the run.
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
