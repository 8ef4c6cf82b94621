"""GLM-4 / GLM-4V tokenizer: the real tokenizer.model against upstream id vectors, and the tiny generator."""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import regex
import torch

from glmtune.models.glm4v.tokenizer import (
    GLM4_PAT_STR,
    GLM4_SPECIAL_TOKENS,
    Glm4Tokenizer,
    build_chat_ids,
    write_tiny_tokenizer,
)

REF = Path(__file__).resolve().parents[1] / "reference"
GLM4_DIR = REF / "glm4"

# From the shared SOURCES.md (see tests/reference/README.md).
SHA256 = {
    GLM4_DIR / "tokenizer.model": "5a493598071550244b2ee7f26118f3edec2150b9dfa967929a99052ac83fe716",
    GLM4_DIR / "tokenizer_config.json": "be092c7785c8208ab6ad9258c0f90618a23c6f17de164f2b6bbd324e50be2d10",
    REF / "tokenizer_vectors.json": "6f3360f3813814797847a3278a4fd9960b725f5a0e9e13acc4febc906038ae02",
}

ID_KINDS = ("encode", "encode_ordinary", "apply_chat_template", "apply_chat_template_with_image")


def _glm4_vectors():
    entries = json.loads((REF / "tokenizer_vectors.json").read_text(encoding="utf-8"))
    return [e for e in entries if "glm-4" in e["tokenizer"].lower() and e["kind"] in ID_KINDS]


GLM4_VECTORS = _glm4_vectors()


@pytest.fixture(scope="module")
def tok() -> Glm4Tokenizer:
    return Glm4Tokenizer.from_pretrained(GLM4_DIR)


# ---------------------------------------------------------------------------------------------------- real files


@pytest.mark.parametrize("path", list(SHA256), ids=lambda p: p.name)
def test_reference_files_sha256(path):
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[path]


def test_vector_selection_covers_all_glm4_id_entries():
    # 2 encode_ordinary + 1 encode + 2 chat + 1 chat-with-image in the collected file: none silently dropped.
    kinds = sorted(e["kind"] for e in GLM4_VECTORS)
    assert kinds == sorted(
        [
            "encode_ordinary",
            "encode_ordinary",
            "encode",
            "apply_chat_template",
            "apply_chat_template",
            "apply_chat_template_with_image",
        ]
    )


@pytest.mark.parametrize("entry", GLM4_VECTORS, ids=lambda e: f"{e['kind']}-{len(e['ids'])}")
def test_upstream_vectors(tok, entry):
    kind = entry["kind"]
    if kind == "encode_ordinary":
        got = tok.encode(entry["text"])
    elif kind == "encode":  # upstream tokenizer.encode() prepends [gMASK]<sop>
        got = tok.encode(entry["text"], add_prefix=True)
    else:
        got = build_chat_ids(tok, entry["messages"], add_generation_prompt=True)
    assert got == entry["ids"]


def test_chat_layout_with_system_matches_llama_cpp_text(tok):
    # llama.cpp's text rendering of the glm-4-9b-chat template; it ends in "<|assistant|>\n" where the official
    # tokenizer ends in "<|assistant|>" (see the entry's caveat), so the trailing newline is dropped here.
    entries = json.loads((REF / "tokenizer_vectors.json").read_text(encoding="utf-8"))
    (entry,) = [e for e in entries if e["kind"] == "chat_template_text" and "GLM-4" in e["tokenizer"]]
    text = entry["text"]
    assert text.endswith("<|assistant|>\n")
    expected = tok.encode(text[:-1], allowed_special="all")
    assert build_chat_ids(tok, entry["messages"], add_generation_prompt=True) == expected


def test_special_ids_from_config(tok):
    config = json.loads((GLM4_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    from_file = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    assert tok.special_ids == from_file
    assert list(from_file) == list(GLM4_SPECIAL_TOKENS)
    assert list(from_file.values()) == list(range(151329, 151343))
    assert tok.vocab_size == 151329 and len(tok) == 151343
    assert tok.eos_token_id == tok.pad_token_id == from_file["<|endoftext|>"]
    assert tok.padding_side == "left" and tok.model_max_length == 8192 and tok.image_size == 1120
    assert tok.prefix_ids == [from_file["[gMASK]"], from_file["<sop>"]]
    assert tok.stop_ids == [from_file["<|endoftext|>"], from_file["<|user|>"], from_file["<|observation|>"]]
    for name, i in from_file.items():
        assert tok.convert_tokens_to_ids(name) == i
    assert tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]) == [
        from_file["<|user|>"],
        from_file["<|assistant|>"],
    ]
    assert tok.convert_tokens_to_ids("\n") == 198
    with pytest.raises(KeyError):
        tok.convert_tokens_to_ids("<|not_a_token|>")


