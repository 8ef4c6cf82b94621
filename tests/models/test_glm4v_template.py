"""GLM-4V-9B / GLM-4-9B-Chat family (native): chat-format token layout against the upstream-faithful
`build_chat_ids`, label masking, image expansion and position ids, image preprocessing, errors, truncation,
collate and a forward pass; the tiny checkpoint's layout against the official files in tests/reference/.

`build_chat_ids` is itself pinned to the official token vectors in tests/models/test_glm4_tokenizer.py, so
comparing the template with it compares the template with upstream `apply_chat_template`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glmtune.data.sample import SampleError, Turn
from glmtune.models import get_family
from glmtune.models.glm4v.tokenizer import Glm4Tokenizer, build_chat_ids

IGNORE = -100
REF = Path(__file__).resolve().parents[1] / "reference"

# THUDM/glm-4v-9b: open_clip's CLIP mean/std in the remote code's torchvision transform
# (Resize((1120, 1120), BICUBIC) -> ToTensor -> Normalize(mean, std)).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_PATCHES = 16  # 112 px / 14 = 8x8 patches -> 2x2 conv -> 4x4


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def proc(tiny_glm4v):
    return get_family("glm4v").load_processor(tiny_glm4v)


@pytest.fixture(scope="module")
def text_proc(tiny_glm4):
    return get_family("glm4").load_processor(tiny_glm4)


@pytest.fixture(scope="module")
def tok(tiny_glm4v) -> Glm4Tokenizer:
    """The tiny tokenizer loaded on its own (independent of the processor's id table)."""
    return Glm4Tokenizer.from_pretrained(tiny_glm4v)


@pytest.fixture(scope="module")
def tid(tok):
    return tok.convert_tokens_to_ids


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


def messages_of(turns):
    """Turns -> build_chat_ids messages; a leading "<image>" becomes the message's image (upstream layout)."""
    out = []
    for t in turns:
        m = {"role": t.role, "content": t.text.replace("<image>", "")}
        if t.text.startswith("<image>"):
            m["image"] = True
        out.append(m)
    return out


def image_run(out):
    """(start, end) of the single run of image positions."""
    idx = out["image_mask"].nonzero().flatten().tolist()
    assert idx == list(range(idx[0], idx[-1] + 1)), "image positions are not contiguous"
    return idx[0], idx[-1] + 1


def collapse(out, tid, key="input_ids"):
    """`key` of an encoding with the expanded image span replaced by the upstream 3-token placeholder
    (<|begin_of_image|><|endoftext|><|end_of_image|>); checks the span's own ids on the way."""
    values = out[key].tolist()
    if not out["image_mask"].any():
        return values
    start, end = image_run(out)
    if key == "input_ids":
        assert values[start:end] == ([tid("<|begin_of_image|>")] + [tid("<|endoftext|>")] * TINY_PATCHES
                                     + [tid("<|end_of_image|>")])
        span = [tid("<|begin_of_image|>"), tid("<|endoftext|>"), tid("<|end_of_image|>")]
    else:
        assert values[start:end] == [IGNORE] * (end - start)
        span = [IGNORE] * 3
    return values[:start] + span + values[end:]


def expected_labels(ids, tid, tok):
    """Labels on an unexpanded upstream layout: for each <|assistant|> the "\\n" after it, the answer and the
    token that follows the answer (the next <|user|> or the appended final one); -100 elsewhere."""
    labels = [IGNORE] * len(ids)
    role_ids = {tid(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")}
    for i, t in enumerate(ids):
        if t != tid("<|assistant|>"):
            continue
        j = i + 1
        while ids[j] not in role_ids:  # "\n" + answer
            labels[j] = ids[j]
            j += 1
        assert ids[j] == tid("<|user|>")
        labels[j] = ids[j]
    return labels


# --- token layout against upstream (build_chat_ids) -------------------------------------------------


def test_text_single_turn_matches_upstream(proc, tok, tid):
    q, a = "What colour is the shape?", "It is red."
    msgs = [{"role": "user", "content": q}]
    prompt = build_chat_ids(tok, msgs, add_generation_prompt=True)
    assert prompt == [tid("[gMASK]"), tid("<sop>"), tid("<|user|>")] + tok.encode("\n") + tok.encode(q) + [
        tid("<|assistant|>")]

    gen = proc.encode([U(q)], [], generation=True)
    assert gen["input_ids"].tolist() == prompt
    assert gen["position_ids"].tolist() == list(range(len(prompt)))
    assert not gen["image_mask"].any() and "images" not in gen

    out = proc.encode([U(q), A(a)], [], source="x:1")
    ids = out["input_ids"].tolist()
    # documented layout: the generation prompt, then "\n" + answer, then the appended <|user|> (eos)
    assert ids[:len(prompt)] == prompt
    assert ids[len(prompt):] == tok.encode("\n") + tok.encode(a) + [tid("<|user|>")]
    # the whole sample = upstream's rendering of the answered conversation + <|user|>
    full = build_chat_ids(tok, msgs + [{"role": "assistant", "content": a}], add_generation_prompt=False)
    assert ids == full + [tid("<|user|>")]
    assert out["position_ids"].tolist() == list(range(len(ids)))
    assert out["truncated"] is False
    assert out["input_ids"].dtype == out["labels"].dtype == out["position_ids"].dtype == torch.long


def test_image_question_matches_upstream(proc, tok, tid):
    q, a = "Where is the shape?", "top left"
    msgs = [{"role": "user", "content": q, "image": True}]
    prompt = build_chat_ids(tok, msgs, add_generation_prompt=True)
    assert prompt == ([tid("[gMASK]"), tid("<sop>"), tid("<|user|>")] + tok.encode("\n")
                      + [tid("<|begin_of_image|>"), tid("<|endoftext|>"), tid("<|end_of_image|>")]
                      + tok.encode(q) + [tid("<|assistant|>")])

    gen = proc.encode([U("<image>" + q)], [noise()], generation=True)
    assert collapse(gen, tid) == prompt
    assert len(gen["input_ids"]) == len(prompt) - 3 + TINY_PATCHES + 2

    out = proc.encode([U("<image>" + q), A(a)], [noise()])
    ids = collapse(out, tid)
    assert ids[:len(prompt)] == prompt
    assert ids[len(prompt):] == tok.encode("\n") + tok.encode(a) + [tid("<|user|>")]
    full = build_chat_ids(tok, msgs + [{"role": "assistant", "content": a}], add_generation_prompt=False)
    assert ids == full + [tid("<|user|>")]


MULTI = [S("You are a careful assistant."), U("What colour is the shape?"), A("red"),
         U("<image>Where is the shape?"), A("in the top left corner"), U("What shape is it?"), A("a circle")]


def test_multi_turn_with_system_matches_upstream(proc, tok, tid):
    msgs = messages_of(MULTI)
    assert [m.get("image", False) for m in msgs] == [False, False, False, True, False, False, False]
    out = proc.encode(MULTI, [noise()])
    ids = collapse(out, tid)
    full = build_chat_ids(tok, msgs, add_generation_prompt=False)
    assert ids == full + [tid("<|user|>")]
    # prefix up to the last <|assistant|> = upstream's generation prompt for the conversation so far
    last = len(ids) - 1 - ids[::-1].index(tid("<|assistant|>"))
    assert ids[:last + 1] == build_chat_ids(tok, msgs[:-1], add_generation_prompt=True)
    assert ids[last + 1:] == tok.encode("\n") + tok.encode("a circle") + [tid("<|user|>")]
    # role tokens in order
    roles = {tid(t): t for t in ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                                 "<|begin_of_image|>", "<|end_of_image|>")}
    assert [roles[i] for i in ids if i in roles] == [
        "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|user|>", "<|begin_of_image|>",
        "<|end_of_image|>", "<|assistant|>", "<|user|>", "<|assistant|>", "<|user|>"]
    # generation for the same conversation minus the last answer
    gen = proc.encode(MULTI[:-1], [noise()], generation=True)
    assert collapse(gen, tid) == build_chat_ids(tok, msgs[:-1], add_generation_prompt=True)


# --- labels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["text", "image", "multi"])
def test_labels_exact(proc, tok, tid, case):
    turns, images = {
        "text": ([U("What colour is the shape?"), A("It is red.")], []),
        "image": ([U("<image>Where is the shape?"), A("top left")], [noise()]),
        "multi": (MULTI, [noise()]),
    }[case]
    out = proc.encode(turns, images)
    ids = collapse(out, tid)
    labels = collapse(out, tid, key="labels")
    assert labels == expected_labels(ids, tid, tok)
    # the same, stated as positions on the expanded sequence
    full_ids, full_labels = out["input_ids"].tolist(), out["labels"].tolist()
    answers = [t.text for t in turns if t.role == "assistant"]
    asst = [i for i, t in enumerate(full_ids) if t == tid("<|assistant|>")]
    assert len(asst) == len(answers)
    targets = []
    for i, a in zip(asst, answers):
        n = len(tok.encode(a))
        assert full_ids[i + 1:i + 2 + n] == tok.encode("\n") + tok.encode(a)
        assert full_ids[i + 2 + n] == tid("<|user|>")
        targets += list(range(i + 1, i + 3 + n))
    assert [i for i, v in enumerate(full_labels) if v != IGNORE] == targets
    assert all(full_labels[i] == full_ids[i] for i in targets)
    assert targets[-1] == len(full_ids) - 1  # the appended <|user|> is the last token and a target
    assert not out["labels"][out["image_mask"]].ne(IGNORE).any()


def test_generation_prompt_ends_with_assistant(proc, tid):
    out = proc.encode([S("Be brief."), U("<image>What is it?")], [noise()], generation=True)
    ids = out["input_ids"].tolist()
    assert ids[-1] == tid("<|assistant|>")  # no "\n": upstream lets the model write the metadata line
    assert "labels" not in out and "truncated" not in out
    # a training encoding of the answered conversation extends it
    full = proc.encode([S("Be brief."), U("<image>What is it?"), A("a cat")], [noise()])
    assert full["input_ids"][:len(ids)].tolist() == ids
    assert torch.equal(full["position_ids"][:len(ids)], out["position_ids"])


# --- image expansion, positions, pixels --------------------------------------------------------------


def test_image_mask_and_positions(proc, tid):
    turns = [S("You look at images."), U("<image>Where is the shape?"), A("top left")]
    out = proc.encode(turns, [noise()])
    ids = out["input_ids"].tolist()
    mask = out["image_mask"]
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == TINY_PATCHES + 2 == 18
    assert proc.image_token_count(out) == 18
    boi, end = image_run(out)
    assert ids[boi] == tid("<|begin_of_image|>") and ids[end - 1] == tid("<|end_of_image|>")
    assert mask.tolist() == [boi <= i < end for i in range(len(ids))]

    unexpanded = len(ids) - TINY_PATCHES + 1  # the upstream prompt holds one <|endoftext|> for the image
    assert len(collapse(out, tid)) == unexpanded
    # upstream: boi keeps its index, every patch gets boi+1, eoi and the text after keep their unexpanded index
    expected = list(range(boi + 1)) + [boi + 1] * TINY_PATCHES + list(range(boi + 2, unexpanded))
    assert out["position_ids"].tolist() == expected
    assert out["position_ids"][-1].item() == unexpanded - 1
    assert out["position_ids"][end - 1].item() == boi + 2  # eoi
    assert out["position_ids"][end].item() == boi + 3  # first text token after the image


def reference_pixels(image: Image.Image, size: int = 112) -> torch.Tensor:
    x = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    x = (x - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


@pytest.mark.parametrize("image", [noise(), noise(40, 200, seed=1).convert("L"), noise(seed=2).convert("RGBA")],
                         ids=["rgb", "grey", "rgba"])
def test_image_tensor_is_bicubic_clip(proc, image):
    out = proc.encode([U("<image>Describe it."), A("noise")], [image])
    pixels = out["images"]
    assert pixels.shape == (1, 3, 112, 112) and pixels.dtype == torch.float32
    ref = reference_pixels(image)
    # fp32 pixels against the float64 reference: measured 2.8e-7 (fp32 rounding of |x| <= 2.2) in every setting
    torch.testing.assert_close(pixels[0].double(), ref, atol=1e-5, rtol=0)
    # the comparison tells resampling filters apart
    other = np.asarray(image.convert("RGB").resize((112, 112), Image.Resampling.BILINEAR), dtype=np.float64) / 255
    other = torch.from_numpy(((other - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1).copy())
    assert (other - ref).abs().max() > 1e-2


# --- errors and truncation ---------------------------------------------------------------------------


def test_two_images_is_an_error(proc):
    with pytest.raises(SampleError) as info:
        proc.encode([U("<image>Compare<image>"), A("same")], [noise(), noise(seed=1)], source="pairs.jsonl:3")
    assert info.value.source == "pairs.jsonl:3"
    assert str(info.value).startswith("pairs.jsonl:3: ")
    with pytest.raises(SampleError):
        proc.encode([U("<image>A"), A("x"), U("<image>B"), A("y")], [noise(), noise(seed=1)], source="p:4")


def test_image_for_the_text_model_is_an_error(text_proc):
    assert text_proc.vision is None
    with pytest.raises(SampleError) as info:
        text_proc.encode([U("<image>What is it?"), A("a cat")], [noise()], source="mixed.jsonl:9")
    assert info.value.source == "mixed.jsonl:9"
    # text-only data is fine for the text model
    out = text_proc.encode([U("What is it?"), A("a cat")], [])
    assert not out["image_mask"].any() and "images" not in out


def test_text_model_layout_matches_upstream(text_proc, tiny_glm4):
    tok = Glm4Tokenizer.from_pretrained(tiny_glm4)
    turns = [S("Be brief."), U("Hello there"), A("Hi"), U("Bye"), A("Bye now")]
    out = text_proc.encode(turns, [])
    msgs = messages_of(turns)
    assert out["input_ids"].tolist() == build_chat_ids(tok, msgs, add_generation_prompt=False) + [
        tok.convert_tokens_to_ids("<|user|>")]
    assert out["labels"].tolist() == expected_labels(out["input_ids"].tolist(), tok.convert_tokens_to_ids, tok)


LONG = "a small red circle in the top left corner of a white square. " * 3


def test_truncation_after_the_image(proc):
    turns = [U("<image>Describe the image."), A(LONG.strip())]
    full = proc.encode(turns, [noise()])
    n = len(full["input_ids"])
    _, end = image_run(full)
    first_target = next(i for i, v in enumerate(full["labels"].tolist()) if v != IGNORE)
    max_length = first_target + 3
    assert end < max_length < n
    out = proc.encode(turns, [noise()], source="d:1", max_length=max_length)
    assert out["truncated"] is True
    for key in ("input_ids", "labels", "position_ids", "image_mask"):
        assert len(out[key]) == max_length, key
        assert torch.equal(out[key], full[key][:max_length]), key
    assert int(out["image_mask"].sum()) == TINY_PATCHES + 2
    assert torch.equal(out["images"], full["images"])
    assert (out["labels"] != IGNORE).sum().item() == 3
    # exactly fitting is not truncation
    same = proc.encode(turns, [noise()], max_length=n)
    assert same["truncated"] is False and torch.equal(same["input_ids"], full["input_ids"])


def test_truncation_inside_the_image_is_an_error(proc):
    turns = [U("<image>Describe the image."), A(LONG.strip())]
    full = proc.encode(turns, [noise()])
    boi, end = image_run(full)
    for max_length in (boi + 1, boi + 5, end - 1):  # after boi, among the patches, just before eoi
        with pytest.raises(SampleError) as info:
            proc.encode(turns, [noise()], source="data.jsonl:7", max_length=max_length)
        assert info.value.source == "data.jsonl:7"
        assert f"data.max_length={max_length}" in info.value.reason


# --- collate and forward -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def items(proc):
    return [
        proc.encode([U("What colour is the shape?"), A("red")], []),
        proc.encode([U("<image>Where is the shape?"), A("top left")], [noise()]),
        proc.encode([S("You are helpful."), U("Hello! How can I help you today?"), A("Yes"), U("Ok"), A("Fine")],
                    []),
        proc.encode([U("<image>What shape is it?"), A("a square")], [noise(60, 60, seed=3)]),
    ]


@pytest.mark.parametrize("pad_left", [False, True])
def test_collate_padding(proc, tok, items, pad_left):
    batch = proc.collate(items, pad_left=pad_left)
    lengths = [len(x["input_ids"]) for x in items]
    width = max(lengths)
    assert len(set(lengths)) > 1
    for key in ("input_ids", "labels", "attention_mask", "position_ids", "image_mask"):
        assert batch[key].shape == (4, width), key
    assert batch["image_mask"].dtype == torch.bool
    assert proc.pad_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    for row, (x, n) in enumerate(zip(items, lengths)):
        keep = slice(width - n, width) if pad_left else slice(0, n)
        pad = slice(0, width - n) if pad_left else slice(n, width)
        for key in ("input_ids", "labels", "position_ids", "image_mask"):
            assert batch[key][row, keep].tolist() == x[key].tolist(), key
        assert batch["attention_mask"][row, keep].tolist() == [1] * n
        assert batch["attention_mask"][row, pad].tolist() == [0] * (width - n)
        assert batch["input_ids"][row, pad].tolist() == [proc.pad_id] * (width - n)
        assert batch["labels"][row, pad].tolist() == [IGNORE] * (width - n)
        assert batch["position_ids"][row, pad].tolist() == [0] * (width - n)
        assert batch["image_mask"][row, pad].tolist() == [False] * (width - n)
    assert batch["attention_mask"].sum().item() == sum(lengths)
    # images only from the samples that have them, in batch order
    assert batch["images"].shape == (2, 3, 112, 112)
    assert torch.equal(batch["images"], torch.cat([items[1]["images"], items[3]["images"]]))
    assert batch["image_mask"].sum().item() == 2 * (TINY_PATCHES + 2)


def test_collate_text_only_and_generation(proc, tid):
    batch = proc.collate([proc.encode([U("Hi")], [], generation=True),
                          proc.encode([U("<image>What is shown in this image?")], [noise()], generation=True)],
                         pad_left=True)
    assert "labels" not in batch
    assert batch["input_ids"][:, -1].tolist() == [tid("<|assistant|>")] * 2
    assert batch["images"].shape == (1, 3, 112, 112)
    text = proc.collate([proc.encode([U("Hi")], []), proc.encode([U("Hello there")], [])])
    assert "images" not in text and not text["image_mask"].any()


@pytest.fixture(scope="module")
def model(tiny_glm4v):
    return get_family("glm4v").load_model(tiny_glm4v)


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
    # summation order only: measured 1.9e-5 of ~134 (1.4e-7) relative, 1 and 2 threads, AVX-512 and AVX2 (scripts/
    # measure_tolerances.py); bound 1e-6 relative (7x)
    assert loss.item() == pytest.approx(sum(single), rel=1e-6)


# --- tiny checkpoint layout --------------------------------------------------------------------------

OFFICIAL_FIRST_SPECIAL_ID = 151329


def official_specials() -> dict[int, str]:
    cfg = json.loads((REF / "glm4" / "tokenizer_config.json").read_text())
    return {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()}


@pytest.mark.parametrize("family, ref", [("glm4v", "glm-4v-9b"), ("glm4", "glm-4-9b-chat")])
def test_config_json_has_official_keys(request, family, ref):
    path = request.getfixturevalue(f"tiny_{family}")
    tiny = json.loads((path / "config.json").read_text())
    official = json.loads((REF / ref / "config.json").read_text())
    assert "auto_map" in official and "auto_map" not in tiny
    missing = set(official) - {"auto_map"} - set(tiny)
    assert not missing
    # architecture switches are the official values (only sizes and token ids differ)
    for key in ("model_type", "architectures", "add_bias_linear", "add_qkv_bias", "apply_query_key_layer_scaling",
                "apply_residual_connection_post_layernorm", "attention_softmax_in_fp32", "layernorm_epsilon",
                "multi_query_attention", "original_rope", "post_layer_norm", "rmsnorm", "tie_word_embeddings"):
        assert tiny[key] == official[key], key
    if family == "glm4v":
        assert set(tiny["vision_config"]) == set(official["vision_config"])
        for key in ("hidden_act", "in_channels", "patch_size", "layer_norm_eps", "scaling_factor"):
            assert tiny["vision_config"][key] == official["vision_config"][key], key
        v = tiny["vision_config"]
        assert v["num_positions"] == (v["image_size"] // v["patch_size"]) ** 2 + 1
        assert "rope_ratio" not in tiny and "rope_ratio" not in official  # = 1 upstream
        # the reference copy carries sophgo's edit seq_length 2048; the official value is 8192 (SOURCES.md)
        assert official["seq_length"] == 2048 and tiny["seq_length"] == 8192
    else:
        assert tiny["rope_ratio"] == official["rope_ratio"] == 500
        assert tiny["seq_length"] == official["seq_length"] == 131072
        assert "vision_config" not in tiny and "boi_token_id" not in tiny
        gen = json.loads((path / "generation_config.json").read_text())
        official_gen = json.loads((REF / ref / "generation_config.json").read_text())
        assert set(official_gen) - {"transformers_version"} == set(gen)
        assert (gen["eos_token_id"], gen["pad_token_id"]) == (tiny["eos_token_id"], tiny["pad_token_id"])
        for key in ("do_sample", "temperature", "max_length", "top_p"):
            assert gen[key] == official_gen[key], key


@pytest.mark.parametrize("family, ref", [("glm4v", "glm-4v-9b"), ("glm4", "glm-4-9b-chat")])
def test_token_ids_follow_the_official_order(request, family, ref):
    path = request.getfixturevalue(f"tiny_{family}")
    tiny = json.loads((path / "config.json").read_text())
    official = json.loads((REF / ref / "config.json").read_text())
    tok = Glm4Tokenizer.from_pretrained(path)
    names = official_specials()
    assert sorted(names) == list(range(OFFICIAL_FIRST_SPECIAL_ID, OFFICIAL_FIRST_SPECIAL_ID + 14))
    # config ids = the tiny tokenizer's ids of the tokens the official ids name
    assert tiny["eos_token_id"] == [tok.convert_tokens_to_ids(names[i]) for i in official["eos_token_id"]]
    assert tiny["pad_token_id"] == tok.convert_tokens_to_ids(names[official["pad_token_id"]])
    assert tok.pad_token_id == tiny["pad_token_id"] and tok.eos_token_id == tiny["eos_token_id"][0]
    if family == "glm4v":
        for key in ("boi_token_id", "eoi_token_id"):
            assert tiny[key] == tok.convert_tokens_to_ids(names[official[key]]), key
        assert (tiny["boi_token_id"], tiny["eoi_token_id"]) == (
            tok.convert_tokens_to_ids("<|begin_of_image|>"), tok.convert_tokens_to_ids("<|end_of_image|>"))
    # consecutive, official order, right after the BPE ranks: official id 151329 + k -> first + k
    first = tok.vocab_size
    for official_id, name in names.items():
        assert tok.convert_tokens_to_ids(name) == first + official_id - OFFICIAL_FIRST_SPECIAL_ID, name
        assert tok.encode(name, allowed_special="all") == [tok.convert_tokens_to_ids(name)]
    assert len(tok) == first + len(names)
    # the embedding covers the vocabulary, padded to a multiple of 64 like the official 151552
    assert official["padded_vocab_size"] % 64 == 0 and tiny["padded_vocab_size"] % 64 == 0
    assert len(tok) <= tiny["padded_vocab_size"] < len(tok) + 64
    tcfg = json.loads((path / "tokenizer_config.json").read_text())
    assert {int(k): v["content"] for k, v in tcfg["added_tokens_decoder"].items()} == {
        first + i - OFFICIAL_FIRST_SPECIAL_ID: n for i, n in names.items()}
    ocfg = json.loads((REF / "glm4" / "tokenizer_config.json").read_text())
    assert set(ocfg) - {"auto_map", "image_size"} <= set(tcfg) and "auto_map" not in tcfg
    assert tcfg["additional_special_tokens"] == ocfg["additional_special_tokens"]
    assert (tcfg.get("image_size") is not None) == (family == "glm4v")


def shard_contents(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    out = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                assert key not in out, f"{key} stored twice"
                out[key] = (shard.name, tuple(f.get_slice(key).get_shape()))
    return out


@pytest.mark.parametrize("family", ["glm4v", "glm4"])
def test_safetensors_index_covers_the_model(request, family):
    path = request.getfixturevalue(f"tiny_{family}")
    fam = get_family(family)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    n = len(shards)
    assert n >= 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (path / "model.safetensors").exists()
    stored = shard_contents(path)
    assert {k: f for k, (f, _) in stored.items()} == weight_map  # the index says where each tensor is
    model = fam.build_model(path, meta=True)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # parameters and buffers
    assert {k for k, _ in model.named_buffers()} == {"transformer.rotary_pos_emb.inv_freq"}
    assert {k: s for k, (_, s) in stored.items()} == expected
    assert index["metadata"]["total_size"] == sum(np.prod(s) for s in expected.values()) * 4  # fp32
    has_vision = any(k.startswith("transformer.vision.") for k in weight_map)
    assert has_vision == (family == "glm4v")


@pytest.mark.parametrize("family", ["glm4v", "glm4"])
def test_load_model_is_strict_and_exact(request, family):
    from safetensors.torch import load_file

    path = request.getfixturevalue(f"tiny_{family}")
    model = get_family(family).load_model(path)
    assert not model.training
    state = model.state_dict()
    seen = set()
    for shard in sorted(path.glob("model-*.safetensors")):
        for key, tensor in load_file(str(shard)).items():
            assert state[key].dtype == torch.float32
            assert torch.equal(state[key], tensor), key
            seen.add(key)
    assert seen == set(state)


def _edit_shard(path: Path, shard: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / shard))
    edit(tensors)
    save_file(tensors, str(path / shard), metadata={"format": "pt"})


@pytest.mark.parametrize("fault", ["missing", "extra", "shape"])
def test_broken_checkpoint_names_tensor_and_file(tiny_glm4v, tmp_path, fault):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_glm4v, ckpt)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    shard = "model-00002-of-00003.safetensors"
    assert shard in weight_map.values()
    victim = sorted(k for k, f in weight_map.items() if f == shard)[0]
    if fault == "missing":  # gone from the shard; the index still says it is there
        _edit_shard(ckpt, shard, lambda t: t.pop(victim))
    elif fault == "extra":
        victim = "transformer.encoder.layers.7.mlp.dense_4h_to_h.weight"
        _edit_shard(ckpt, shard, lambda t: t.__setitem__(victim, torch.zeros(64, 128)))
        weight_map[victim] = shard
        index_path.write_text(json.dumps(index))
    else:
        _edit_shard(ckpt, shard, lambda t: t.__setitem__(victim, torch.zeros(*t[victim].shape, 2)))
    with pytest.raises(ValueError) as info:
        get_family("glm4v").load_model(ckpt)
    message = str(info.value)
    assert victim in message
    assert shard in message
