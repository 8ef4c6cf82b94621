"""GLM-4.1V family: chat-format token layout, labels, truncation, collate; tiny-checkpoint layout facts;
`normalize_config` on the official flat config.json.

Official facts are embedded as literals (CI has no copy of the official checkpoint files).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from glmtune.data.sample import SampleError, Turn
from glmtune.models import get_family

IGNORE = -100

# zai-org/GLM-4.1V-9B-Thinking tokenizer_config.json `added_tokens_decoder`: ids 151329.. in this order.
OFFICIAL_FIRST_SPECIAL_ID = 151329
OFFICIAL_SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>", "<answer>", "</answer>",
    "<|begin_of_box|>", "<|end_of_box|>", "<|sep|>",
]
OFFICIAL_ADDITIONAL_SPECIAL_TOKENS = OFFICIAL_SPECIAL_TOKENS[:16]

# zai-org/GLM-4.1V-9B-Thinking config.json (the flat layout written by transformers 4.53).
OFFICIAL_FLAT_CONFIG = {
    "architectures": ["Glm4vForConditionalGeneration"],
    "model_type": "glm4v",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338, 151348],
    "image_start_token_id": 151339,
    "image_end_token_id": 151340,
    "video_start_token_id": 151341,
    "video_end_token_id": 151342,
    "image_token_id": 151343,
    "video_token_id": 151344,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 13696,
    "max_position_embeddings": 65536,
    "num_attention_heads": 32,
    "num_hidden_layers": 40,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.53.0dev",
    "use_cache": True,
    "vocab_size": 151552,
    "partial_rotary_factor": 0.5,
    "vision_config": {
        "hidden_size": 1536,
        "depth": 24,
        "num_heads": 12,
        "attention_bias": False,
        "intermediate_size": 13696,
        "hidden_act": "silu",
        "hidden_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "image_size": 336,
        "patch_size": 14,
        "out_hidden_size": 4096,
        "rms_norm_eps": 1e-05,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "default", "mrope_section": [8, 12, 12]},
}

# zai-org/GLM-4.1V-9B-Thinking preprocessor_config.json
OFFICIAL_PREPROCESSOR = {
    "size": {"shortest_edge": 12544, "longest_edge": 9633792},
    "do_rescale": True,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Glm4vImageProcessor",
    "processor_class": "Glm4vProcessor",
}

# Official flat keys of the text model: in the nested layout they live in `text_config`.
FLAT_TEXT_KEYS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "attention_dropout", "attention_bias", "pad_token_id", "eos_token_id",
]
TOKEN_ID_KEYS = {
    "image_start_token_id": "<|begin_of_image|>", "image_end_token_id": "<|end_of_image|>",
    "video_start_token_id": "<|begin_of_video|>", "video_end_token_id": "<|end_of_video|>",
    "image_token_id": "<|image|>", "video_token_id": "<|video|>",
}


@pytest.fixture(scope="module")
def proc(tiny_glm41v):
    return get_family("glm41v").load_processor(tiny_glm41v)


@pytest.fixture(scope="module")
def tid(proc):
    """token string -> id, straight from the tokenizer (independent of the processor's own table)."""
    def f(token: str) -> int:
        i = proc.tokenizer.convert_tokens_to_ids(token)
        assert isinstance(i, int) and i != proc.tokenizer.unk_token_id
        return i
    return f


def square():
    return Image.new("RGB", (112, 112), (255, 255, 255))  # -> grid (1, 8, 8) -> 16 image tokens


def wide():
    return Image.new("RGB", (200, 100), (20, 50, 220))  # -> grid (1, 4, 10) -> 10 image tokens


def U(text):
    return Turn("user", text)


def A(text):
    return Turn("assistant", text)


def S(text):
    return Turn("system", text)


def template_ids(proc, messages, generation):
    """Token ids of the official chat_template.jinja rendering (the tiny checkpoint ships the official file)."""
    text = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return proc.tokenizer.encode(text, add_special_tokens=False)


def expand_images(ids, image_id, counts):
    """Replace the k-th single `<|image|>` of a template rendering by counts[k] copies."""
    out, k = [], 0
    for i in ids:
        if i == image_id:
            out += [image_id] * counts[k]
            k += 1
        else:
            out.append(i)
    assert k == len(counts)
    return out


def label_runs(labels):
    """Contiguous runs of labelled positions as (start, end) pairs."""
    runs, start = [], None
    for i, v in enumerate(labels.tolist() + [IGNORE]):
        if v != IGNORE and start is None:
            start = i
        elif v == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


# --- token layout ----------------------------------------------------------------------------------


def test_text_single_turn_layout(proc, tid):
    q, a = "What colour is the shape?", "red"
    out = proc.encode([U(q), A(a)], [], source="x:1")
    nl = proc.tokenizer.encode("\n", add_special_tokens=False)
    assert nl == [proc.tokenizer.convert_tokens_to_ids("Ċ")]
    qa = proc.tokenizer.encode(q, add_special_tokens=False)
    aa = proc.tokenizer.encode(a, add_special_tokens=False)
    expected = ([tid("[gMASK]"), tid("<sop>"), tid("<|user|>")] + nl + qa + [tid("<|assistant|>")] + nl + aa
                + [tid("<|user|>")])
    assert out["input_ids"].tolist() == expected
    assert out["input_ids"].dtype == torch.long
    # targets: the answer and the <|user|> that ends it
    n_prompt = len(expected) - len(aa) - 1
    assert out["labels"].tolist() == [IGNORE] * n_prompt + aa + [tid("<|user|>")]
    assert out["mm_token_type_ids"].tolist() == [0] * len(expected)
    assert "pixel_values" not in out and "image_grid_thw" not in out
    assert out["truncated"] is False
    # same ids as the official chat template (which stops before the closing <|user|>)
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    assert template_ids(proc, messages, generation=False) == expected[:-1]
    assert proc.tokenizer.convert_ids_to_tokens(expected) == [
        "[gMASK]", "<sop>", "<|user|>", "Ċ", "What", "Ġcolou", "r", "Ġis", "Ġthe", "Ġshape", "?",
        "<|assistant|>", "Ċ", "red", "<|user|>"]


def test_image_conversation_layout(proc, tid):
    q, a = "Where is the shape?", "top left"
    out = proc.encode([U("<image>" + q), A(a)], [square()], source="x:2")
    ids = out["input_ids"].tolist()
    grid = out["image_grid_thw"].tolist()
    assert grid == [[1, 8, 8]]
    n_image = 1 * 8 * 8 // 4
    assert n_image == 16
    assert out["pixel_values"].shape == (1 * 8 * 8, 3 * 2 * 14 * 14)  # patches x (C * T * P * P)
    nl = proc.text("\n")
    expected = ([tid("[gMASK]"), tid("<sop>"), tid("<|user|>")] + nl
                + [tid("<|begin_of_image|>")] + [tid("<|image|>")] * n_image + [tid("<|end_of_image|>")]
                + proc.text(q) + [tid("<|assistant|>")] + nl + proc.text(a) + [tid("<|user|>")])
    assert ids == expected
    # mm_token_type_ids marks exactly the <|image|> tokens (1 = image)
    mm = out["mm_token_type_ids"]
    assert mm.dtype == torch.int32
    assert mm.tolist() == [int(i == tid("<|image|>")) for i in ids]
    assert mm.sum().item() == n_image
    first = ids.index(tid("<|image|>"))
    assert ids[first - 1] == tid("<|begin_of_image|>") and ids[first + n_image] == tid("<|end_of_image|>")
    # labels
    labels = out["labels"].tolist()
    assert [i for i, v in enumerate(labels) if v != IGNORE] == list(range(len(ids) - len(proc.text(a)) - 1, len(ids)))
    assert proc.decode([v for v in labels if v != IGNORE]) == a
    # official template: the image content item renders as a single <|image|>
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": a}]
    assert expand_images(template_ids(proc, messages, False), tid("<|image|>"), [n_image]) == ids[:-1]


def test_image_token_count_follows_grid(proc, tid):
    out = proc.encode([U("<image>Describe the image.<image>"), A("blue")], [wide(), square()])
    grids = out["image_grid_thw"].tolist()
    assert grids == [[1, 4, 10], [1, 8, 8]]
    counts = [t * h * w // 4 for t, h, w in grids]
    assert counts == [10, 16]
    ids = out["input_ids"].tolist()
    assert ids.count(tid("<|image|>")) == sum(counts) == out["mm_token_type_ids"].sum().item()
    assert ids.count(tid("<|begin_of_image|>")) == ids.count(tid("<|end_of_image|>")) == 2
    # each span has its own image's count, in order
    spans = re.findall(r"B(I+)E", "".join(
        "B" if i == tid("<|begin_of_image|>") else "E" if i == tid("<|end_of_image|>")
        else "I" if i == tid("<|image|>") else "." for i in ids))
    assert [len(s) for s in spans] == counts
    assert out["pixel_values"].shape[0] == sum(t * h * w for t, h, w in grids) == 104
    assert proc.image_token_count(out) == 26


def test_multi_turn_with_system(proc, tid):
    turns = [S("You are helpful."), U("What colour is the shape?"), A("red"),
             U("<image>Where is the shape?"), A("top left"), U("What shape is it?"), A("circle")]
    out = proc.encode(turns, [square()])
    ids = out["input_ids"].tolist()
    special = {tid(t): t for t in OFFICIAL_SPECIAL_TOKENS}
    specials = [special[i] for i in ids if i in special and i != tid("<|image|>")]
    assert specials == ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|user|>",
                        "<|begin_of_image|>", "<|end_of_image|>", "<|assistant|>", "<|user|>", "<|assistant|>",
                        "<|user|>"]
    nl = proc.text("\n")
    assert ids[:4] == [tid("[gMASK]"), tid("<sop>"), tid("<|system|>")] + nl
    assert ids.count(tid("<|image|>")) == 16 == out["mm_token_type_ids"].sum().item()
    # each <|assistant|> and <|user|>/<|system|> role token is followed by a newline
    for role in ("<|system|>", "<|user|>", "<|assistant|>"):
        for i, t in enumerate(ids[:-1]):
            if t == tid(role):
                assert ids[i + 1] == nl[0], role
    # labels: three runs, each = answer + <|user|>, each right after "<|assistant|>\n"
    labels = out["labels"]
    runs = label_runs(labels)
    answers = ["red", "top left", "circle"]
    assert len(runs) == 3
    for (start, end), answer in zip(runs, answers):
        assert ids[start - 2:start] == [tid("<|assistant|>")] + nl
        assert labels[start:end].tolist() == ids[start:end] == proc.text(answer) + [tid("<|user|>")]
        assert proc.decode(labels[start:end].tolist()) == answer
    assert runs[-1][1] == len(ids)  # the final <|user|> is appended and labelled
    assert (labels == IGNORE).sum().item() == len(ids) - sum(len(proc.text(a)) + 1 for a in answers)
    # official template for the same conversation (generation prompt = everything before the last answer)
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "What colour is the shape?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the shape?"}]},
                {"role": "assistant", "content": "top left"},
                {"role": "user", "content": "What shape is it?"}, {"role": "assistant", "content": "circle"}]
    assert expand_images(template_ids(proc, messages, False), tid("<|image|>"), [16]) == ids[:-1]