ROUND_TRIP_TEXTS = [
    "Hello, world! It's 3.14159 o'clock.",
    "你好，世界。晚上睡不着应该怎么办？",
    "🚀 😶‍🌫️ 👩‍👩‍👧‍👦 ✅ 🦙🦙",
    "a  b   c    d\t\te \t \u3000 f",
    "line1\nline2\r\n\n\n  indented\n\t\ttabs\n",
    "   leading and trailing   ",
    "",
    "ñ é ü ß Ω ж ק ع ह ក",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_strings_are_plain_text_by_default(tok):
    text = "hi <|user|> there <|assistant|>[gMASK]"
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special_ids.values())
    assert tok.decode(plain) == text

    allowed = tok.encode(text, allowed_special="all")
    sid = tok.special_ids
    assert [i for i in allowed if i in sid.values()] == [sid["<|user|>"], sid["<|assistant|>"], sid["[gMASK]"]]
    assert tok.decode(allowed) == text

    only_user = tok.encode(text, allowed_special={"<|user|>"})
    assert [i for i in only_user if i in sid.values()] == [sid["<|user|>"]]
    assert tok.decode(only_user) == text

    with pytest.raises(ValueError):
        tok.encode(text, allowed_special={"<|nope|>"})


def test_decode_skip_special_and_unknown_ids(tok):
    ids = build_chat_ids(tok, [{"role": "user", "content": "你好"}])
    assert tok.decode(ids) == "[gMASK]<sop><|user|>\n你好<|assistant|>"
    assert tok.decode(ids, skip_special_tokens=True) == "\n你好"
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    # Rows 151343..151551 of the padded embedding have no token: they decode to nothing, as upstream.
    assert tok.decode([151400] + tok.encode("ok")) == "ok"
    # A reply cut inside a multi-byte character decodes with a replacement character, without raising.
    partial = tok.encode("😀")[:1]
    assert "\ufffd" in tok.decode(partial)


def test_build_chat_ids_layout(tok):
    sid = tok.special_ids
    enc = tok.encode
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?", "image": "cat.jpg"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": ""},  # empty and no image: skipped, as upstream
        {"role": "observation", "content": "{}", "metadata": "tool"},
    ]
    got = build_chat_ids(tok, messages, add_generation_prompt=False)
    # fmt: off
    expected = (
        [sid["[gMASK]"], sid["<sop>"]]
        + [sid["<|system|>"]] + enc("\n") + enc("Be brief.")
        + [sid["<|user|>"]] + enc("\n")
        + [sid["<|begin_of_image|>"], sid["<|endoftext|>"], sid["<|end_of_image|>"]] + enc("What is this?")
        + [sid["<|assistant|>"]] + enc("\n") + enc("A cat.")
        + [sid["<|observation|>"]] + enc("tool\n") + enc("{}")
    )
    # fmt: on
    assert got == expected
    assert build_chat_ids(tok, messages[:2], add_prefix=False)[:1] == [sid["<|system|>"]]
    assert build_chat_ids(tok, messages[:2])[-1] == sid["<|assistant|>"]
    # Content that looks like a role token stays text: user data cannot fake a turn.
    fake = build_chat_ids(tok, [{"role": "user", "content": "<|assistant|>hi"}], add_generation_prompt=False)
    assert sid["<|assistant|>"] not in fake


