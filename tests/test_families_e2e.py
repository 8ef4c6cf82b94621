"""Every family's recipes end to end on tiny checkpoints: each recipe trains (loss falls), the
merge of the trained adapter equals the adapter model (PEFT round trip included), chat answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmtune.config import load_recipe
from glmtune.data.sample import Turn

ROOT = Path(__file__).resolve().parent.parent
# merged against adapter logits: fp32 rounding only. Measured (|logits| <= 5.8) <= 2.4e-6 for GLM-4V LoRA, GLM-4
# QLoRA and VisualGLM LoRA (AVX-512 with 1 thread, AVX2 with 2: scripts/measure_tolerances.py); bound 5e-5 (20x)
MERGE_ATOL = 5e-5


# recipe -> (model fixture, data fixture, recipe-specific overrides, bound on final/first loss after 16 steps)
# Training only the projector cannot touch the text tokens' loss, and a short prefix learns slower than LoRA,
# hence their looser bounds.
CASES = {
    "glm41v/lora.yaml": ("tiny_glm41v", "shapes_data", [], 0.8),
    "glm4v/lora.yaml": ("tiny_glm4v", "shapes_data", [], 0.8),
    "glm4v/lora_vision.yaml": ("tiny_glm4v", "shapes_data", [], 0.8),
    "glm4v/projector_full.yaml": ("tiny_glm4v", "shapes_data", [], 0.9),
    "glm4/lora.yaml": ("tiny_glm4", "text_data", [], 0.8),
    "glm41v/qlora.yaml": ("tiny_glm41v", "shapes_data", [], 0.8),
    "glm4v/qlora.yaml": ("tiny_glm4v", "shapes_data", [], 0.8),
    "glm4/qlora.yaml": ("tiny_glm4", "text_data", [], 0.8),
    "glm41v/dora.yaml": ("tiny_glm41v", "shapes_data", [], 0.8),
    "glm4v/dora.yaml": ("tiny_glm4v", "shapes_data", [], 0.8),
    "glm4/dora.yaml": ("tiny_glm4", "text_data", [], 0.8),
    "glm4v/ptuning.yaml": ("tiny_glm4v", "shapes_data", ["adapter.num_virtual_tokens=8", "train.lr=0.1"], 0.9),
    "glm4/ptuning.yaml": ("tiny_glm4", "text_data", ["adapter.num_virtual_tokens=8", "train.lr=0.1"], 0.9),
    # the tiny ChatGLM-6B has 2 layers: upstream's layers [0, 14] become [0, 1]
    # (their recipes read VisualGLM's own data format; the shapes data is GLM-4 messages: format auto;
    # upstream's LoRA scale is alpha/r = 0.1, so 16 steps need a 10x learning rate to move as far;
    # its character-level tiny tokenizer spells every answer out, so its loss falls slower: ~0.81 in 16 steps)
    "visualglm/lora.yaml": ("tiny_visualglm", "shapes_data", ["adapter.layers=[0,1]", "data.format=auto",
                                                              "train.lr=0.1"], 0.87),
    "visualglm/lora_all.yaml": ("tiny_visualglm", "shapes_data", ["data.format=auto", "train.lr=0.1"], 0.87),
    "visualglm/qlora.yaml": ("tiny_visualglm", "shapes_data", ["adapter.layers=[0,1]", "data.format=auto",
                                                               "train.lr=0.1"], 0.87),
    "chatglm/lora.yaml": ("tiny_chatglm", "text_data", [], 0.8),
    # (their P-tuning recipes decay the rate linearly from step 1, as upstream: 16 steps need a larger one)
    "visualglm/ptuning.yaml": ("tiny_visualglm", "shapes_data", ["adapter.num_virtual_tokens=8", "data.format=auto",
                                                                 "train.lr=0.3"], 0.9),
    "chatglm/ptuning.yaml": ("tiny_chatglm", "text_data", ["adapter.num_virtual_tokens=8", "train.lr=0.3"], 0.9),
}


def run(request, recipe_name: str, out: Path, *extra: str):
    from glmtune.train import train

    model_fixture, data_fixture, own, _ = CASES[recipe_name]
    model, data = request.getfixturevalue(model_fixture), request.getfixturevalue(data_fixture)
    recipe = load_recipe(ROOT / "recipes" / recipe_name, [
        f"model.path={model}", f"data.train={data / 'train.jsonl'}", f"data.val={data / 'val.jsonl'}",
        f"train.output_dir={out}", "model.dtype=float32", "train.mixed_precision=no", "train.batch_size=4",
        "train.grad_accum=2", "train.max_steps=16", "train.lr=1e-2", "adapter.dropout=0.0", "train.save_every=0",
        "data.max_length=128", "data.num_workers=0", "log.progress_bar=false", "train.resume=never", *own, *extra])
    return model, data, train(recipe)


def logits(model, processor, turns, images):
    batch = processor.collate([processor.encode(turns, images)])
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("recipe_name", list(CASES))
def test_recipe_trains_and_merge_equals_adapter_model(request, recipe_name, tmp_path):
    from PIL import Image

    from glmtune.adapters import load_trained
    from glmtune.merge import merge
    from glmtune.models import get_family

    model_dir, data, summary = run(request, recipe_name, tmp_path / "run")
    assert summary["steps"] == 16 and summary["skipped_samples"] == 0
    assert summary["final_train_loss"] < CASES[recipe_name][3] * summary["first_train_loss"], summary

    family = get_family(recipe_name.split("/")[0])
    processor = family.load_processor(model_dir)
    if not recipe_name.startswith(("glm4/", "chatglm/")):
        turns = [Turn("user", "<image>What colour is the shape?"), Turn("assistant", "red")]
        images = [Image.open(data / "images" / "val_00000.png").convert("RGB")]
    else:
        turns, images = [Turn("user", "There is a red square. What colour is it?"), Turn("assistant", "red")], []
    ckpt = Path(summary["checkpoint"])
    # PeftModel.from_pretrained (+ the NF4 base for QLoRA, + the prefix module for P-tuning)
    tuned = load_trained(family.load_model(model_dir), ckpt, family).eval()
    reference = logits(tuned, processor, turns, images)
    base = logits(family.load_model(model_dir), processor, turns, images)
    assert (reference - base).abs().max() > 1e-3  # training changed the model

    merged = merge(ckpt, tmp_path / "merged")
    # nothing lost: every non-weight file is copied; weights are always written as safetensors
    # (a .bin base, VisualGLM-6B / ChatGLM-6B, becomes model-0000N-of-0000M.safetensors + its index)
    renamed = {p.name.replace("pytorch_model", "model").replace(".bin", ".safetensors") for p in model_dir.iterdir()}
    assert sorted(p.name for p in merged.iterdir()) == sorted(renamed)
    merged_config = json.loads((merged / "config.json").read_text())
    if "ptuning" in recipe_name:  # the prefix is exported in the upstream form, not folded
        assert merged_config.pop("pre_seq_len") == 8 and merged_config.pop("prefix_projection") is False
    assert merged_config == json.loads((model_dir / "config.json").read_text())
    merged_logits = logits(family.load_model(merged), processor, turns, images)  # strict load: same names
    torch.testing.assert_close(merged_logits, reference, rtol=0, atol=MERGE_ATOL)


@pytest.mark.parametrize("recipe_name", ["glm4v/lora.yaml", "visualglm/lora_all.yaml", "glm4/lora.yaml",
                                         "chatglm/lora.yaml"])
def test_chat_and_eval(request, recipe_name, tmp_path):
    """One-shot and interactive chat (with the image for the vision families) and eval, per native family."""
    from glmtune.chat import chat
    from glmtune.evaluate import evaluate

    model_dir, data, summary = run(request, recipe_name, tmp_path / "run", "data.format=auto")
    vision = not recipe_name.startswith(("glm4/", "chatglm/"))
    image = str(data / "images" / "val_00000.png") if vision else None
    report = evaluate(summary["checkpoint"], data / "val.jsonl", out=tmp_path / "eval.json", max_samples=4,
                      max_new_tokens=3, print_fn=lambda s: None)
    records = [json.loads(x)["messages"] for x in (data / "val.jsonl").read_text().splitlines()[:4]]
    assert report["samples"] == 4 and report["loss"] > 0
    assert [e["reference"] for e in report["examples"]] == [m[-1]["content"] for m in records]
    assert report["exact_match"] == sum(e["exact"] for e in report["examples"]) / 4
    # 16 steps do not teach these answers (test_trained_answers_come_back_in_chat_and_eval does): chat on the first
    # record's question (and image) decodes what eval decoded for it
    reply = chat(summary["checkpoint"], image=image, prompt=records[0][0]["content"], max_new_tokens=3,
                 print_fn=lambda s: None)
    assert reply == report["examples"][0]["prediction"]
    printed, inputs = [], iter(["What shape is it?", "clear", "Where is it?", "stop"])
    chat(summary["checkpoint"], image=image, max_new_tokens=3, input_fn=lambda _: next(inputs), print_fn=printed.append)
    assert "(history cleared)" in printed and sum(p.startswith("\nGLM:") for p in printed) == 2


def test_trained_answers_come_back_in_chat_and_eval(tiny_glm4, memorised_glm4, tmp_path):
    """A LoRA that memorised four question -> answer pairs answers them in eval and in chat (from the checkpoint,
    and from the base folder plus --adapter)."""
    from memorised_qa import QA

    from glmtune.chat import chat
    from glmtune.evaluate import evaluate

    ckpt, data = memorised_glm4
    report = evaluate(ckpt, data, out=tmp_path / "eval.json", max_new_tokens=8, print_fn=lambda s: None)
    # every answer, exactly (the same under 1 and 2 threads, AVX-512 and AVX2)
    assert [(e["reference"], e["prediction"]) for e in report["examples"]] == [(a, a) for _, a in QA]
    assert report["exact_match"] == 1.0
    for question, answer in QA:
        assert chat(ckpt, prompt=question, max_new_tokens=8, print_fn=lambda s: None) == answer
    assert chat(tiny_glm4, adapter=ckpt, prompt=QA[0][0], max_new_tokens=8, print_fn=lambda s: None) == "blue"


def test_glm4_text_family_rejects_images(request, tmp_path, shapes_data):
    from glmtune.check import check

    model = request.getfixturevalue("tiny_glm4")
    recipe = load_recipe(ROOT / "recipes/glm4/lora.yaml", [f"model.path={model}",
                                                           f"data.train={shapes_data / 'val.jsonl'}"])
    report = check(recipe, print_fn=lambda s: None)
    (file_report,) = report["files"]
    assert file_report["samples"] == 0 and file_report["bad_samples"] == 16
    assert "no vision tower" in file_report["bad"][0]["reason"]
