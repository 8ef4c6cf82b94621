"""Checkpoints you can trust: the sha256 manifest and what resume does with an incomplete or corrupt checkpoint,
a full disk while saving, adapters given to a model of another base (chat, eval, merge, train.resume).
All on the tiny GLM-4-9B-Chat (text only, the cheapest family): one shared 6-step run, a few short ones."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmtune.checkpoint import MANIFEST, checkpoint_problem, find_resume, write_manifest
from glmtune.config import CheckpointError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "glm4" / "lora.yaml"


def recipe_for(model: Path, data: Path, out: Path, *extra: str):
    return load_recipe(RECIPE, [
        f"model.path={model}", f"data.train={data / 'train.jsonl'}", "model.dtype=float32",
        "train.mixed_precision=no", "model.gradient_checkpointing=false", "data.max_length=64", "train.batch_size=2",
        "train.grad_accum=1", "data.num_workers=0", "log.progress_bar=false", "log.report_to=[jsonl]",
        "adapter.dropout=0.0", "train.lr=1e-3", "train.resume=never", f"train.output_dir={out}", *extra])


@pytest.fixture(scope="module")
def run(tiny_glm4, text_data, tmp_path_factory) -> Path:
    """6 steps with checkpoints at 2 and 4 (and final)."""
    from glmtune.train import train

    out = tmp_path_factory.mktemp("integrity") / "run"
    train(recipe_for(tiny_glm4, text_data, out, "train.max_steps=6", "train.save_every=2", "train.keep_last=3"))
    return out


def test_the_manifest_lists_every_file(run):
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-final"):
        ckpt = run / name
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST}
        assert set(files) == on_disk and {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= on_disk
        assert checkpoint_problem(ckpt) is None
    assert not list(run.glob("*.tmp"))


def test_a_truncated_or_corrupt_checkpoint_is_refused_and_auto_resumes_from_the_last_complete_one(
        run, tiny_glm4, text_data, tmp_path, capfd):
    from glmtune.train import train

    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoint-final")  # as if killed after step 6, before its final save
    adapter = out / "checkpoint-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])

    def resume(mode: str):
        return find_resume(recipe_for(tiny_glm4, text_data, out, f"train.resume={mode}"))

    with pytest.raises(CheckpointError) as e:
        resume(str(out / "checkpoint-4"))
    assert f"{adapter}: truncated" in str(e.value) and "\n" not in str(e.value)
    capfd.readouterr()
    assert resume("auto") == out / "checkpoint-2"
    said = capfd.readouterr().err.strip().splitlines()
    assert len(said) == 1 and f"{adapter}: truncated" in said[0] and f"resuming from {out / 'checkpoint-2'}" in said[0]

    # a flipped byte (same size) in the optimizer state, a file added after the save, no manifest at all
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    saved = optimizer.read_bytes()
    optimizer.write_bytes(saved[:100] + bytes([saved[100] ^ 1]) + saved[101:])
    with pytest.raises(CheckpointError, match=re.escape(f"{optimizer}: corrupt or modified")):
        resume(str(out / "checkpoint-2"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resume("auto")
    optimizer.write_bytes(saved)
    extra = out / "checkpoint-2" / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    extra.parent.mkdir(parents=True)
    extra.write_bytes(b"not written by glmtune")
    assert "not in the checkpoint's manifest.json" in checkpoint_problem(out / "checkpoint-2")
    shutil.rmtree(extra.parent.parent)
    shutil.move(out / "checkpoint-2" / MANIFEST, tmp_path / MANIFEST)
    assert "no manifest.json" in checkpoint_problem(out / "checkpoint-2")
    shutil.move(tmp_path / MANIFEST, out / "checkpoint-2" / MANIFEST)

    # and the run itself: auto takes checkpoint-2 and reproduces the uninterrupted run's final adapter
    summary = train(recipe_for(tiny_glm4, text_data, out, "train.max_steps=6", "train.save_every=2",
                               "train.keep_last=3", "train.resume=auto"))
    assert summary["resumed_from"] == str(out / "checkpoint-2")
    a, b = load_file(str(run / "checkpoint-final" / "adapter_model.safetensors")), load_file(str(
        out / "checkpoint-final" / "adapter_model.safetensors"))
    for k in a:
        # one process on one machine: the same float operations in the same order, so bit for bit (as
        # tests/test_train_e2e.py's resume; measured difference 0)
        assert torch.equal(a[k], b[k]), k
    assert checkpoint_problem(out / "checkpoint-4") is None  # rewritten whole


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_glm4, text_data, tmp_path, monkeypatch):
    """A patched writer (torch.save as glmtune's checkpoint module calls it) runs out of space in the middle of
    checkpoint-4, after the adapter was written: as ENOSPC from a full disk would."""
    import glmtune.checkpoint
    from glmtune.train import train

    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "checkpoint-4.tmp" in str(path):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(glmtune.checkpoint.torch, "save", save)
    out = tmp_path / "run"
    recipe = recipe_for(tiny_glm4, text_data, out, "train.max_steps=6", "train.save_every=2")
    with pytest.raises(CheckpointError) as e:
        train(recipe)
    message = str(e.value)
    assert "\n" not in message and f"{out / 'checkpoint-4'}: disk full" in message
    assert f"previous checkpoint {out / 'checkpoint-2'} is intact" in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # no partial folder left
    assert checkpoint_problem(out / "checkpoint-2") is None
    assert find_resume(recipe_for(tiny_glm4, text_data, out, "train.resume=auto")) == out / "checkpoint-2"


def test_an_adapter_of_another_base_is_a_clear_error(run, tiny_glm4, tiny_glm4v, text_data, tmp_path):
    from glmtune.chat import chat
    from glmtune.evaluate import evaluate
    from glmtune.merge import merge
    from glmtune.train import train

    ckpt = run / "checkpoint-final"
    # same family, other shapes: a config.json is all the check reads (it builds the model on the meta device)
    wide = tmp_path / "wide-glm4"
    wide.mkdir()
    config = json.loads((tiny_glm4 / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "hidden_size": 128, "num_attention_heads": 8}))
    trained_on = f"trained on glm4 ({tiny_glm4})"
    with pytest.raises(CheckpointError) as e:
        chat(wide, adapter=ckpt, prompt="hi", print_fn=lambda s: None)
    assert trained_on in str(e.value) and f"applied to glm4 ({wide})" in str(e.value)
    assert "query_key_value.lora_A.weight has shape [8, 64]" in str(e.value) and "[192, 128]" in str(e.value)

    # another family: eval and chat
    other_family = re.escape(f"applied to glm4v ({tiny_glm4v}): another model family")
    with pytest.raises(CheckpointError, match=other_family):
        evaluate(tiny_glm4v, text_data / "val.jsonl", adapter=ckpt, out=tmp_path / "eval.json")
    with pytest.raises(CheckpointError, match=re.escape(trained_on)):
        chat(tiny_glm4v, adapter=ckpt, prompt="hi", print_fn=lambda s: None)

    # merge: the checkpoint's recipe names a base that is another model now (its manifest rewritten to match)
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    (moved / "recipe.yaml").write_text((moved / "recipe.yaml").read_text().replace(str(tiny_glm4), str(wide)))
    write_manifest(moved)
    with pytest.raises(CheckpointError, match=re.escape(f"applied to glm4 ({wide}): ") + ".*lora_A.weight has shape"):
        merge(moved, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    # train.resume: a GLM-4V run given the GLM-4 checkpoint stops before its first step
    out = tmp_path / "glm4v-run"
    with pytest.raises(CheckpointError, match=other_family):
        train(load_recipe(ROOT / "recipes" / "glm4v" / "lora.yaml", [
            f"model.path={tiny_glm4v}", f"data.train={text_data / 'train.jsonl'}", "model.dtype=float32",
            "train.mixed_precision=no", f"train.output_dir={out}", f"train.resume={run / 'checkpoint-4'}",
            "log.progress_bar=false", "log.report_to=[jsonl]"]))
    assert not list(out.glob("checkpoint-*"))
