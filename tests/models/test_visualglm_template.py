"""VisualGLM-6B / ChatGLM-6B family (native): the prompt token layout against upstream's fine-tuning recipe, label
masking, 2D position ids, the image slot, image preprocessing, errors, truncation, collate and a forward pass.

The expected ids are built here, piece by piece, the way THUDM/VisualGLM-6B finetune_visualglm.py (FewShotDataset)
builds them with upstream's tokenizer (every encode with add_special_tokens=False):

    a_ids = encode("<img>") + [placeholder] * 32 + encode("</img>问：" + prompt + "\\n答：")
    input_ids = build_inputs_with_special_tokens(a_ids, b_ids) = a_ids + [gMASK, <sop>] + encode(label) + [<eop>]
    labels = [-100] * input_ids.index(<sop>) + input_ids[<sop>:]

(finetune_visualglm.py fills the 32 placeholder slots with `<pad>`, the HF remote `chat()` with `<unk>`, as glmtune
does; the placeholder embeddings are replaced by the image, so the id only has to be one the text never produces).
Position ids as upstream's `get_position_ids` (position_encoding_2d): position = index, from `<sop>` on the
`[gMASK]` index; block position 0 in the context, then 1, 2, ... `ChatGLMTokenizer.encode_text` is
`encode(text, add_special_tokens=False)`, pinned to the official tokenizer in tests/models/test_chatglm_tokenizer.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from glmtune.data.sample import SampleError, Turn
from glmtune.models import get_family
from glmtune.models.visualglm.tokenizer import ChatGLMTokenizer

IGNORE = -100
IMAGE_LENGTH = 32  # config.json image_length: the Q-Former's query tokens
# BLIP-2's BlipImageEvalProcessor (THUDM/VisualGLM-6B model/blip2.py): Resize((224, 224), BICUBIC) -> ToTensor ->
# Normalize(CLIP mean, std); the tiny model's eva_config.image_size is 112.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_IMAGE_SIZE = 112


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def proc(tiny_visualglm):
    return get_family("visualglm").load_processor(tiny_visualglm)


@pytest.fixture(scope="module")
def text_proc(tiny_chatglm):
    return get_family("chatglm").load_processor(tiny_chatglm)


@pytest.fixture(scope="module")
def tok(tiny_visualglm) -> ChatGLMTokenizer:
    """The tiny tokenizer loaded on its own."""
    return ChatGLMTokenizer.from_pretrained(tiny_visualglm)


@pytest.fixture(scope="module")
def sp(tok):
    """Special ids straight from the sentencepiece pieces (num_image_tokens is 0 in the official config)."""
    assert tok.num_image_tokens == 0
    return {name: tok.sp_model.piece_to_id(piece) for name, piece in
            (("unk", "<unk>"), ("pad", "<pad>"), ("gmask", "[gMASK]"), ("sop", "<sop>"), ("eop", "<eop>"))}


def noise(w=150, h=90, seed=0):
    """A non-square random RGB image, so that the resize and the per-channel normalisation both matter."""
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def U(text):
    return Turn("user", text)


def A(text):
    return Turn("assistant", text)


def S(text):
    return Turn("system", text)


def upstream(tok, sp, text, answer=None, image=True):
    """finetune_visualglm.py's ids for prompt text `text` (what follows `</img>`): (ids, context length incl.
    [gMASK]). With `answer` None, the generation prompt (chat(): the ids end with [gMASK] <sop>)."""
    if image:
        a_ids = tok.encode_text("<img>") + [sp["unk"]] * IMAGE_LENGTH + tok.encode_text("</img>" + text)
    else:
        a_ids = tok.encode_text(text)
    ids = a_ids + [sp["gmask"], sp["sop"]]
    if answer is not None:
        ids += tok.encode_text(answer) + [sp["eop"]]
    return ids, len(a_ids) + 1


def upstream_labels(ids, sp):
    context_length = ids.index(sp["sop"])
    return [IGNORE] * context_length + ids[context_length:]


def upstream_positions(ids, sp):
    """ChatGLM-6B get_position_ids with position_encoding_2d: [position ids, block position ids]."""
    context_length = ids.index(sp["sop"])
    mask_position = ids.index(sp["gmask"])
    n = len(ids)
    position = list(range(context_length)) + [mask_position] * (n - context_length)
    block = [0] * context_length + list(range(1, n - context_length + 1))
    return [position, block]


def check_layout(out, ids, sp, image: bool, tok=None):
    """The encoding equals upstream's ids, labels, 2D positions and image slot."""
    assert out["input_ids"].tolist() == ids
    assert out["input_ids"].dtype == out["position_ids"].dtype == torch.long
    assert out["position_ids"].shape == (2, len(ids))
    assert out["position_ids"].tolist() == upstream_positions(ids, sp)
    assert out["image_mask"].dtype == torch.bool and out["image_mask"].shape == (len(ids),)
    if image:
        start = len(tok.encode_text("<img>"))
        assert out["image_mask"].tolist() == [start <= i < start + IMAGE_LENGTH for i in range(len(ids))]
        assert out["input_ids"][out["image_mask"]].tolist() == [sp["unk"]] * IMAGE_LENGTH
        assert out["images"].shape == (1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    else:
        assert not out["image_mask"].any() and "images" not in out
    if "labels" in out:
        assert out["labels"].dtype == torch.long
        assert out["labels"].tolist() == upstream_labels(ids, sp)


# --- token layout against upstream ------------------------------------------------------------------


def test_image_chinese_question_matches_upstream_finetune(proc, tok, sp):
    q, a = "图中是什么？", "一个红色的圆形。"
    out = proc.encode([U("<image>" + q), A(a)], [noise()], source="zh.json:0")
    ids, n_ctx = upstream(tok, sp, "问：" + q + "\n答：", a)
    check_layout(out, ids, sp, image=True, tok=tok)
    assert out["truncated"] is False
    assert proc.image_token_count(out) == IMAGE_LENGTH
    # spelled out: context up to [gMASK], then <sop> answer <eop>; the image slot starts after "<img>"
    start = len(tok.encode_text("<img>"))
    assert ids[:start] == tok.encode_text("<img>")
    assert ids[start + IMAGE_LENGTH:n_ctx] == tok.encode_text("</img>问：" + q + "\n答：") + [sp["gmask"]]
    assert ids[n_ctx:] == [sp["sop"]] + tok.encode_text(a) + [sp["eop"]]
    labels = out["labels"].tolist()
    assert labels[:n_ctx] == [IGNORE] * n_ctx
    assert labels[n_ctx:] == [sp["sop"]] + tok.encode_text(a) + [sp["eop"]]
    position, block = out["position_ids"].tolist()
    assert position == list(range(n_ctx)) + [n_ctx - 1] * (len(ids) - n_ctx)
    assert block == [0] * n_ctx + list(range(1, len(ids) - n_ctx + 1))
    assert position[n_ctx - 1] == n_ctx - 1 and ids[n_ctx - 1] == sp["gmask"]


def test_generation_prompt_ends_with_gmask_sop(proc, tok, sp):
    q = "图中是什么？"
    gen = proc.encode([U("<image>" + q)], [noise()], generation=True)
    ids, n_ctx = upstream(tok, sp, "问：" + q + "\n答：")
    check_layout(gen, ids, sp, image=True, tok=tok)
    assert ids[-2:] == [sp["gmask"], sp["sop"]] and len(ids) == n_ctx + 1
    assert "labels" not in gen and "truncated" not in gen
    assert gen["position_ids"][:, -1].tolist() == [n_ctx - 1, 1]  # <sop>: the [gMASK] position, block 1
    # the training encoding of the answered conversation extends it
    full = proc.encode([U("<image>" + q), A("圆形")], [noise()])
    assert torch.equal(full["input_ids"][:len(ids)], gen["input_ids"])
    assert torch.equal(full["position_ids"][:, :len(ids)], gen["position_ids"])
    assert torch.equal(full["images"], gen["images"])


def test_english_question_uses_q_a(proc, tok, sp):
    q, a = "What colour is the shape?", "It is red."
    out = proc.encode([U("<image>" + q), A(a)], [noise()])
    ids, _ = upstream(tok, sp, "Q:" + q + "\nA:", a)
    check_layout(out, ids, sp, image=True, tok=tok)
    assert out["input_ids"].tolist() != upstream(tok, sp, "问：" + q + "\n答：", a)[0]


def test_multi_turn_history_is_folded_into_the_prompt(proc, tok, sp):
    turns = [U("<image>这是什么？"), A("一个圆形"), U("什么颜色？"), A("红色"), U("在哪里？"), A("左上角")]
    out = proc.encode(turns, [noise()])
    text = "问：这是什么？\n答：一个圆形\n问：什么颜色？\n答：红色\n问：在哪里？\n答："
    ids, n_ctx = upstream(tok, sp, text, "左上角")
    check_layout(out, ids, sp, image=True, tok=tok)
    # only the last answer is learned; earlier answers are context
    targets = [v for v in out["labels"].tolist() if v != IGNORE]
    assert targets == [sp["sop"]] + tok.encode_text("左上角") + [sp["eop"]]
    assert (out["position_ids"][1] == 0).sum().item() == n_ctx

    # English history keeps Q:/A:
    en = [U("<image>What is it?"), A("a circle"), U("What colour is it?"), A("red")]
    ids, _ = upstream(tok, sp, "Q:What is it?\nA:a circle\nQ:What colour is it?\nA:", "red")
    check_layout(proc.encode(en, [noise()]), ids, sp, image=True, tok=tok)


def test_chinese_anywhere_in_the_context_selects_chinese(proc, tok, sp):
    turns = [U("<image>What is it?"), A("圆形"), U("What colour?"), A("red")]
    ids, _ = upstream(tok, sp, "问：What is it?\n答：圆形\n问：What colour?\n答：", "red")
    check_layout(proc.encode(turns, [noise()]), ids, sp, image=True, tok=tok)
    # ... but a Chinese final answer does not (it is not part of the prompt)
    ids, _ = upstream(tok, sp, "Q:What is it?\nA:", "圆形")
    check_layout(proc.encode([U("<image>What is it?"), A("圆形")], [noise()]), ids, sp, image=True, tok=tok)


def test_system_turn_leads_the_first_question(proc, tok, sp):
    system = "你是一个看图助手。"
    out = proc.encode([S(system), U("<image>图中是什么？"), A("圆形")], [noise()])
    ids, _ = upstream(tok, sp, "问：" + system + "\n图中是什么？\n答：", "圆形")
    check_layout(out, ids, sp, image=True, tok=tok)
    # with history: the system text goes in front of the FIRST question, not the last
    out = proc.encode([S(system), U("<image>这是什么？"), A("圆形"), U("什么颜色？"), A("红色")], [noise()])
    ids, _ = upstream(tok, sp, "问：" + system + "\n这是什么？\n答：圆形\n问：什么颜色？\n答：", "红色")
    check_layout(out, ids, sp, image=True, tok=tok)
    # English
    out = proc.encode([S("Be brief."), U("<image>What is it?"), A("a circle")], [noise()])
    ids, _ = upstream(tok, sp, "Q:Be brief.\nWhat is it?\nA:", "a circle")
    check_layout(out, ids, sp, image=True, tok=tok)


def test_visualglm_text_only_sample_has_no_image_slot(proc, tok, sp):
    out = proc.encode([U("图中是什么？"), A("圆形")], [])
    ids, _ = upstream(tok, sp, "问：图中是什么？\n答：", "圆形", image=False)
    check_layout(out, ids, sp, image=False)
    assert proc.image_token_count(out) == 0


# --- the ChatGLM-6B text model ---------------------------------------------------------------------------


def test_chatglm_text_model_round_format(text_proc, tiny_chatglm, sp):
    tok = ChatGLMTokenizer.from_pretrained(tiny_chatglm)
    assert text_proc.cfg.eva_config is None
    # no history: the bare query (HF chat(): `prompt = query`)
    out = text_proc.encode([U("你好"), A("你好！")], [])
    ids, _ = upstream(tok, sp, "你好", "你好！", image=False)
    check_layout(out, ids, sp, image=False)
    gen = text_proc.encode([U("你好")], [], generation=True)
    assert gen["input_ids"].tolist() == tok.encode("你好")  # upstream encode(query) appends [gMASK] <sop>
    # with history: [Round i]\n问：q\n答：a\n ... [Round n]\n问：query\n答：
    turns = [U("你好"), A("你好！"), U("这是什么？"), A("一个圆形"), U("什么颜色？"), A("红色")]
    text = "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：这是什么？\n答：一个圆形\n[Round 2]\n问：什么颜色？\n答："
    ids, _ = upstream(tok, sp, text, "红色", image=False)
    check_layout(text_proc.encode(turns, []), ids, sp, image=False)
    # the system text leads the first question here too
    out = text_proc.encode([S("简短回答。"), U("你好"), A("你好！"), U("再见"), A("再见！")], [])
    ids, _ = upstream(tok, sp, "[Round 0]\n问：简短回答。\n你好\n答：你好！\n[Round 1]\n问：再见\n答：", "再见！",
                      image=False)
    check_layout(out, ids, sp, image=False)


def test_image_for_the_text_model_is_an_error(text_proc):
    with pytest.raises(SampleError) as info:
        text_proc.encode([U("<image>这是什么？"), A("圆形")], [noise()], source="mixed.json:4")
    assert info.value.source == "mixed.json:4"
    assert str(info.value).startswith("mixed.json:4: ")
    with pytest.raises(SampleError) as info:
        text_proc.encode([U("<image><image>比较"), A("一样")], [noise(), noise(seed=1)], source="mixed.json:5")
    assert info.value.source == "mixed.json:5"


def test_two_images_is_an_error(proc):
    with pytest.raises(SampleError) as info:
        proc.encode([U("<image>比较<image>"), A("一样")], [noise(), noise(seed=1)], source="pairs.json:3")
    assert info.value.source == "pairs.json:3"
    assert "2 images" in info.value.reason
    with pytest.raises(SampleError):
        proc.encode([U("<image>A"), A("x"), U("<image>B"), A("y")], [noise(), noise(seed=1)], source="p:4")


# --- truncation ------------------------------------------------------------------------------------------

LONG_ANSWER = "一个红色的圆形在图片的左上角，背景是白色的。" * 2


def test_prompt_too_long_is_an_error(proc, tok, sp):
    turns = [U("<image>描述这张图片。"), A(LONG_ANSWER)]
    full = proc.encode(turns, [noise()])
    n_ctx = full["input_ids"].tolist().index(sp["sop"])
    for max_length in (10, IMAGE_LENGTH + 3, n_ctx - 1, n_ctx, n_ctx + 1):  # no room for <sop> + 1 answer token
        with pytest.raises(SampleError) as info:
            proc.encode(turns, [noise()], source="data.json:7", max_length=max_length)
        assert info.value.source == "data.json:7"
        assert f"data.max_length={max_length}" in info.value.reason
    # generation never truncates: a prompt longer than max_length is an error
    with pytest.raises(SampleError) as info:
        proc.encode(turns[:1], [noise()], source="gen:1", generation=True, max_length=n_ctx)
    assert "data.max_length=" in info.value.reason
    assert len(proc.encode(turns[:1], [noise()], generation=True, max_length=n_ctx + 1)["input_ids"]) == n_ctx + 1


@pytest.mark.parametrize("extra", [2, 5])
def test_answer_is_cut_at_max_length(proc, tok, sp, extra):
    turns = [U("<image>描述这张图片。"), A(LONG_ANSWER)]
    full = proc.encode(turns, [noise()])
    n = len(full["input_ids"])
    n_ctx = full["input_ids"].tolist().index(sp["sop"])
    max_length = n_ctx + extra  # <sop> + (extra - 1) answer tokens
    assert max_length < n
    out = proc.encode(turns, [noise()], source="d:1", max_length=max_length)
    assert out["truncated"] is True
    for key in ("input_ids", "labels", "image_mask"):
        assert len(out[key]) == max_length, key
        assert torch.equal(out[key], full[key][:max_length]), key
    assert torch.equal(out["position_ids"], full["position_ids"][:, :max_length])
    assert (out["labels"] != IGNORE).sum().item() == extra
    assert out["input_ids"][-1].item() != sp["eop"]  # the end was cut off
    assert int(out["image_mask"].sum()) == IMAGE_LENGTH and torch.equal(out["images"], full["images"])
    # exactly fitting is not truncation
    same = proc.encode(turns, [noise()], max_length=n)
    assert same["truncated"] is False and torch.equal(same["input_ids"], full["input_ids"])


# --- collate and forward ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def items(proc):
    return [
        proc.encode([U("图中是什么？"), A("圆形")], []),
        proc.encode([U("<image>Where is the shape?"), A("top left")], [noise()]),
        proc.encode([S("简短回答。"), U("你好"), A("你好！"), U("这是什么颜色？"), A("红色")], []),
        proc.encode([U("<image>这是什么形状？"), A("一个正方形")], [noise(60, 60, seed=3)]),
    ]


@pytest.mark.parametrize("pad_left", [False, True])
def test_collate_padding(proc, sp, items, pad_left):
    batch = proc.collate(items, pad_left=pad_left)
    lengths = [len(x["input_ids"]) for x in items]
    width = max(lengths)
    assert len(set(lengths)) > 1
    assert proc.pad_id == sp["pad"] == 3
    for key in ("input_ids", "labels", "attention_mask", "image_mask"):
        assert batch[key].shape == (4, width), key
    assert batch["position_ids"].shape == (4, 2, width)
    assert batch["image_mask"].dtype == torch.bool
    for row, (x, n) in enumerate(zip(items, lengths)):
        keep = slice(width - n, width) if pad_left else slice(0, n)
        pad = slice(0, width - n) if pad_left else slice(n, width)
        for key in ("input_ids", "labels", "image_mask"):
            assert batch[key][row, keep].tolist() == x[key].tolist(), key
        assert batch["position_ids"][row, :, keep].tolist() == x["position_ids"].tolist()
        assert batch["position_ids"][row, :, pad].tolist() == [[0] * (width - n)] * 2
        assert batch["attention_mask"][row, keep].tolist() == [1] * n
        assert batch["attention_mask"][row, pad].tolist() == [0] * (width - n)
        assert batch["input_ids"][row, pad].tolist() == [proc.pad_id] * (width - n)
        assert batch["labels"][row, pad].tolist() == [IGNORE] * (width - n)
        assert batch["image_mask"][row, pad].tolist() == [False] * (width - n)
    assert batch["attention_mask"].sum().item() == sum(lengths)
    # images only from the samples that have them, in batch order
    assert batch["images"].shape == (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert torch.equal(batch["images"], torch.cat([items[1]["images"], items[3]["images"]]))
    assert batch["image_mask"].sum(dim=1).tolist() == [0, IMAGE_LENGTH, 0, IMAGE_LENGTH]


def test_collate_text_only_and_generation(proc, sp):
    gen = proc.collate([proc.encode([U("你好")], [], generation=True),
                        proc.encode([U("<image>这张图片里有什么东西？")], [noise()], generation=True)], pad_left=True)
    assert "labels" not in gen
    assert gen["input_ids"][:, -2:].tolist() == [[sp["gmask"], sp["sop"]]] * 2
    assert gen["position_ids"][:, 1, -1].tolist() == [1, 1]  # left padding keeps the last column real
    assert gen["images"].shape == (1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    text = proc.collate([proc.encode([U("你好"), A("好")], []), proc.encode([U("这是什么？"), A("圆形")], [])])
    assert "images" not in text and not text["image_mask"].any()


@pytest.fixture(scope="module")
def model(tiny_visualglm):
    return get_family("visualglm").load_model(tiny_visualglm)


@pytest.mark.parametrize("pad_left", [False, True])
def test_mixed_batch_forward(proc, items, model, pad_left):
    from glmtune.train import token_loss_sum

    batch = proc.collate(items, pad_left=pad_left)
    with torch.no_grad():
        loss, count = token_loss_sum(model, batch)
        assert torch.isfinite(loss) and loss.item() > 0
        assert count == sum(int((x["labels"] != IGNORE).sum()) for x in items)
        # padding changes nothing: the batch loss is the sum of the per-sample losses
        single = [token_loss_sum(model, proc.collate([x]))[0].item() for x in items]
    # summation order only: measured 2.1e-5 of ~189 (1.1e-7) relative, 1 and 2 threads, AVX-512 and AVX2 (scripts/
    # measure_tolerances.py); bound 1e-6 relative (7x)
    assert loss.item() == pytest.approx(sum(single), rel=1e-6)


def test_the_image_reaches_the_answer(proc, model):
    """Two different images give different logits at the answer positions (the placeholders are replaced)."""
    turns = [U("<image>这是什么？"), A("圆形")]
    with torch.no_grad():
        a = model(**proc.collate([proc.encode(turns, [noise()])])).logits
        b = model(**proc.collate([proc.encode(turns, [noise(seed=5)])])).logits
    assert (a - b).abs()[0, -3:].max() > 1e-4


# --- image preprocessing ---------------------------------------------------------------------------------


def reference_pixels(image: Image.Image, size: int = TINY_IMAGE_SIZE) -> torch.Tensor:
    x = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    x = (x - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


@pytest.mark.parametrize("image", [noise(), noise(40, 200, seed=1).convert("L"), noise(seed=2).convert("RGBA")],
                         ids=["rgb", "grey", "rgba"])
def test_image_tensor_is_bicubic_clip(proc, image):
    out = proc.encode([U("<image>描述这张图片。"), A("噪声")], [image])
    pixels = out["images"]
    assert pixels.shape == (1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE) and pixels.dtype == torch.float32
    ref = reference_pixels(image)
    # fp32 pixels against the float64 reference: measured 2.8e-7 (fp32 rounding of |x| <= 2.2) in every setting
    torch.testing.assert_close(pixels[0].double(), ref, atol=1e-5, rtol=0)
    # the comparison tells resampling filters apart
    other = np.asarray(image.convert("RGB").resize((TINY_IMAGE_SIZE,) * 2, Image.Resampling.BILINEAR),
                       dtype=np.float64) / 255
    other = torch.from_numpy(((other - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1).copy())
    assert (other - ref).abs().max() > 1e-2


# --- decode ------------------------------------------------------------------------------------------------


def test_decode_answer(proc, tok, sp):
    ids = [sp["sop"]] + tok.encode_text("a red circle") + [sp["eop"]]
    assert proc.decode(ids) == "a red circle"
    # upstream process_response: half-width punctuation next to CJK becomes full-width
    assert proc.decode(tok.encode_text("红色，圆形")) == "红色，圆形"
