"""glmtune.logging: JSONL (continued on resume), tensorboard, wandb offline, loss curve, summary."""

from __future__ import annotations

import json

import pytest

from glmtune.logging import MetricsLogger, write_summary


def test_jsonl_appends_across_runs_and_plots_whole_curve(tmp_path):
    first = MetricsLogger(tmp_path, ["jsonl"], "run", {})
    for step in (1, 2, 3):  # killed after step 3, its last checkpoint at step 2
        first.log(step, {"loss": 3.0 - step})
    first.close()
    second = MetricsLogger(tmp_path, ["jsonl"], "run", {}, start_step=2)  # resumed from checkpoint-2
    second.log(3, {"loss": 0.5})
    second.log(3, {"loss": 0.7}, split="eval")
    second.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r["loss"]) for r in rows] == [
        (1, "train", 2.0), (2, "train", 1.0), (3, "train", 0.5), (3, "eval", 0.7)]
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    MetricsLogger(tmp_path, ["jsonl"], "run", {}).close()  # a fresh run (start_step 0) in the same folder
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_holds_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, ["tensorboard"], "run", {})
    logger.log(1, {"loss": 2.5, "lr": 0.1})
    logger.log(2, {"loss": 1.5, "lr": 0.05})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 1.5)]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = MetricsLogger(tmp_path, ["wandb"], "glmtune-test", {"train": {"lr": 0.1}})
    logger.log(1, {"loss": 2.0})
    logger.log(2, {"loss": 1.0})
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and list(runs[0].glob("*.wandb"))[0].stat().st_size > 0


def test_disabled_logger_writes_nothing_and_unknown_target_is_an_error(tmp_path):
    logger = MetricsLogger(tmp_path / "out", ["jsonl", "tensorboard"], "run", {}, enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="'mlflow'.*jsonl"):
        MetricsLogger(tmp_path, ["mlflow"], "run", {})


def test_summary_is_written_atomically(tmp_path):
    path = write_summary(tmp_path, {"steps": 3, "skipped": [{"source": "a.jsonl:2", "reason": "x"}]})
    assert json.loads(path.read_text())["skipped"][0]["source"] == "a.jsonl:2"
    assert not list(tmp_path.glob("*.tmp"))


# --- beyond the basics: crash-truncated files, curves without jsonl, wandb history, errors -------------------------


def _is_png(path):
    from PIL import Image

    with Image.open(path) as img:
        img.verify()  # raises on a damaged file
        return img.format == "PNG"


def test_resume_after_a_crash_mid_line(tmp_path):
    # A run killed while writing leaves a cut-off last line without newline; the resumed run must neither crash
    # in close() nor glue its first line onto the broken one.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0, "time": 1}\n{"step": 2, "sp')
    logger = MetricsLogger(tmp_path, ["jsonl"], "run", {}, start_step=1)
    logger.log(2, {"loss": 1.5})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [2.0, 1.5]
    assert _is_png(tmp_path / "loss_curve.png")


def test_curve_without_jsonl_and_resumed_steps_keep_the_later_value(tmp_path):
    from glmtune.logging import _loss_series

    logger = MetricsLogger(tmp_path, ["tensorboard"], "run", {})
    logger.log(1, {"loss": 2.0})
    logger.close()
    assert _is_png(tmp_path / "loss_curve.png")
    rows = [{"step": 5, "split": "train", "loss": 1.0}, {"step": 4, "split": "train", "loss": 1.2},
            {"step": 5, "split": "train", "loss": 0.9}, {"step": 5, "split": "eval", "loss": 1.1, "time": 0}]
    assert _loss_series(rows) == {"train": ([4, 5], [1.2, 0.9]), "eval": ([5], [1.1])}


def test_no_png_without_a_loss(tmp_path):
    logger = MetricsLogger(tmp_path, ["jsonl"], "run", {})
    logger.log(1, {"lr": 0.1})
    logger.close()
    logger.close()  # a second close is harmless
    assert not (tmp_path / "loss_curve.png").exists()
    MetricsLogger(tmp_path / "empty", ["jsonl"], "run", {}).close()
    assert not (tmp_path / "empty" / "loss_curve.png").exists()


def test_tensor_values_reserved_names_and_log_after_close(tmp_path):
    import torch

    logger = MetricsLogger(tmp_path, ["jsonl", "tensorboard"], "run", {})
    logger.log(1, {"loss": torch.tensor(2.5), "grad_norm": torch.tensor(1.0, dtype=torch.float64)})
    with pytest.raises(ValueError, match="reserved"):
        logger.log(2, {"step": 3.0})
    logger.close()
    with pytest.raises(RuntimeError, match="after close"):
        logger.log(3, {"loss": 1.0})
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["loss"] == 2.5 and row["grad_norm"] == 1.0


def test_wandb_offline_history_has_train_and_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = MetricsLogger(tmp_path / "out", ["wandb"], "glmtune-test", {"lr": 0.1})
    logger.log(1, {"loss": 2.25})
    logger.log(1, {"loss": 2.75}, split="eval")  # same step as the train row, logged after it
    logger.close()
    (run,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    (record,) = run.glob("run-*.wandb")
    data = record.read_bytes()  # protobuf records; history keys and JSON-encoded values appear verbatim
    for needle in (b"train/loss", b"eval/loss", b"global_step", b"2.25", b"2.75", b"glmtune-test"):
        assert needle in data, needle


def test_missing_wandb_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path, ["wandb"], "run", {})


def test_unknown_target_is_an_error_on_disabled_ranks_too(tmp_path):
    with pytest.raises(ValueError, match="'tensorbord'.*tensorboard"):
        MetricsLogger(tmp_path, ["jsonl", "tensorbord"], "run", {}, enabled=False)


def test_summary_creates_the_folder_and_writes_paths_as_text(tmp_path):
    path = write_summary(tmp_path / "new", {"output_dir": tmp_path, "steps": 1})
    assert json.loads(path.read_text())["output_dir"] == str(tmp_path)
