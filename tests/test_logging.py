"""glmtune.logging: JSONL (append on resume), tensorboard, wandb offline, loss curve, summary."""

from __future__ import annotations

import json

import pytest

from glmtune.logging import MetricsLogger, write_summary


def test_jsonl_appends_across_runs_and_plots_whole_curve(tmp_path):
    first = MetricsLogger(tmp_path, ["jsonl"], "run", {})
    for step in (1, 2):
        first.log(step, {"loss": 3.0 - step})
    first.close()
    second = MetricsLogger(tmp_path, ["jsonl"], "run", {})  # a resumed run
    second.log(3, {"loss": 0.5})
    second.log(3, {"loss": 0.7}, split="eval")
    second.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r["loss"]) for r in rows] == [
        (1, "train", 2.0), (2, "train", 1.0), (3, "train", 0.5), (3, "eval", 0.7)]
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
