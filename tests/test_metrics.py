"""Metric functions on hand-made predictions: values worked out by hand, and an independent implementation of
ROUGE (rouge-chinese's distinct n-grams, LCS) and BLEU-4 (nltk's smoothing method 3) written here."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from glmtune.metrics import generation_metrics, normalize, perplexity, rouge_bleu, segment, vqa_accuracy, vqa_normalize

# rouge-chinese's F score adds 1e-8 to the denominator; nothing else is approximate
TOL = 1e-6


def test_chinese_is_segmented_into_words_and_spaces_are_dropped():
    assert segment("我喜欢红色的圆形") == ["我", "喜欢", "红色", "的", "圆形"]
    assert segment("the red  circle") == ["the", "red", "circle"]


# (prediction, reference, expected) worked out by hand:
HAND = [
    # unigram sets {the cat sat on mat} / {the cat is on mat}: 4 of 5; bigrams 3 of 5; LCS "the cat on the mat" 5 of
    # 6 tokens; BLEU: p1..p4 = 5/6, 3/5, 1/4, 0/3 -> smoothed 1/(2*3); same length, no brevity penalty
    ("the cat sat on the mat", "the cat is on the mat",
     {"rouge-1": 80.0, "rouge-2": 60.0, "rouge-l": 500 / 6, "bleu-4": (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25}),
    # 我 喜欢 红色 的 圆形 / 我 喜欢 蓝色 的 圆形: words 4 of 5; bigrams 2 of 4; LCS 4 of 5;
    # BLEU: 4/5, 2/4, then 0/3 and 0/2 smoothed to 1/(2*3) and 1/(4*2)
    ("我喜欢红色的圆形", "我喜欢蓝色的圆形",
     {"rouge-1": 80.0, "rouge-2": 50.0, "rouge-l": 80.0, "bleu-4": (4 / 5 * 2 / 4 * 1 / 6 * 1 / 8) ** 0.25}),
    # 红色 / 红色 的 圆形: P 1, R 1/3 -> F 1/2; no bigram in the prediction -> 0; BLEU: 1/1, then empty n-gram
    # counts (denominator 1) smoothed to 1/2, 1/4, 1/8; brevity penalty exp(1 - 3/1)
    ("红色", "红色的圆形",
     {"rouge-1": 50.0, "rouge-2": 0.0, "rouge-l": 50.0,
      "bleu-4": math.exp(1 - 3) * (1 * 1 / 2 * 1 / 4 * 1 / 8) ** 0.25}),
    ("", "红色", {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}),  # empty prediction scores 0
]


@pytest.mark.parametrize("prediction,reference,expected", HAND)
def test_rouge_and_bleu_equal_hand_computed_values(prediction, reference, expected):
    got = rouge_bleu(prediction, reference)
    assert got == pytest.approx(expected, rel=TOL, abs=TOL)


def ngram_set(tokens, n):
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def f1(overlap, n_pred, n_ref):
    p, r = (overlap / n_pred if n_pred else 0.0), (overlap / n_ref if n_ref else 0.0)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def bleu4_method3(pred, ref):
    """Sentence BLEU-4, one reference, NIST geometric smoothing of zero precisions (Chen & Cherry's method 3)."""
    logs, k = [], 1
    for n in range(1, 5):
        grams = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
        ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        matches, total = sum(min(c, ref_grams[g]) for g, c in grams.items()), max(1, sum(grams.values()))
        if n == 1 and matches == 0:
            return 0.0
        if matches == 0:
            logs.append(math.log(1 / (2 ** k * total)))
            k += 1
        else:
            logs.append(math.log(matches / total))
    brevity = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return brevity * math.exp(sum(logs) / 4)


def independent(prediction, reference):
    pred, ref = segment(prediction), segment(reference)
    out = {f"rouge-{n}": 100 * f1(len(ngram_set(pred, n) & ngram_set(ref, n)), len(ngram_set(pred, n)),
                                  len(ngram_set(ref, n))) for n in (1, 2)}
    out["rouge-l"] = 100 * f1(lcs(pred, ref), len(pred), len(ref))
    out["bleu-4"] = bleu4_method3(pred, ref)
    return out


MORE = [("这是一个红色的正方形", "这是一个蓝色的正方形"), ("图片中有一只猫在桌子上", "桌子上有一只猫"),
        ("a blue square on the left side", "the blue square is on the left"), ("蓝色 square", "蓝色的 square"),
        ("左边有三个红色的圆", "右边有三个红色的圆和两个蓝色的三角形")]


@pytest.mark.parametrize("prediction,reference", MORE)
def test_rouge_and_bleu_equal_an_independent_implementation(prediction, reference):
    assert rouge_bleu(prediction, reference) == pytest.approx(independent(prediction, reference), rel=TOL, abs=TOL)


def test_exact_match_vqa_accuracy_and_means():
    assert normalize("  Red. ") == normalize("red") and normalize("红色。") == "红色"
    assert vqa_normalize("Two dogs.") == vqa_normalize("2 dogs") == "2 dogs"
    assert vqa_normalize("The red one!") == "red 1" and vqa_normalize("1,000 or 3.5") == "1000 or 3.5"
    assert vqa_normalize("红色。") == "红色"
    humans = ["2", "two", "2", "3", "3", "3", "3", "4", "4", "4"]
    assert vqa_accuracy("Two", humans) == pytest.approx(1.0)  # three humans said 2
    assert vqa_accuracy("four", humans) == pytest.approx(1.0) and vqa_accuracy("5", humans) == 0.0
    assert vqa_accuracy("1", ["1", "one", "2", "2", "2"]) == pytest.approx(2 / 3)
    preds, refs = ["Two dogs.", "红色", "the cat sat on the mat"], ["2 dogs", "红色。", "the cat is on the mat"]
    got = generation_metrics(preds, refs)
    # exact match: only 红色 (the 2/two difference counts); VQA normalisation also matches the dogs
    assert got["exact_match"] == pytest.approx(1 / 3) and got["vqa_accuracy"] == pytest.approx(2 / 3)
    per = [independent(p, r) for p, r in zip(preds, refs)]
    for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert got[key] == pytest.approx(sum(x[key] for x in per) / 3, rel=TOL, abs=TOL)
    assert generation_metrics([], [])["rouge-l"] is None
    assert perplexity(2.0) == pytest.approx(math.exp(2.0)) and perplexity(1e6) == math.inf