def test_generation_prompt(proc, tid):
    turns = [S("You are helpful."), U("<image>What shape is it?")]
    out = proc.encode(turns, [square()], generation=True)
    ids = out["input_ids"].tolist()
    assert ids[-2:] == [tid("<|assistant|>")] + proc.text("\n")
    assert "labels" not in out and "truncated" not in out
    assert out["mm_token_type_ids"].sum().item() == 16
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    assert expand_images(template_ids(proc, messages, True), tid("<|image|>"), [16]) == ids
    # a training encode of the answered conversation starts with the generation prompt
    full = proc.encode(turns + [A("circle")], [square()])["input_ids"].tolist()
    assert full[:len(ids)] == ids
    assert full[len(ids):] == proc.text("circle") + [tid("<|user|>")]


# --- truncation ------------------------------------------------------------------------------------

LONG = "a small red circle in the top left corner. " * 4


def test_truncation_after_the_image(proc, tid):
    turns = [U("<image>Describe the image."), A(LONG.strip())]
    full = proc.encode(turns, [square()])
    n = len(full["input_ids"])
    eoi = full["input_ids"].tolist().index(tid("<|end_of_image|>"))
    first_target = next(i for i, v in enumerate(full["labels"].tolist()) if v != IGNORE)
    max_length = first_target + 5
    assert eoi + 1 < max_length < n
    out = proc.encode(turns, [square()], max_length=max_length)
    assert out["truncated"] is True
    assert len(out["input_ids"]) == len(out["labels"]) == len(out["mm_token_type_ids"]) == max_length
    assert out["input_ids"].tolist() == full["input_ids"][:max_length].tolist()
    assert out["labels"].tolist() == full["labels"][:max_length].tolist()
    assert (out["labels"] != IGNORE).sum().item() == 5
    assert out["mm_token_type_ids"].sum().item() == 16
    assert torch.equal(out["pixel_values"], full["pixel_values"])
    # exactly fitting is not truncation
    same = proc.encode(turns, [square()], max_length=n)
    assert same["truncated"] is False and len(same["input_ids"]) == n


