"""glmtune predict: a trained tiny model answers its training questions alike through chat, predict and eval
(greedy), and a predict run killed mid-way resumes to the same file as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
from memorised_qa import QA, write_jsonl  # noqa: E402  (the memorised_glm4 fixture's questions)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_trained_model_answers_alike_in_chat_predict_and_eval(memorised_glm4, tmp_path):
    from glmtune.chat import chat
    from glmtune.evaluate import evaluate
    from glmtune.generation import GenerationOptions
    from glmtune.predict import predict

    ckpt, data = memorised_glm4
    options = GenerationOptions(max_new_tokens=8)
    predict(ckpt, data, tmp_path / "p.jsonl", batch_size=4, options=options, print_fn=lambda s: None)
    lines = read_jsonl(tmp_path / "p.jsonl")
    assert [(x["question"], x["prediction"]) for x in lines] == QA
    assert [x["reference"] for x in lines] == [a for _, a in QA]
    for q, a in QA:  # one at a time, printed whole and streamed
        assert chat(ckpt, prompt=q, options=options, print_fn=lambda s: None) == a
        pieces = []
        assert chat(ckpt, prompt=q, options=options, stream_fn=pieces.append) == a and "".join(pieces) == a + "\n"
    inputs, pieces, printed = iter([QA[0][0], "clear", QA[2][0], "stop"]), [], []
    chat(ckpt, options=options, input_fn=lambda _: next(inputs), print_fn=printed.append, stream_fn=pieces.append)
    assert "".join(pieces) == f"\nGLM: {QA[0][1]}\n\nGLM: {QA[2][1]}\n" and "(history cleared)" in printed
    report = evaluate(ckpt, data, out=tmp_path / "eval" / "eval.json", max_samples=4, max_new_tokens=8,
                      print_fn=lambda s: None)
    assert report["exact_match"] == 1.0 and report["vqa_accuracy"] == 1.0
    # one-word answers: ROUGE 100, BLEU-4 only the smoothed higher orders, (1 * 1/2 * 1/4 * 1/8) ** (1/4)
    assert report["rouge-1"] == pytest.approx(100.0, abs=1e-5) and report["rouge-l"] == pytest.approx(100.0, abs=1e-5)
    assert report["bleu-4"] == pytest.approx((1 / 64) ** 0.25)
    assert report["perplexity"] == pytest.approx(2.718281828 ** report["loss"])
    beside = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert [x["prediction"] for x in beside] == [x["prediction"] for x in lines]
    # the LoRA on an NF4-quantized base (--quant 4) still gives the memorised answers
    predict(ckpt, data, tmp_path / "q.jsonl", batch_size=4, options=options, quant=4, print_fn=lambda s: None)
    assert [x["prediction"] for x in read_jsonl(tmp_path / "q.jsonl")] == [a for _, a in QA]


def test_predict_resumes_after_a_kill(tiny_glm4, tmp_path):
    from glmtune.generation import GenerationOptions
    from glmtune.predict import predict

    pairs = [(f"Question number {i}: what colour is item {i}?", "red") for i in range(40)]
    data = write_jsonl(tmp_path / "many.jsonl", pairs)
    with open(data, "a") as f:
        f.write("{not json\n")  # line 41: a bad record, written as an error line with --on-bad-sample skip
    args = ["--data", str(data), "--batch-size", "1", "--max-new-tokens", "6", "--on-bad-sample", "skip"]
    out = tmp_path / "out.jsonl"
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "glmtune", "predict", str(tiny_glm4), *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_file() and out.read_text().count("\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"predict ended before the kill: {(tmp_path / 'stderr.txt').read_text()[-500:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        log.close()
    written = out.read_text().count("\n")
    assert 3 <= written < 40
    with open(out, "a") as f:
        f.write('{"source": "half a line')  # as a kill in the middle of a write leaves it
    options = GenerationOptions(max_new_tokens=6)
    report = predict(tiny_glm4, data, out, batch_size=1, on_bad_sample="skip", options=options, print_fn=lambda s: None)
    assert report["already_done"] == written and report["written"] == 40 - written and report["skipped"] == 1
    fresh = tmp_path / "fresh.jsonl"  # uninterrupted
    predict(tiny_glm4, data, fresh, batch_size=1, on_bad_sample="skip", options=options, print_fn=lambda s: None)
    assert out.read_text() == fresh.read_text()
    lines = read_jsonl(out)
    assert [x["source"] for x in lines] == [f"{data}:{i}" for i in range(1, 42)]
    assert "error" in lines[-1]
