"""The lean training step: the same numbers as the plain one it replaced.

- the LM head only at target positions (`logits_to_keep`) gives the loss and gradients of the full logits;
- a short run with it has the loss curve of a run with full logits;
- our LambdaLR schedules equal transformers' get_scheduler (imported here only: training does not import it);
- each step logs how long it waited for its batch (data_wait_s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmtune.config import load_recipe
from glmtune.data.sample import Turn

ROOT = Path(__file__).resolve().parent.parent


def _batch(processor, image):
    items = [processor.encode([Turn("user", "<image>What colour is the shape?"), Turn("assistant", "red")], [image]),
             processor.encode([Turn("user", "hi there, how are you"), Turn("assistant", "fine thanks")], [])]
    return processor.collate(items)


def test_head_at_targets_equals_full_logits(tiny_glm41v, shapes_data):
    from PIL import Image

    from glmtune.models import get_family
    from glmtune.train import takes_logits_to_keep, target_positions, token_loss_sum

    family = get_family("glm41v")
    model, processor = family.load_model(tiny_glm41v), family.load_processor(tiny_glm41v)
    assert takes_logits_to_keep(model)
    image = Image.open(sorted((shapes_data / "images").iterdir())[0]).convert("RGB")
    batch = _batch(processor, image)
    # the point of it: far fewer positions than the sequence (here the answers of two samples)
    assert 0 < len(target_positions(batch["labels"])) < batch["labels"].shape[1] // 2
    results = []
    for keep in (False, True):
        model.zero_grad()
        loss, n = token_loss_sum(model, batch, keep_logits=keep)
        loss.backward()
        results.append((loss.detach(), n, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full, n_full, g_full), (kept, n_kept, g_kept) = results
    assert n_full == n_kept > 0
    # fp32 sums over the same terms in another order: measured |diff| <= 2e-6 (AVX-512 and AVX2, 1-2 threads)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)
    assert len(g_full) == len(g_kept)
    for a, b in zip(g_full, g_kept):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_loss_curve_with_head_at_targets_equals_full_logits(tiny_glm41v, shapes_data, tmp_path, monkeypatch):
    import glmtune.train as train_module

    def run(out: Path) -> list[dict]:
        recipe = load_recipe(ROOT / "recipes" / "glm41v" / "quickstart.yaml", [
            f"model.path={tiny_glm41v}", f"data.train={shapes_data / 'train.jsonl'}", "data.val=null",
            f"train.output_dir={out}", "log.progress_bar=false", "train.batch_size=4", "data.shuffle_buffer=16",
            "train.resume=never", "train.max_steps=3", "train.save_every=0", "train.grad_accum=2",
            "data.num_workers=0", "log.report_to=[jsonl]", "train.lr=5e-3"])
        train_module.train(recipe)
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    lean = run(tmp_path / "lean")
    monkeypatch.setattr(train_module, "takes_logits_to_keep", lambda model: False)
    full = run(tmp_path / "full")
    assert [r["step"] for r in lean] == [1, 2, 3]
    # three steps at lr 5e-3 amplify the ~1e-6 difference of one loss; measured |diff| <= 3e-5 on this CPU
    assert [r["loss"] for r in lean] == pytest.approx([r["loss"] for r in full], rel=1e-4, abs=1e-4)
    assert [r["target_tokens"] for r in lean] == [r["target_tokens"] for r in full]
    assert all(r["data_wait_s"] >= 0 for r in lean)
    assert lean[0]["loss"] != lean[-1]["loss"]  # it trained


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_lr_schedule_equals_transformers(name):
    from transformers import get_scheduler

    from glmtune.train import make_scheduler

    def lrs(make):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
        sched = make(opt)
        out = []
        for _ in range(40):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: make_scheduler(opt, name, 7, 37))
    theirs = lrs(lambda opt: get_scheduler(name, opt, num_warmup_steps=7, num_training_steps=37))
    assert ours == theirs  # the same float expressions: exactly equal
    if name != "constant":
        assert ours[0] == 0.0 and ours[7] == 3e-3


def test_training_imports_no_optional_backend(tiny_glm41v, shapes_data, tmp_path):
    """A plain LoRA recipe imports neither DeepSpeed, bitsandbytes, wandb, tensorboard nor
    transformers.optimization (whose import pulls in bitsandbytes): seconds of start-up."""
    import subprocess
    import sys

    code = f"""
import sys
from glmtune.config import load_recipe
from glmtune.train import train
recipe = load_recipe({str(ROOT / 'recipes/glm41v/quickstart.yaml')!r}, [
    "model.path={tiny_glm41v}", "data.train={shapes_data / 'train.jsonl'}", "data.val=null",
    "train.output_dir={tmp_path / 'out'}", "log.progress_bar=false", "train.max_steps=1", "train.save_every=0",
    "train.batch_size=2", "data.num_workers=0", "log.report_to=[jsonl]"])
train(recipe)
print(sorted(m for m in ("deepspeed", "bitsandbytes", "wandb", "tensorboard", "torch.utils.tensorboard",
                         "transformers.optimization") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