def test_truncation_inside_the_image_is_an_error(proc, tid):
    turns = [U("<image>Describe the image."), A(LONG.strip())]
    full = proc.encode(turns, [square()])["input_ids"].tolist()
    last_image = len(full) - 1 - full[::-1].index(tid("<|image|>"))
    for max_length in (10, last_image + 1):  # inside the image, between the last image token and <|end_of_image|>
        with pytest.raises(SampleError) as info:
            proc.encode(turns, [square()], source="data.jsonl:7", max_length=max_length)
        assert info.value.source == "data.jsonl:7"
        assert f"data.max_length={max_length}" in info.value.reason
        assert "16 image tokens" in info.value.reason


def test_truncation_losing_every_answer_is_an_error(proc):
    turns = [U("Describe the image. " * 3), A("red")]
    n = len(proc.encode(turns, [])["input_ids"])
    with pytest.raises(SampleError):
        proc.encode(turns, [], max_length=n - 2)  # only the answer and the closing <|user|> are cut
    out = proc.encode(turns, [], max_length=n - 1)  # the answer survives, its <|user|> does not
    assert out["truncated"] is True and (out["labels"] != IGNORE).sum().item() == 1


def test_generation_never_truncates(proc):
    turns = [U("Describe the image. " * 3)]
    n = len(proc.encode(turns, [], generation=True)["input_ids"])
    with pytest.raises(SampleError):
        proc.encode(turns, [], generation=True, max_length=n - 1)


