"""glmtune.generation on the tiny checkpoint of every family: greedy equals the former greedy path bit for bit,
top_k=1 equals greedy, a seed reproduces a sample, stop ids, streaming, left-padded batches, --quant, --english,
and the token rule's pieces (repetition penalty, top-k, top-p) on hand-made logits."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from glmtune.config import RecipeError
from glmtune.data.sample import IMAGE_PLACEHOLDER, Turn
from glmtune.generation import (
    GenerationOptions,
    apply_repetition_penalty,
    collect,
    encode_batch,
    filter_top_k,
    filter_top_p,
    generate_text,
    next_tokens,
    stream_text,
)

FAMILIES = {"glm41v": "tiny_glm41v", "glm4v": "tiny_glm4v", "glm4": "tiny_glm4", "visualglm": "tiny_visualglm",
            "chatglm": "tiny_chatglm"}
VISION = ("glm41v", "glm4v", "visualglm")
_loaded: dict = {}


def loaded(request, name: str):
    """(family, model, processor) of a tiny checkpoint, loaded once per test module."""
    from glmtune.chat import load_for_inference

    if name not in _loaded:
        _loaded[name] = load_for_inference(request.getfixturevalue(FAMILIES[name]))
    return _loaded[name]


def conversations(name: str):
    """Two prompts of different lengths (left padding), the first with an image for the vision families."""
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    first = ([Turn("user", IMAGE_PLACEHOLDER + "What colour is the shape?")], [image]) if name in VISION \
        else ([Turn("user", "What colour is the shape?")], [])
    return [first, ([Turn("user", "Where is the shape? Answer in a few words please.")], [])]


@torch.no_grad()
def former_greedy(model, batch, max_new_tokens, eos, pad_id, next_positions, last_positions):
    """The greedy loop glmtune shipped before glmtune.generation (glmtune/models/generation.py), kept as reference."""
    out = model(**batch, use_cache=True)
    past, mask, pos = out.past_key_values, batch["attention_mask"], last_positions
    done = torch.zeros(len(mask), dtype=torch.bool)
    stop = torch.tensor(eos)
    new = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new.append(token)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        pos = next_positions(pos)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], position_ids=pos, attention_mask=mask, past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
    return torch.stack(new, dim=1)


def former_path(name, model, batch, n, eos, pad_id):
    if name == "glm41v":  # transformers' greedy generate, as before
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad_id)
        return out[:, batch["input_ids"].shape[1]:]
    if name in ("visualglm", "chatglm"):
        return former_greedy(model, batch, n, eos, pad_id, lambda p: torch.stack([p[:, 0], p[:, 1] + 1], dim=1),
                             batch["position_ids"][:, :, -1:])
    return former_greedy(model, batch, n, eos, pad_id, lambda p: p + 1,
                         batch["position_ids"].max(dim=1).values[:, None])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_top_k_1_seed_and_stop_ids(request, name):
    family, model, processor = loaded(request, name)
    batch = encode_batch(processor, model, conversations(name))
    eos, pad = family.generation_eos(model), processor.pad_id

    def run(**kw):
        return collect(family.stream(model, batch, GenerationOptions(max_new_tokens=8, **kw), eos, pad))

    greedy = run()
    assert greedy.shape == (2, 8)  # the tiny random models never emit eos within 8 tokens: every step is compared
    assert torch.equal(greedy, former_path(name, model, batch, 8, eos, pad))
    assert torch.equal(family.generate(model, batch, 8, eos, pad), greedy)
    assert torch.equal(run(temperature=0.7, top_k=1, seed=5), greedy)
    sample = run(temperature=1.0, seed=1)
    assert torch.equal(run(temperature=1.0, seed=1), sample)
    assert not torch.equal(run(temperature=1.0, seed=2), sample)
    assert not torch.equal(sample, greedy)
    # a stop id ends a row like eos: the first token of one row that the other row never makes stops that row
    # (pad after it), the other goes on; the tiny VisualGLM repeats one token in both rows: both stop at once
    rows = greedy.tolist()
    found = [(r, j) for r in (0, 1) for j in range(8) if rows[r][j] not in rows[1 - r] + rows[r][:j]]
    if found:
        r, j = found[0]
        stopped = run(stop_ids=(rows[r][j],)).tolist()
        assert stopped[r] == rows[r][:j + 1] + [pad] * (7 - j) and stopped[1 - r] == rows[1 - r]
    else:
        assert name == "visualglm" and run(stop_ids=(rows[0][0],)).tolist() == [rows[0][:1], rows[1][:1]]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_batched_equals_one_by_one_and_stream_joins_to_answer(request, name):
    family, model, processor = loaded(request, name)
    convs = conversations(name)
    options = GenerationOptions(max_new_tokens=6)
    both = generate_text(family, model, processor, convs, options)
    assert both == [generate_text(family, model, processor, [c], options)[0] for c in convs]
    for conv, answer in zip(convs, both):
        pieces = list(stream_text(family, model, processor, conv, options))
        assert "".join(pieces) == answer
    # the steps arrive while decoding goes on (each forward slowed to 20 ms so that the order is unambiguous), and
    # closing the stream stops the decoding (GLM-4.1V's generate runs in a thread: it stops at its next step)
    times = []

    def slow(*args):
        time.sleep(0.02)
        times.append(time.monotonic())

    hook = model.register_forward_hook(slow)
    try:
        batch = encode_batch(processor, model, convs[:1])
        steps = family.stream(model, batch, GenerationOptions(max_new_tokens=12), family.generation_eos(model),
                              processor.pad_id)
        next(steps)
        first = time.monotonic()
        assert len(list(steps)) == 11 and first < times[-1]
        times.clear()
        steps = family.stream(model, batch, GenerationOptions(max_new_tokens=12), family.generation_eos(model),
                              processor.pad_id)
        next(steps)
        steps.close()
        assert len(times) <= 4
    finally:
        hook.remove()


def test_token_rule_on_hand_made_logits():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    seen = torch.tensor([[True, False, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, 1.0, -2.0, 0.5]]
    assert filter_top_k(logits, 2).tolist() == [[2.0, 1.0, float("-inf"), float("-inf")]]
    # probabilities ~ [0.57, 0.21, 0.03, 0.13]: top_p 0.7 keeps the first two (0.57 < 0.7 <= 0.78)
    assert filter_top_p(logits, 0.7).isfinite().tolist() == [[True, True, False, False]]
    assert filter_top_p(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    g = torch.Generator().manual_seed(0)
    draws = [int(next_tokens(logits, None, GenerationOptions(temperature=1.0, top_p=0.7), g)) for _ in range(200)]
    assert set(draws) == {0, 1}
    # with the penalty, greedy leaves the seen token 0 (2.0 -> 1.0 ties with token 1: argmax takes the first)
    assert int(next_tokens(logits, seen, GenerationOptions(repetition_penalty=3.0), None)) == 1


def test_bad_options_are_one_line_errors(tiny_glm4, capsys):
    with pytest.raises(RecipeError, match=r"--top-p 1.5: must be in \(0, 1\]"):
        GenerationOptions(top_p=1.5)
    with pytest.raises(RecipeError, match="--temperature -1"):
        GenerationOptions(temperature=-1)
    from glmtune.cli import main

    assert main(["chat", str(tiny_glm4), "--prompt", "hi", "--top-k", "-1"]) == 2
    assert main(["chat", str(tiny_glm4), "--prompt", "hi", "--english"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["glmtune chat: error: --top-k -1: must be >= 0 (0 = off)",
                     "glmtune chat: error: --english: only VisualGLM-6B has an English prompt variant, not the glm4 "
                     "family"]


def test_english_prompt_variant(request):
    """--english: VisualGLM-6B's `Q:{q}\\nA:` prompt even for a Chinese question (auto would pick 问：/答：)."""
    from glmtune.chat import set_english
    from glmtune.models.visualglm.tokenizer import build_prompt

    family, model, processor = loaded(request, "visualglm")
    question = [Turn("user", "这是什么颜色？")]

    def prompt_ids(lang):
        text = build_prompt("这是什么颜色？", [], lang)
        return processor.tokenizer.encode(text, add_special_tokens=False) + [processor.gmask, processor.sop]

    assert processor.encode(question, [], generation=True)["input_ids"].tolist() == prompt_ids("zh")
    set_english(family, processor, True)
    try:
        assert processor.encode(question, [], generation=True)["input_ids"].tolist() == prompt_ids("en")
    finally:
        processor.language = None
    assert prompt_ids("en") != prompt_ids("zh")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_quantized_inference(request, name, bits):
    """--quant loads the language model's linears in bitsandbytes int8 / NF4: fewer bytes, logits near fp32's."""
    import bitsandbytes as bnb

    from glmtune.chat import load_for_inference

    family, model, processor = loaded(request, name)
    _, quant, _ = load_for_inference(request.getfixturevalue(FAMILIES[name]), quant=bits)
    layer = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    swapped = [n for n, m in quant.named_modules() if isinstance(m, layer)]
    assert swapped and all(family.output_layer not in n for n in swapped)

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    full = {n: nbytes(m) for n, m in model.named_modules() if n in swapped}
    small = {n: nbytes(m) for n, m in quant.named_modules() if n in swapped}
    # int8 weights + fp32 bias and row scales; NF4: half a byte per weight + block statistics (measured on the tiny
    # models: 0.25-0.26 and 0.13-0.14 of the fp32 bytes)
    assert sum(small.values()) < (0.3 if bits == 8 else 0.2) * sum(full.values())
    batch = encode_batch(processor, model, conversations(name))
    with torch.no_grad():
        ref, got = model(**batch).logits, quant(**batch).logits
    # relative L2 error of the logits, measured on the five tiny models (same with the AVX2 variables and 1
    # thread): int8 0.018-0.030, NF4 0.19-0.30 (random tiny weights, 16 levels per 64-weight block); bounds 2x /
    # 1.5x that, far below the ~1.4 of unrelated logits
    assert (got - ref).norm() <= (0.06 if bits == 8 else 0.45) * ref.norm()
    answers = generate_text(family, quant, processor, conversations(name), GenerationOptions(max_new_tokens=4))
    assert len(answers) == 2
