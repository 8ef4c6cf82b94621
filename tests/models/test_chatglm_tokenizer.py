"""ChatGLM-6B / VisualGLM-6B tokenizer: the real ice_text.model against upstream id vectors and hand-derived
goldens, the prompt formats, and the tiny generator."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from glmtune.models.tiny_corpus import TINY_CORPUS
from glmtune.models.visualglm.tokenizer import (
    GLM_SPECIAL_PIECES,
    PIECE_BYTE,
    PIECE_CONTROL,
    PIECE_NORMAL,
    PIECE_UNKNOWN,
    PIECE_USER_DEFINED,
    ChatGLMTokenizer,
    build_prompt,
    model_pieces,
    normalizer_settings,
    process_response,
    write_tiny_tokenizer,
)

REF = Path(__file__).resolve().parents[1] / "reference"
CHATGLM_DIR = REF / "chatglm-6b"
VISUALGLM_DIR = REF / "visualglm-6b"

# From the shared SOURCES.md (see tests/reference/README.md).
SHA256 = {
    CHATGLM_DIR / "ice_text.model": "5e974d9a69c242ce014c88c2b26089270f6198f3c0b700a887666cd3e816f17e",
    CHATGLM_DIR / "tokenizer_config.json": "5bcca050afbbd7e3a3a1224b6c0019eff0dbc9548580637adaafc27a26e4fb0a",
    CHATGLM_DIR / "config.json": "513b00be45b0bdcda0e0d6a0a78e3b2c1fe31f3e17c2b920777472242b855152",
    CHATGLM_DIR / "pytorch_model.bin.index.json": "e472630335025a12ee8047674e51e1789b217f2e173961ce6496385ca48f3547",
    VISUALGLM_DIR / "tokenizer_config.json": "718044bee28bffbe3a4799ec8dda092b5a16bf3aae8017bc6313a89394e5e629",
    VISUALGLM_DIR / "config.json": "2d005d33d7e17e97d9fee25de7ca227c2c0b2c04eaff1c56883a1da5aa382645",
    VISUALGLM_DIR / "pytorch_model.bin.index.json": "ee232ca7dbdbf102afdafb0a9978ddf8bbf74d176267f43719b0e4e7f47f27f1",
    REF / "tokenizer_vectors.json": "6f3360f3813814797847a3278a4fd9960b725f5a0e9e13acc4febc906038ae02",
}


def _chatglm_vectors(kind: str) -> list[dict]:
    entries = json.loads((REF / "tokenizer_vectors.json").read_text(encoding="utf-8"))
    return [e for e in entries if e["tokenizer"].startswith("THUDM/chatglm-6b (") and e["kind"] == kind]


ENCODE_VECTORS = _chatglm_vectors("encode")
PROMPT_VECTORS = _chatglm_vectors("chat_template_text")


def _messages_to_query_history(messages: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"] * (len(messages) // 2) + ["user"]
    history = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2)]
    return messages[-1]["content"], history


def cpp_preprocess(text: str) -> str:
    """li-plus/chatglm.cpp ChatGLMTokenizer::preprocess (chatglm.cpp @ f86777c8), an independent formulation of
    upstream's whitespace handling: "\\n" -> <n>, "\\t" -> <|tab|>, then regex `[ ]{2,80}` -> <|blank_len|>."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return re.sub(r"[ ]{2,80}", lambda m: f"<|blank_{len(m.group(0))}|>", text)


@pytest.fixture(scope="module")
def tok() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(CHATGLM_DIR)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(CHATGLM_DIR / "ice_text.model"))


# ---------------------------------------------------------------------------------------------------- real files