# --- collate ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def items(proc):
    return [
        proc.encode([U("What colour is the shape?"), A("red")], []),
        proc.encode([U("<image>Where is the shape?"), A("top left")], [square()]),
        proc.encode([S("You are helpful."), U("Hello! How can I help you today?"), A("Yes")], []),
        proc.encode([U("<image>What shape is it?"), A("square")], [wide()]),
    ]


@pytest.mark.parametrize("pad_left", [False, True])
def test_collate_padding(proc, items, pad_left):
    for x in items:
        x.pop("truncated", None)
    batch = proc.collate(items, pad_left=pad_left)
    lengths = [len(x["input_ids"]) for x in items]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, width)
    assert batch["mm_token_type_ids"].shape == (4, width)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for row, (x, n) in enumerate(zip(items, lengths)):
        keep = slice(width - n, width) if pad_left else slice(0, n)
        pad = slice(0, width - n) if pad_left else slice(n, width)
        assert batch["input_ids"][row, keep].tolist() == x["input_ids"].tolist()
        assert batch["labels"][row, keep].tolist() == x["labels"].tolist()
        assert batch["mm_token_type_ids"][row, keep].tolist() == x["mm_token_type_ids"].tolist()
        assert batch["attention_mask"][row, keep].tolist() == [1] * n
        assert batch["attention_mask"][row, pad].tolist() == [0] * (width - n)
        assert batch["input_ids"][row, pad].tolist() == [proc.pad_id] * (width - n)
        assert batch["labels"][row, pad].tolist() == [IGNORE] * (width - n)
        assert batch["mm_token_type_ids"][row, pad].tolist() == [0] * (width - n)
    assert batch["attention_mask"].sum().item() == sum(lengths)
    # images only from the samples that have them, in batch order
    assert torch.equal(batch["pixel_values"], torch.cat([items[1]["pixel_values"], items[3]["pixel_values"]]))
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 10]]
    assert batch["mm_token_type_ids"].sum().item() == 16 + 10


def test_collate_text_only_and_pad_id(proc, tid):
    batch = proc.collate([proc.encode([U("Hello!"), A("Yes")], []),
                          proc.encode([U("What is shown in this image?"), A("no")], [])])
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    assert proc.pad_id == tid("<|endoftext|>")
    gen = proc.collate([proc.encode([U("Hello!")], [], generation=True),
                        proc.encode([U("What is shown in this image?")], [], generation=True)], pad_left=True)
    assert "labels" not in gen
    assert gen["input_ids"][:, -2:].tolist() == [[tid("<|assistant|>")] + proc.text("\n")] * 2


def test_collated_batch_runs_through_the_tiny_model(tiny_glm41v, proc, items):
    model = get_family("glm41v").load_model(tiny_glm41v)
    batch = proc.collate(items)
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)  # measured equal in every setting


# --- tiny checkpoint layout ------------------------------------------------------------------------


