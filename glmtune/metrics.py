"""Generation metrics: exact match, VQA-style accuracy, ROUGE-1/2/L and BLEU-4, perplexity.

ROUGE and BLEU follow the GLM-4 finetune demo (THUDM/GLM-4 finetune_demo, `compute_metrics`): both texts are
segmented with jieba (Chinese words; English words and punctuation come out as tokens too), ROUGE is
rouge-chinese's F score of the space-joined tokens x 100 (its default counts distinct n-grams; ROUGE-L is
the LCS), BLEU-4 is nltk's `sentence_bleu` with smoothing
method 3 (in 0-1, the demo's scale), each averaged over samples. Two departures, both for text the demo
would mishandle: whitespace tokens (jieba returns the spaces of English text as tokens) are dropped, and an
empty prediction or reference scores 0 instead of raising.
"""

from __future__ import annotations

import logging
import math
import re
import string
import warnings

_CJK_PUNCT = "。！？，、：；“”‘’（）《》【】…"


def normalize(text: str) -> str:
    """Exact match ignores case, surrounding whitespace and trailing punctuation, as SQuAD-style EM does."""
    text = text.strip().lower()
    text = text.rstrip(string.punctuation + "。！？，")
    return re.sub(r"\s+", " ", text).strip()


_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def vqa_normalize(text: str) -> str:
    """Answer normalisation in the spirit of the VQA evaluation: lowercase; a comma between digits removed,
    other punctuation (Chinese too) becomes a space, a period only outside decimals; number words up to ten
    become digits; articles dropped; whitespace collapsed."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(\d),(\d)", r"\1\2", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    punct = string.punctuation.replace(".", "").replace("'", "") + _CJK_PUNCT
    text = text.translate({ord(c): " " for c in punct})
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy: min(1, matching references / 3) with 3 or more references (the VQA v2 rule for its ten
    human answers); with fewer, 1 if the normalised prediction equals any reference."""
    pred = vqa_normalize(prediction)
    matches = sum(pred == vqa_normalize(r) for r in references)
    return min(1.0, matches / min(3, len(references))) if references else 0.0


def segment(text: str) -> list[str]:
    """jieba words of `text`, whitespace tokens dropped."""
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading banner is not the user's concern
    return [w for w in jieba.lcut(text.strip()) if w.strip()]


def rouge_bleu(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F (x 100) and BLEU-4 (0-1) of one prediction against its reference, on jieba words."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    pred, ref = segment(prediction), segment(reference)
    if not pred or not ref:
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    scores = Rouge().get_scores(" ".join(pred), " ".join(ref))[0]
    out = {k: v["f"] * 100 for k, v in scores.items()}
    with warnings.catch_warnings():  # nltk warns about missing higher-order n-grams in short texts
        warnings.simplefilter("ignore")
        out["bleu-4"] = float(sentence_bleu([ref], pred, smoothing_function=SmoothingFunction().method3))
    return out


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float | None]:
    """Sample means of exact match, VQA accuracy, ROUGE-1/2/L and BLEU-4 (None without samples)."""
    n = len(predictions)
    keys = ("exact_match", "vqa_accuracy", "rouge-1", "rouge-2", "rouge-l", "bleu-4")
    if n == 0:
        return dict.fromkeys(keys)
    sums = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references):
        sums["exact_match"] += float(normalize(pred) == normalize(ref))
        sums["vqa_accuracy"] += vqa_accuracy(pred, [ref])
        for k, v in rouge_bleu(pred, ref).items():
            sums[k] += v
    return {k: v / n for k, v in sums.items()}


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf past what a float holds."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