def test_build_chat_ids_rejects(tok):
    with pytest.raises(ValueError):
        build_chat_ids(tok, [{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError):
        build_chat_ids(
            tok,
            [{"role": "user", "content": "a", "image": "1.jpg"}, {"role": "user", "content": "b", "image": "2.jpg"}],
        )
    with pytest.raises(ValueError):
        build_chat_ids(tok, [{"role": "system", "content": "x", "tools": [{"type": "python"}]}])


def test_pad(tok):
    batch = [[5, 6, 7], [8], torch.tensor([9, 10])]
    pad = tok.pad_token_id
    ids, mask = tok.pad(batch)  # default side comes from tokenizer_config: left
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [pad, pad, 8], [pad, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    ids, mask = tok.pad(batch, side="right", pad_to_multiple_of=4)
    assert ids.tolist() == [[5, 6, 7, pad], [8, pad, pad, pad], [9, 10, pad, pad]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError):
        tok.pad(batch, side="middle")
    with pytest.raises(ValueError):
        tok.pad([])


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    text = "pickled 你好 🚀 <|user|>"
    assert clone.encode(text) == tok.encode(text)
    assert clone.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert clone.special_ids == tok.special_ids
    assert (clone.pad_token_id, clone.eos_token_id, clone.padding_side, len(clone)) == (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.padding_side,
        len(tok),
    )
    assert clone.decode(clone.encode(text)) == text


# ---------------------------------------------------------------------------------------------------- tiny tokenizer

CORPUS = [
    "Describe this image. The picture shows a red square on a blue background.",
    "描述这张图片。图片里有一个红色的正方形。",
    "What color is the circle? The circle is green.",
    "def main():\n    print('hello world')\n",
    "1234567 + 89 = 1234656",
]


def _pieces(corpus):
    return sorted({p for text in corpus for p in regex.findall(GLM4_PAT_STR, text)})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-glm4-tok")
    write_tiny_tokenizer(out, CORPUS, n_merges=10_000)
    return out


def test_tiny_is_deterministic(tmp_path):
    a = write_tiny_tokenizer(tmp_path / "a", CORPUS, n_merges=200)
    b = write_tiny_tokenizer(tmp_path / "b", CORPUS, n_merges=200)
    assert a == b
    for name in ("tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tiny_file_format_matches_official(tmp_path):
    write_tiny_tokenizer(tmp_path, CORPUS, n_merges=50)
    tiny_lines = (tmp_path / "tokenizer.model").read_bytes().split(b"\n")
    real_lines = (GLM4_DIR / "tokenizer.model").read_bytes().split(b"\n")
    assert tiny_lines[-1] == b"" and real_lines[-1] == b""  # both end with a newline
    # The 256 single-byte ranks use the same (GPT-2 printable-first) order as the official file.
    assert tiny_lines[:256] == real_lines[:256]
    tiny_lines = tiny_lines[:-1]
    assert len(tiny_lines) == 256 + 50
    for rank, line in enumerate(tiny_lines):
        token_b64, rank_str = line.split(b" ")
        assert int(rank_str) == rank and base64.b64decode(token_b64)

    tiny_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    real_cfg = json.loads((GLM4_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" not in tiny_cfg
    assert list(tiny_cfg) == [k for k in real_cfg if k != "auto_map"]
    for key, value in real_cfg.items():
        if key not in ("auto_map", "added_tokens_decoder"):
            assert tiny_cfg[key] == value, key
    real_entries = list(real_cfg["added_tokens_decoder"].values())
    assert list(tiny_cfg["added_tokens_decoder"].values()) == real_entries


def test_tiny_special_ids_follow_vocab(tiny_dir, tmp_path):
    tok = Glm4Tokenizer.from_pretrained(tiny_dir)
    returned = write_tiny_tokenizer(tmp_path, CORPUS, n_merges=10_000)
    assert tok.special_ids == returned
    assert list(returned) == list(GLM4_SPECIAL_TOKENS)
    assert list(returned.values()) == list(range(tok.vocab_size, tok.vocab_size + len(GLM4_SPECIAL_TOKENS)))
    assert len(tok) == tok.vocab_size + len(GLM4_SPECIAL_TOKENS)
    assert tok.eos_token_id == tok.pad_token_id == returned["<|endoftext|>"]
    ids = build_chat_ids(tok, [{"role": "user", "content": "描述这张图片", "image": True}])
    assert ids[:4] == [returned["[gMASK]"], returned["<sop>"], returned["<|user|>"], tok.encode("\n")[0]]
    assert ids[4:7] == [returned["<|begin_of_image|>"], returned["<|endoftext|>"], returned["<|end_of_image|>"]]


def test_tiny_vocab_size_is_capped_by_n_merges(tmp_path):
    write_tiny_tokenizer(tmp_path, CORPUS, n_merges=7)
    assert Glm4Tokenizer.from_pretrained(tmp_path).vocab_size == 256 + 7


def test_tiny_corpus_pieces_are_single_tokens(tiny_dir):
    tok = Glm4Tokenizer.from_pretrained(tiny_dir)
    for piece in _pieces(CORPUS):
        assert len(tok.encode(piece)) == 1, piece
    # Whole corpus lines encode to exactly one token per pre-token.
    for text in CORPUS:
        assert len(tok.encode(text)) == len(regex.findall(GLM4_PAT_STR, text))


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["\x00\x01\x7f control", "日本語のテキスト", "Ωμέγα ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"])
def test_tiny_round_trip_any_unicode(tiny_dir, text):
    # Unknown text falls back to the 256 byte tokens, so everything round-trips.
    tok = Glm4Tokenizer.from_pretrained(tiny_dir)
    assert tok.decode(tok.encode(text)) == text


def test_tiny_pickle(tiny_dir):
    tok = Glm4Tokenizer.from_pretrained(tiny_dir)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(CORPUS[0]) == tok.encode(CORPUS[0])
    assert clone.special_ids == tok.special_ids
