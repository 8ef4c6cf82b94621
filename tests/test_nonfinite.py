"""train.on_nonfinite: an inf/nan loss or gradient norm stops the run (error) or drops that update (skip_step), and
nothing non-finite is ever written to a checkpoint. On the tiny GLM-4-9B-Chat, a few steps each."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmtune.checkpoint import checkpoint_problem, save_checkpoint
from glmtune.config import CheckpointError, RecipeError, load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "glm4" / "lora.yaml"


def overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data.train={data / 'train.jsonl'}", "model.dtype=float32",
            "train.mixed_precision=no", "model.gradient_checkpointing=false", "data.max_length=64",
            "train.batch_size=2", "train.grad_accum=1", "data.num_workers=0", "log.progress_bar=false",
            "log.report_to=[jsonl]", "adapter.dropout=0.0", "train.lr=1e-3", "train.resume=never",
            f"train.output_dir={out}", *extra]


def recipe_for(model: Path, data: Path, out: Path, *extra: str):
    return load_recipe(RECIPE, overrides(model, data, out, *extra))


def test_a_diverging_run_stops_naming_the_step_and_the_last_good_checkpoint(tiny_glm4, text_data, tmp_path, capfd):
    """lr=1e30 really diverges: the first updates are finite but huge, a later forward overflows to nan.
    Through the CLI in-process: one line, exit code 2."""
    from glmtune.cli import main

    out = tmp_path / "run"
    capfd.readouterr()
    assert main(["train", str(RECIPE), *overrides(tiny_glm4, text_data, out, "train.lr=1e30", "train.max_steps=8",
                                                  "train.save_every=1", "train.keep_last=8")]) == 2
    err = capfd.readouterr().err
    (message,) = [x for x in err.splitlines() if x.startswith("glmtune train: error:")]
    step = int(re.search(r"error: step (\d+): non-finite loss", message).group(1))
    assert step >= 2 and "Traceback" not in err  # (step 3 on this machine)
    assert f"the last good checkpoint is {out / f'checkpoint-{step - 1}'};" in message
    written = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert written == list(range(1, step)) and not list(out.glob("*.tmp"))
    for n in written:
        ckpt = out / f"checkpoint-{n}"
        assert checkpoint_problem(ckpt) is None
        assert all(bool(torch.isfinite(t).all()) for t in load_file(str(ckpt / "adapter_model.safetensors")).values())
        moments = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"].values()
        assert all(bool(torch.isfinite(t).all()) for s in moments for t in s.values() if t.is_floating_point())


def test_skip_step_drops_the_update_and_counts_it(tiny_glm4, text_data, tmp_path, monkeypatch, capfd):
    """The loss of step 2 is made nan inside an in-process run (its gradients are nan too): that update is dropped,
    the others are not, and the summary and the checkpoints count it."""
    import glmtune.train
    from glmtune.train import train

    real, calls = glmtune.train.token_loss_sum, []

    def loss_nan_at_step_2(model, batch, *rest):
        loss, n = real(model, batch, *rest)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), n

    monkeypatch.setattr(glmtune.train, "token_loss_sum", loss_nan_at_step_2)
    out = tmp_path / "run"
    summary = train(recipe_for(tiny_glm4, text_data, out, "train.on_nonfinite=skip_step", "train.max_steps=3",
                               "train.save_every=1", "train.keep_last=3"))
    assert summary["nonfinite_skipped_steps"] == 1 and summary["nonfinite_steps"] == [2]
    assert "step 2: non-finite loss nan" in capfd.readouterr().err
    adapters = [load_file(str(out / name / "adapter_model.safetensors"))
                for name in ("checkpoint-1", "checkpoint-2", "checkpoint-final")]
    for k in adapters[0]:
        assert torch.equal(adapters[0][k], adapters[1][k]), k  # step 2 changed nothing
        assert bool(torch.isfinite(adapters[2][k]).all())
    assert any(not torch.equal(adapters[1][k], adapters[2][k]) for k in adapters[0])  # step 3 did update
    steps = [s["step"] for s in torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"].values()]
    assert steps and all(float(s) == 1 for s in steps)
    assert json.loads((out / "checkpoint-final" / "trainer_state.json").read_text())["nonfinite_steps"] == [2]


def test_a_checkpoint_with_nonfinite_tensors_is_never_written(tmp_path):
    """The last guard, below the loop's check: save_checkpoint refuses inf/nan weights or optimizer state."""
    recipe = load_recipe(None, ["model.family=glm4", "model.path=unused", "data.train=unused.jsonl", "adapter.method=none",
                                "adapter.components.language=full"], check_files=False)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with torch.no_grad():
        model.weight[1, 2] = float("inf")
    with pytest.raises(CheckpointError, match="not written: weight holds inf/nan"):
        save_checkpoint(tmp_path / "checkpoint-1", model, optimizer, scheduler, recipe, {"step": 1}, None)
    assert not list(tmp_path.iterdir())
    with torch.no_grad():
        model.weight.zero_()
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    optimizer.state[model.bias]["exp_avg"][0] = float("nan")
    with pytest.raises(CheckpointError, match="optimizer state 'exp_avg'"):
        save_checkpoint(tmp_path / "checkpoint-1", model, optimizer, scheduler, recipe, {"step": 1}, None)
    assert not list(tmp_path.iterdir())


def test_skip_step_under_deepspeed_is_a_recipe_error():
    with pytest.raises(RecipeError, match="train.on_nonfinite.*DeepSpeed"):
        load_recipe(None, ["model.family=glm4", "model.path=unused", "data.train=unused.jsonl", "train.distributed=zero2",
                           "train.on_nonfinite=skip_step"], check_files=False)
    with pytest.raises(RecipeError, match="must be one of \\['error', 'skip_step'\\]"):
        load_recipe(None, ["model.family=glm4", "model.path=unused", "data.train=unused.jsonl",
                           "train.on_nonfinite=ignore"], check_files=False)