def test_special_tokens_official_order_and_offsets(tiny_glm41v, proc, tid):
    first = tid("<|endoftext|>")
    for k, token in enumerate(OFFICIAL_SPECIAL_TOKENS):
        assert tid(token) - first == k, token
        # the same offset as in the official tokenizer
        assert tid(token) - first == (OFFICIAL_FIRST_SPECIAL_ID + k) - OFFICIAL_FIRST_SPECIAL_ID
    assert first + len(OFFICIAL_SPECIAL_TOKENS) == len(proc.tokenizer)  # the specials close the vocabulary
    # every special token is one token, never split, and decodes away with skip_special_tokens
    for token in OFFICIAL_SPECIAL_TOKENS:
        assert proc.tokenizer.encode(token, add_special_tokens=False) == [tid(token)]
        assert proc.decode([tid(token)]) == ""
    cfg = json.loads((tiny_glm41v / "tokenizer_config.json").read_text())
    assert {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()} == {
        first + k: t for k, t in enumerate(OFFICIAL_SPECIAL_TOKENS)}
    assert all(v["special"] for v in cfg["added_tokens_decoder"].values())
    assert cfg["additional_special_tokens"] == OFFICIAL_ADDITIONAL_SPECIAL_TOKENS
    assert (cfg["eos_token"], cfg["pad_token"], cfg["padding_side"]) == ("<|endoftext|>", "<|endoftext|>", "left")
    # the processor's own table agrees
    assert proc.ids == {"gmask": tid("[gMASK]"), "sop": tid("<sop>"), "system": tid("<|system|>"),
                        "user": tid("<|user|>"), "assistant": tid("<|assistant|>"),
                        "boi": tid("<|begin_of_image|>"), "eoi": tid("<|end_of_image|>"),
                        "image": tid("<|image|>"), "eos": tid("<|endoftext|>")}