@pytest.mark.parametrize("path", list(SHA256), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_reference_files_sha256(path):
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[path]


def test_vector_selection_covers_all_chatglm6b_entries():
    entries = json.loads((REF / "tokenizer_vectors.json").read_text(encoding="utf-8"))
    mine = [e for e in entries if e["tokenizer"].startswith("THUDM/chatglm-6b")]
    # 3 encode + 2 prompt-text vectors; the only other entry is a greedy generation of the real weights.
    assert sorted(e["kind"] for e in mine) == sorted(["encode"] * 3 + ["chat_template_text"] * 2
                                                     + ["expected_generation"])  # fmt: skip
    assert len(ENCODE_VECTORS) == 3 and len(PROMPT_VECTORS) == 2


def test_real_piece_layout(tok):
    pieces = model_pieces(tok.model_proto)
    assert len(pieces) == 130344 == tok.vocab_size
    assert [(p, t) for p, _, t in pieces[:5]] == [
        ("<unk>", PIECE_UNKNOWN), ("<s>", PIECE_CONTROL), ("</s>", PIECE_CONTROL), ("<pad>", PIECE_CONTROL),
        ("<n>", PIECE_USER_DEFINED),
    ]  # fmt: skip
    assert all(t == PIECE_NORMAL for _, _, t in pieces[5:130000])
    assert [(p, t) for p, _, t in pieces[130000:130008]] == [(p, PIECE_CONTROL) for p in GLM_SPECIAL_PIECES]
    assert [(p, t) for p, _, t in pieces[130008:130088]] == [("<|tab|>", PIECE_USER_DEFINED)] + [
        (f"<|blank_{n}|>", PIECE_USER_DEFINED) for n in range(2, 81)
    ]
    assert [(p, t) for p, _, t in pieces[130088:]] == [(f"<0x{b:02X}>", PIECE_BYTE) for b in range(256)]
    assert normalizer_settings(tok.model_proto) == {
        "name": "nmt_nfkc", "add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True,
    }  # fmt: skip


def test_real_special_ids_match_configs(tok, sp):
    # Ids come from the sp model (PieceToId) + num_image_tokens (0 in the official tokenizer_config.json).
    assert tok.num_image_tokens == 0
    specials = (tok.mask_token_id, tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id)
    assert specials == (130000, 130001, 130004, 130005)
    assert (tok.pad_token_id, tok.unk_token_id, tok.end_token_id) == (3, 0, 2)
    for name in ("[MASK]", "[gMASK]", "<sop>", "<eop>", "<pad>", "<unk>", "</s>"):
        assert tok.convert_tokens_to_ids(name) == sp.piece_to_id(name)
    for folder in (CHATGLM_DIR, VISUALGLM_DIR):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["bos_token_id"] == tok.bos_token_id
        assert cfg["eos_token_id"] == tok.eos_token_id
        assert cfg["mask_token_id"] == tok.mask_token_id
        assert cfg["gmask_token_id"] == tok.gmask_token_id
        assert cfg["pad_token_id"] == tok.pad_token_id
        assert cfg["vocab_size"] == 130528 >= tok.vocab_size
    # VisualGLM-6B ships the same ice_text.model; its tokenizer_config.json differs in name_or_path alone.
    a = json.loads((CHATGLM_DIR / "tokenizer_config.json").read_text())
    b = json.loads((VISUALGLM_DIR / "tokenizer_config.json").read_text())
    assert {k: v for k, v in a.items() if k != "name_or_path"} == {k: v for k, v in b.items() if k != "name_or_path"}


@pytest.mark.parametrize("vec", ENCODE_VECTORS, ids=lambda v: v["text"][:12])
def test_encode_vectors(tok, vec):
    assert tok.encode(vec["text"]) == vec["ids"]
    assert tok.encode(vec["text"], add_special_tokens=False) == vec["ids"][:-2]
    assert tok.encode_text(vec["text"]) == vec["ids"][:-2]
    assert vec["ids"][-2:] == [tok.gmask_token_id, tok.bos_token_id]


@pytest.mark.parametrize("vec", ENCODE_VECTORS, ids=lambda v: v["text"][:12])
def test_decode_vectors(tok, vec):
    # [gMASK] / <sop> are CONTROL pieces: they decode to nothing. The nmt_nfkc normalizer made the full-width
    # punctuation half-width; upstream chat() restores it next to CJK characters with process_response.
    text = tok.decode(vec["ids"])
    assert text == tok.decode(vec["ids"][:-2])
    assert process_response(text) == vec["text"]


@pytest.mark.parametrize("vec", PROMPT_VECTORS, ids=lambda v: str(len(v["messages"])))
def test_chatglm_prompt_vectors(tok, vec):
    query, history = _messages_to_query_history(vec["messages"])
    assert build_prompt(query, history, style="chatglm") == vec["text"]


def test_chatglm_prompt_vector_ids(tok):
    # The multi-turn prompt vector is also the text of an encode vector: prompt text -> ids end to end.
    vec = next(v for v in PROMPT_VECTORS if len(v["messages"]) == 3)
    ids = next(e["ids"] for e in ENCODE_VECTORS if e["text"] == vec["text"])
    query, history = _messages_to_query_history(vec["messages"])
    assert tok.encode(build_prompt(query, history, style="chatglm")) == ids


# ---------------------------------------------------------------------------------------------------- goldens


def test_golden_words(tok, sp):
    # Ids read off the vectors: "你好" -> ▁ 5, 你好 74874; "...('hello world')" -> hello 7283, ▁world 398.
    assert tok.encode_text("你好") == [5, 74874]
    assert [sp.id_to_piece(i) for i in (5, 74874, 7283, 398)] == ["▁", "你好", "hello", "▁world"]
    # An English sentence: the dummy prefix makes the first word "▁hello", not "hello".
    assert tok.encode_text("hello world") == [sp.piece_to_id("▁hello"), 398]
    assert sp.piece_to_id("▁hello") != sp.unk_id()
    # Without the dummy prefix (upstream SPTokenizer.encode(add_dummy_prefix=False): "<n>" + text, drop 2 pieces).
    assert tok.sp_encode("hello world", add_dummy_prefix=False) == [7283, 398]
    assert tok.sp_encode("hello world") == tok.encode_text("hello world")


@pytest.mark.parametrize("n", list(range(2, 81)))
def test_golden_space_runs_up_to_80(tok, sp, n):
    # "a" + n spaces + "b" -> "a<|blank_n|>b": ▁a, the blank piece, then b glued to the user-defined piece (no ▁).
    blank = sp.piece_to_id(f"<|blank_{n}|>")
    assert blank == 130009 + n - 2
    expected = [sp.piece_to_id("▁a"), blank, sp.piece_to_id("b")]
    assert sp.unk_id() not in expected
    assert tok.encode_text("a" + " " * n + "b") == expected
    assert tok.decode(expected) == "a" + " " * n + "b"


@pytest.mark.parametrize("n", [81, 82, 83, 100, 159, 160, 161, 162, 165, 240, 241, 300])
def test_golden_space_runs_over_80(tok, sp, n):
    # Upstream replaces runs for N = 80 down to 2, so a run splits into 80-space chunks from the left plus the
    # remainder: blank_80 * (n // 80), then blank_r (r >= 2) or, for r == 1, a lone space that becomes the "▁"
    # prefix of the next word.
    b80 = sp.piece_to_id("<|blank_80|>")
    r = n % 80
    expected = [sp.piece_to_id("▁a")] + [b80] * (n // 80)
    if r >= 2:
        expected += [sp.piece_to_id(f"<|blank_{r}|>"), sp.piece_to_id("b")]
    elif r == 1:
        expected += [sp.piece_to_id("▁b")]
    else:
        expected += [sp.piece_to_id("b")]
    assert tok.encode_text("a" + " " * n + "b") == expected
    assert tok.decode(expected) == "a" + " " * n + "b"


def test_golden_tabs_and_newlines(tok, sp):
    a, b, tab, nl = sp.piece_to_id("▁a"), sp.piece_to_id("b"), 130008, 4
    assert sp.id_to_piece(tab) == "<|tab|>" and sp.id_to_piece(nl) == "<n>"
    assert tok.encode_text("a\tb") == [a, tab, b]
    assert tok.encode_text("a\t\t\tb") == [a, tab, tab, tab, b]  # tabs are never merged
    assert tok.encode_text("a\nb") == [a, nl, b]
    assert tok.encode_text("a\n\n\nb") == [a, nl, nl, nl, b]  # nor are newlines
    assert tok.encode_text("a\t b") == [a, tab, sp.piece_to_id("▁b")]  # single space: plain sp whitespace
    assert tok.encode_text("a\n  b") == [a, nl, sp.piece_to_id("<|blank_2|>"), b]
    # Leading whitespace survives as pieces after the dummy "▁"; a trailing single space is dropped by the sp
    # normalizer (remove_extra_whitespaces), a trailing run is not.
    assert tok.encode_text("\ta") == [5, tab, sp.piece_to_id("a")]
    assert tok.encode_text("a ") == tok.encode_text("a") == [a]
    assert tok.encode_text("a  ") == [a, sp.piece_to_id("<|blank_2|>")]


MIXED = [
    "def main():\n    print('hello world')\t# greeting",
    "for i in range(10):\n\tif i % 2:\n\t\tprint(i)\n        continue",
    "x" + " " * 81 + "y" + " " * 2 + "z" + " " * 165 + "w",
    "第一行\n第二行\t制表符  两个空格" + " " * 90 + "很多空格",
    "Mixed 中文 and English, numbers 12345 and symbols #$%^&*() [gMASK] <img></img>",
    "  leading two spaces, trailing two  ",
    "emoji 👋🙂 and rare 𠀀 characters use byte fallback",
    "\n\nstarts with newlines and ends with them\n\n",
]


@pytest.mark.parametrize("text", MIXED, ids=lambda t: t[:10])
def test_matches_independent_preprocessing(tok, sp, text):
    # chatglm.cpp's formulation of the whitespace rules (regex) + raw sentencepiece == our encode.
    assert tok.encode_text(text) == sp.encode(cpp_preprocess(text))
    assert tok.encode(text) == sp.encode(cpp_preprocess(text)) + [130001, 130004]


@pytest.mark.parametrize("text", MIXED, ids=lambda t: t[:10])
def test_decode_round_trip(tok, text):
    ids = tok.encode(text)
    # No full-width punctuation, no single leading/trailing space, no " ." style pairs: decode restores the text.
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_decode_details(tok):
    ids = tok.encode_text("你好")
    assert tok.decode(ids + [tok.pad_token_id] * 3) == "你好"  # pads are always dropped
    assert tok.decode([tok.pad_token_id]) == "" and tok.decode([]) == ""
    assert tok.decode(ids + [tok.eos_token_id]) == "你好"  # <eop> is a CONTROL piece: decodes to ""
    # skip_special_tokens drops <sop> <eop> <unk> <pad> [MASK] by id; [gMASK] is not in upstream's list.
    assert set(tok.all_special_ids) == {130004, 130005, 0, 3, 130000}
    assert tok.convert_ids_to_tokens([5, 130001, 130004, 0], skip_special_tokens=True) == ["▁", "[gMASK]"]
    # <unk> decodes to sentencepiece's unk surface unless skipped.
    assert tok.decode([5, 0]) == " ⁇ " and tok.decode([5, 0], skip_special_tokens=True) == ""
    # transformers' clean_up_tokenization runs after the blanks are expanded: " ." loses its space.
    assert tok.decode(tok.encode_text("x  .")) == "x ."
    assert tok.decode(tok.encode_text("x  ."), clean_up_tokenization_spaces=False) == "x  ."
    assert tok.decode(tok.encode_text("it 's")) == "it's"
    with pytest.raises(ValueError):
        tok.decode([130344])  # beyond the sp model (the checkpoint pads its embedding to 130528)


def test_special_token_strings_in_text(tok, sp):
    # Upstream (transformers 4.27 PreTrainedTokenizer.tokenize) splits the text on the strings of its special
    # tokens <sop> <eop> <unk> <pad> [MASK], strips whitespace around them, and encodes each piece separately
    # (each with its own "▁" prefix). [gMASK] is not one of them: it is encoded as plain characters.
    hello, bye = tok.encode_text("你好"), tok.encode_text("再见")
    assert tok.encode_text("你好 <sop> 再见") == hello + [130004] + bye
    assert tok.encode_text("你好<sop>\n再见") == hello + [130004] + bye  # "\n" is stripped too
    assert tok.encode_text("<pad><pad>") == [3, 3]
    assert tok.encode_text("[MASK]") == [130000]
    assert tok.encode_text("[gMASK]") == sp.encode("[gMASK]") != [130001]
    assert sp.encode_as_pieces("[gMASK]") == ["▁[", "g", "MASK", "]"]
    assert tok.tokenize("a <eop> b") == ["▁a", "<eop>", "▁b"]


def test_remove_space_and_lower_case_options(tok):
    proto = tok.model_proto
    plain = ChatGLMTokenizer(proto, num_image_tokens=0)
    squeeze = ChatGLMTokenizer(proto, num_image_tokens=0, remove_space=True)
    lower = ChatGLMTokenizer(proto, num_image_tokens=0, do_lower_case=True)
    # remove_space: " ".join(text.strip().split()) before the whitespace pieces, so newlines/tabs/runs vanish.
    assert squeeze.encode_text("  a \n\t b   c  ") == plain.encode_text("a b c")
    assert lower.encode_text("Hello WORLD <PAD> <pad>") == plain.encode_text("hello world <pad> <pad>")
    assert plain.encode_text("Hello") != plain.encode_text("hello")


def test_num_image_tokens_default_offsets_ids(tok):
    # Without a config, upstream's default num_image_tokens=20000 shifts every id (the icetk-era numbering:
    # [gMASK] 150001, <sop> 150004, <eop> 150005).
    legacy = ChatGLMTokenizer(tok.model_proto)
    assert legacy.vocab_size == 150344
    assert legacy.encode("你好") == [20005, 94874, 150001, 150004]
    assert legacy.decode(legacy.encode("你好")) == "你好"
    assert legacy.convert_ids_to_tokens(7) == "<image_7>" and legacy.convert_tokens_to_ids("<image_7>") == 7


def test_pickle(tok):
    clone = pickle.loads(pickle.dumps(tok))
    for text in MIXED:
        assert clone.encode(text) == tok.encode(text)
    assert clone.eos_token_id == 130005


# ---------------------------------------------------------------------------------------------------- prompts


def test_visualglm_prompt_text():
    assert build_prompt("描述这张图片。") == "问：描述这张图片。\n答："
    assert build_prompt("q2", [("q1", "a1")]) == "问：q1\n答：a1\n问：q2\n答："
    assert build_prompt("q2", [("q1", "a1")], lang="en") == "Q:q1\nA:a1\nQ:q2\nA:"
    img = build_prompt("q2", [("q1", "a1")], image=True)
    assert img == "<img>" + "<unk>" * 32 + "</img>问：q1\n答：a1\n问：q2\n答："
    small = build_prompt("q", image=True, image_placeholder="<pad>", image_length=4)
    assert small == "<img>" + "<pad>" * 4 + "</img>问：q\n答："
    assert build_prompt("q", style="chatglm") == "q"
    assert build_prompt("q", [("a", "b")], style="chatglm") == "[Round 0]\n问：a\n答：b\n[Round 1]\n问：q\n答："
    with pytest.raises(ValueError):
        build_prompt("q", lang="en", style="chatglm")


def test_visualglm_prompt_ids_equal_upstream_construction(tok):
    # THUDM/VisualGLM-6B finetune_visualglm.py: encode("<img>") + [pad] * 32 + encode("</img>问：" + p + "\n答："),
    # then build_inputs_with_special_tokens(a, b) = a + [gMASK, <sop>] + b + [<eop>].
    prompt, label = "这张图片的背景里有什么内容？", "这张图片的背景是蓝色的天空。"
    input0 = tok.encode_text("<img>")
    input2 = tok.encode_text("</img>问：" + prompt + "\n答：")
    assert input0 == [46, 2265, 33]  # "▁<" "img" ">": pre_image = 3 with the real tokenizer
    ft = tok.build_inputs_with_special_tokens(input0 + [tok.pad_token_id] * 32 + input2, tok.encode_text(label))
    text_ids = tok.encode(build_prompt(prompt, image=True, image_placeholder="<pad>"))
    assert ft[: len(text_ids)] == text_ids
    assert ft[len(text_ids) :] == tok.encode_text(label) + [130005]
    # HF remote chat (build_inputs_with_image) uses <unk> placeholders.
    assert tok.encode(build_prompt(prompt, image=True)) == input0 + [0] * 32 + input2 + [130001, 130004]


# ---------------------------------------------------------------------------------------------------- tiny


TINY_VOCAB = 100


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("tiny_chatglm_tok")
    ids = write_tiny_tokenizer(out, TINY_CORPUS, TINY_VOCAB)
    return out, ids


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(tiny_dir[0])


def test_tiny_is_deterministic(tiny_dir, tmp_path):
    out, ids = tiny_dir
    again = write_tiny_tokenizer(tmp_path / "a", TINY_CORPUS, TINY_VOCAB)
    assert again == ids
    for name in ("ice_text.model", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes()
    # Also across processes (sentencepiece's global RNG state, thread pool).
    code = (
        "import sys; from glmtune.models.tiny_corpus import TINY_CORPUS; "
        "from glmtune.models.visualglm.tokenizer import write_tiny_tokenizer; "
        f"write_tiny_tokenizer(sys.argv[1], TINY_CORPUS, {TINY_VOCAB})"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True)
    assert (tmp_path / "b" / "ice_text.model").read_bytes() == (out / "ice_text.model").read_bytes()


def test_tiny_ids_follow_the_official_scheme(tiny_dir, tiny):
    _, ids = tiny_dir
    v = TINY_VOCAB  # the official model: v = 130000
    assert ids == {
        "unk_token_id": 0, "pad_token_id": 3, "end_token_id": 2, "mask_token_id": v, "gmask_token_id": v + 1,
        "bos_token_id": v + 4, "eos_token_id": v + 5, "sp_vocab_size": v + 8 + 80 + 256,
    }  # fmt: skip
    assert tiny.num_image_tokens == 0 and tiny.vocab_size == v + 344
    assert (tiny.mask_token_id, tiny.gmask_token_id, tiny.bos_token_id, tiny.eos_token_id) == (v, v + 1, v + 4, v + 5)


def test_tiny_piece_layout_matches_real(tiny, tok):
    real, small = model_pieces(tok.model_proto), model_pieces(tiny.model_proto)
    strip = lambda ps: [(p, t) for p, _, t in ps]  # noqa: E731
    assert strip(small[:5]) == strip(real[:5])  # <unk> <s> </s> <pad> <n>
    assert all(t == PIECE_NORMAL for _, _, t in small[5:TINY_VOCAB])
    assert strip(small[TINY_VOCAB:]) == strip(real[130000:])  # GLM controls, tab, blanks, bytes
    assert normalizer_settings(tiny.model_proto) == normalizer_settings(tok.model_proto)
    # "▁" is a piece of its own (the add_dummy_prefix=False trick drops exactly two pieces).
    assert tiny.sp_model.piece_to_id("▁") != tiny.sp_model.unk_id()


def test_tiny_normalizes_like_real(tiny, tok):
    # The built-in nmt_nfkc table of today's sentencepiece is not byte-identical to the 2023 one, but it must agree
    # on what matters: full-width punctuation and letters, compatibility characters, whitespace.
    samples = [
        "问：这是什么？答：红色。",
        "ＡＢＣ１２３，！？；：",
        "①ﬁ™ ½",
        "a\u3000b\u00a0c",
        "  x  ",
        "Hello, World.",
    ]
    for text in samples:
        assert tiny.sp_model.normalize(text) == tok.sp_model.normalize(text)


def test_tiny_config_keys_match_official(tiny_dir):
    official = json.loads((VISUALGLM_DIR / "tokenizer_config.json").read_text())
    tiny_cfg = json.loads((tiny_dir[0] / "tokenizer_config.json").read_text())
    assert list(tiny_cfg) == [k for k in official if k != "auto_map"]
    assert {k: v for k, v in tiny_cfg.items() if k != "name_or_path"} == {
        k: v for k, v in official.items() if k not in ("name_or_path", "auto_map")
    }


@pytest.mark.parametrize("text", MIXED + ["你好，这是什么？图片里有一个红色的圆形。", "What colour is the shape?"],
                         ids=lambda t: t[:10])  # fmt: skip
def test_tiny_preprocessing_and_round_trip(tiny, text):
    sp = tiny.sp_model
    assert tiny.encode_text(text) == sp.encode(cpp_preprocess(text))
    ids = tiny.encode(text)
    assert ids[-2:] == [tiny.gmask_token_id, tiny.bos_token_id]
    assert process_response(tiny.decode(ids)) == process_response(text)


def test_tiny_whitespace_pieces(tiny):
    sp = tiny.sp_model
    v = TINY_VOCAB
    a, b = tiny.encode_text("a"), sp.piece_to_id("b")
    assert tiny.encode_text("a\tb") == a + [v + 8, b]
    assert tiny.encode_text("a\nb") == a + [4, b]
    for n in (2, 3, 40, 80):
        assert tiny.encode_text("a" + " " * n + "b") == a + [v + 9 + n - 2, b]
        assert sp.id_to_piece(v + 9 + n - 2) == f"<|blank_{n}|>"
    assert tiny.encode_text("a" + " " * 165 + "b") == a + [v + 87, v + 87, v + 12, b]
    assert tiny.decode(tiny.encode_text("a" + " " * 165 + "b")) == "a" + " " * 165 + "b"
    no_prefix = tiny.sp_encode("ab\ncd", add_dummy_prefix=False)
    assert not sp.id_to_piece(no_prefix[0]).startswith("▁")
    assert "".join(sp.id_to_piece(i) for i in no_prefix) == "ab<n>cd"
    assert tiny.decode(no_prefix) == tiny.decode(tiny.encode_text("ab\ncd")) == "ab\ncd"


def test_tiny_prompt_construction(tiny):
    text_ids = tiny.encode(build_prompt("what is it?", image=True))
    pre = len(tiny.encode_text("<img>"))
    assert text_ids[pre : pre + 32] == [tiny.unk_token_id] * 32
    tail = tiny.encode_text("</img>问：what is it?\n答：") + [tiny.gmask_token_id, tiny.bos_token_id]
    assert text_ids[pre + 32 :] == tail


def test_tiny_pickle(tiny):
    clone = pickle.loads(pickle.dumps(tiny))
    assert clone.encode("你好\n  world") == tiny.encode("你好\n  world")


def test_tiny_rejects_impossible_vocab(tmp_path):
    with pytest.raises(RuntimeError):
        write_tiny_tokenizer(tmp_path, TINY_CORPUS, 10_000)
