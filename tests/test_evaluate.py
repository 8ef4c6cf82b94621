"""`glmtune eval`'s exact match on a hand-made prediction set: the rules the README states, and the report."""

from __future__ import annotations

import json

import pytest

# (reference, prediction, exact): case, surrounding whitespace and trailing punctuation (ASCII and Chinese) are
# ignored, runs of whitespace count as one space; anything else is a different answer
CASES = [
    ("red", "red", True),
    ("red", "Red", True),
    ("red", "  RED \n", True),
    ("red", "red.", True),
    ("red", "red!?", True),
    ("top left", "Top   left", True),
    ("top left", "top\nleft.", True),
    ("红色", "红色。", True),
    ("red", "red square", False),
    ("red", "a red", False),
    ("red", ".red", False),
    ("red", "", False),
    ("top left", "topleft", False),
    ("top left", "top right", False),
    ("3.5", "3", False),
    ("red", "re d", False),
]


@pytest.mark.parametrize(("reference", "prediction", "exact"), CASES)
def test_normalize_decides_exact_match(reference, prediction, exact):
    from glmtune.evaluate import normalize

    assert (normalize(prediction) == normalize(reference)) is exact


def test_eval_report_scores_hand_made_predictions(tiny_glm4, tmp_path, monkeypatch):
    """The generation step is replaced by the hand-made predictions; loss, exact match and examples come from
    evaluate() itself on the tiny GLM-4."""
    import glmtune.evaluate as evaluate_module

    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": ref}]}) + "\n"
                            for i, (ref, _, _) in enumerate(CASES)))
    predictions = {f"Question {i}?": pred for i, (_, pred, _) in enumerate(CASES)}
    calls = []

    def fake_generate(family, model, processor, conversations, options):
        calls.append(len(conversations))
        return [predictions[turns[-1].text] for turns, _ in conversations]

    monkeypatch.setattr(evaluate_module, "generate_text", fake_generate)
    report = evaluate_module.evaluate(tiny_glm4, data, out=tmp_path / "eval.json", batch_size=5,
                                      print_fn=lambda s: None)
    assert calls == [5, 5, 5, 1]  # batched as asked, every sample once
    assert report["samples"] == len(CASES) and report["loss"] > 0 and report["loss_tokens"] > 0
    assert report["exact_match"] == sum(exact for _, _, exact in CASES) / len(CASES) == 0.5
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert [(e["reference"], e["prediction"], e["exact"]) for e in saved["examples"]] == CASES