def test_config_json_layout(tiny_glm41v, tid):
    cfg = json.loads((tiny_glm41v / "config.json").read_text())
    assert cfg["architectures"] == ["Glm4vForConditionalGeneration"]
    assert cfg["model_type"] == "glm4v"
    assert cfg["tie_word_embeddings"] is False
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert text["model_type"] == "glm4v_text" and vision["model_type"] == "glm4v_vision"
    # nested layout: the official flat text keys all live in text_config, none at the top level
    for key in FLAT_TEXT_KEYS:
        assert key in text, key
        assert key not in cfg, key
    for key in ("rope_theta", "partial_rotary_factor", "rope_scaling"):
        assert key not in cfg and key not in text
    assert text["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == (
        text["hidden_size"] // text["num_attention_heads"] * text["rope_parameters"]["partial_rotary_factor"])
    # the official vision keys are all there (hidden_dropout_prob is gone from transformers 5's config)
    assert set(OFFICIAL_FLAT_CONFIG["vision_config"]) - {"hidden_dropout_prob"} <= set(vision)
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (14, 2, 2)
    # the other official top-level keys stay top-level
    top = set(OFFICIAL_FLAT_CONFIG) - set(FLAT_TEXT_KEYS) - {
        "rope_theta", "partial_rotary_factor", "rope_scaling", "torch_dtype", "transformers_version"}
    assert top <= set(cfg)
    # token ids are the tokenizer's, at the official offsets
    first = tid("<|endoftext|>")
    for key, token in TOKEN_ID_KEYS.items():
        assert cfg[key] == tid(token), key
        assert cfg[key] - first == OFFICIAL_FLAT_CONFIG[key] - OFFICIAL_FIRST_SPECIAL_ID, key
    assert text["pad_token_id"] - first == OFFICIAL_FLAT_CONFIG["pad_token_id"] - OFFICIAL_FIRST_SPECIAL_ID
    assert [i - first for i in text["eos_token_id"]] == [
        i - OFFICIAL_FIRST_SPECIAL_ID for i in OFFICIAL_FLAT_CONFIG["eos_token_id"]]
    assert text["eos_token_id"] == [tid("<|endoftext|>"), tid("<|user|>"), tid("<|observation|>"), tid("</answer>")]
    # vocab covers every token and is padded to a multiple of 64 like the official 151552
    assert text["vocab_size"] % 64 == 0 and OFFICIAL_FLAT_CONFIG["vocab_size"] % 64 == 0
    assert first + len(OFFICIAL_SPECIAL_TOKENS) <= text["vocab_size"] < first + len(OFFICIAL_SPECIAL_TOKENS) + 64
    gen = json.loads((tiny_glm41v / "generation_config.json").read_text())
    assert gen["eos_token_id"] == text["eos_token_id"] and gen["pad_token_id"] == first
    assert get_family("glm41v").build_config(tiny_glm41v).text_config.eos_token_id == text["eos_token_id"]


def test_preprocessor_and_template_files(tiny_glm41v):
    pre = json.loads((tiny_glm41v / "preprocessor_config.json").read_text())
    assert set(pre) == set(OFFICIAL_PREPROCESSOR)
    for key in ("do_rescale", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                "image_processor_type", "processor_class"):
        assert pre[key] == OFFICIAL_PREPROCESSOR[key], key
    template = (tiny_glm41v / "chat_template.jinja").read_text()
    assert template.startswith("[gMASK]<sop>")
    assert template.endswith("{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tiny_glm41v / f).is_file()


def test_safetensors_index(tiny_glm41v):
    from safetensors import safe_open
    from transformers import Glm4vForConditionalGeneration

    index = json.loads((tiny_glm41v / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 2
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tiny_glm41v / "model.safetensors").exists()
    stored = {}
    for shard in shards:
        assert (tiny_glm41v / shard).is_file()
        with safe_open(str(tiny_glm41v / shard), "pt") as f:
            for key in f.keys():
                assert weight_map[key] == shard
                stored[key] = tuple(f.get_slice(key).get_shape())
    assert set(stored) == set(weight_map)
    with torch.device("meta"):
        model = Glm4vForConditionalGeneration(get_family("glm41v").build_config(tiny_glm41v))
    params = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert stored == params  # every parameter, official names, right shapes, nothing extra
    assert index["metadata"]["total_parameters"] == sum(p.numel() for p in model.parameters())
    # official names
    assert "lm_head.weight" in stored and "model.language_model.embed_tokens.weight" in stored
    assert "model.visual.patch_embed.proj.weight" in stored and "model.visual.merger.proj.weight" in stored
    assert not any(k.startswith(("transformer.", "model.layers.")) for k in stored)


# --- normalize_config on the official flat config --------------------------------------------------


def test_normalize_official_flat_config():
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    from glmtune.models.glm41v.api import normalize_config

    raw = json.loads(json.dumps(OFFICIAL_FLAT_CONFIG))
    norm = normalize_config(raw)
    assert raw == OFFICIAL_FLAT_CONFIG  # input not modified
    text = norm["text_config"]
    assert text["model_type"] == "glm4v_text"
    assert text["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                       "mrope_section": [8, 12, 12]}
    for key in FLAT_TEXT_KEYS:
        assert text[key] == OFFICIAL_FLAT_CONFIG[key] and key not in norm
    assert normalize_config(norm) is norm  # already nested: unchanged

    config = Glm4vConfig(**{k: v for k, v in norm.items()
                            if k not in ("architectures", "transformers_version", "model_type")})
    with torch.device("meta"):
        model = Glm4vForConditionalGeneration(config)
    tc = model.config.text_config
    assert len(model.model.language_model.layers) == tc.num_hidden_layers == 40
    assert tc.hidden_size == 4096 and tc.vocab_size == 151552
    assert tc.num_key_value_heads == 2 and tc.intermediate_size == 13696
    assert tc.eos_token_id == [151329, 151336, 151338, 151348] and tc.pad_token_id == 151329
    assert tc.rope_parameters["mrope_section"] == [8, 12, 12]
    assert tc.rope_parameters["partial_rotary_factor"] == 0.5
    assert model.config.image_token_id == 151343
    assert model.config.vision_config.depth == 24 and model.config.vision_config.hidden_size == 1536
    assert tuple(model.lm_head.weight.shape) == (151552, 4096)
    assert tuple(model.model.language_model.embed_tokens.weight.shape) == (151552, 4096)

    # text parameters by hand: embeddings + lm_head + 40 x (q,k,v with bias; o; gate_up; down; 4 norms) + norm
    h, kv, ffn, v = 4096, 2 * 128, 13696, 151552
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + h * 2 * ffn + ffn * h + 4 * h
    text_params = 2 * v * h + 40 * layer + h
    counted_text = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.visual"))
    assert counted_text == text_params == 9_400_279_040
    total = sum(p.numel() for p in model.parameters())
    assert total == 10_292_777_472  # ~10.3e9: GLM-4.1V-9B's published size
    assert 10.29e9 < total < 10.30e9
