"""Native ChatGLM-6B / VisualGLM-6B tokenizer on sentencepiece, with no remote code.

Upstream is the HF remote code `tokenization_chatglm.py` of THUDM/chatglm-6b after the "slim" change of 2023-04
(HF commit 72985e8 "Drop icetk dependency"), read in the git mirror of the HF repo greensheng/chatglm-6b:
branch main @ 8b7d33596d18c5e83e2da052d05ca4db02e60620 (blob 69ee85c8) and branch `visual` (THUDM's VisualGLM
development branch) @ 11f77d9d72c4d314086664bf135910c35c079ca9 (blob 1c518d0a; same tokenizing/decoding code, only
`_pad` differs). It runs under transformers 4.27-4.33 (ChatGLM-6B pins 4.27.1; it no longer loads on >= 4.34), so
the behaviour reproduced here is that of the remote class inside `PreTrainedTokenizer` of that era:

* files: `ice_text.model` (a sentencepiece unigram model, 130344 pieces) and `tokenizer_config.json`.
  The special pieces live INSIDE the sp model (ids via `PieceToId`, never hard-coded): <unk> 0 (UNKNOWN),
  <s> 1, </s> 2, <pad> 3 (CONTROL), <n> 4 (USER_DEFINED), the learned pieces, then at 130000..130007 the CONTROL
  pieces [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>, the USER_DEFINED <|tab|> 130008 and
  <|blank_2|>..<|blank_80|> 130009..130087, and the 256 byte-fallback pieces <0x00>..<0xFF> 130088..130343.
  Every sp id is shifted by `num_image_tokens` (20000 by default in the code, 0 in the official config).
* encode (`tokenizer.encode(text)`): the text is split on the special-token STRINGS of the standard HF attributes
  (bos <sop>, eos <eop>, unk <unk>, pad <pad>, mask [MASK]; not [gMASK]); whitespace next to such a token is
  stripped (`str.strip` semantics); each remaining segment goes through `preprocess_text` (`remove_space`:
  `" ".join(s.strip().split())`, `do_lower_case`), then "\\n" -> "<n>", "\\t" -> "<|tab|>", runs of 80..2 spaces
  (longest first) -> "<|blank_N|>", then `EncodeAsPieces` (the sp normalizer is nmt_nfkc with a dummy "▁" prefix
  and extra-whitespace removal, so every segment starts with "▁"), pieces -> ids by `PieceToId`. With
  `add_special_tokens` the ids get [gMASK] <sop> APPENDED (`build_inputs_with_special_tokens`).
* `SPTokenizer.encode(text, add_dummy_prefix=False)` (not used by encode) drops the "▁" prefix by encoding
  "<n>" + text and removing the first two pieces ("▁", "<n>"): `sp_encode` here.
* decode: pad ids removed; with `skip_special_tokens`, the ids of <sop> <eop> <unk> <pad> [MASK] removed (again
  not [gMASK]); ids -> pieces -> `DecodePieces` (CONTROL pieces decode to "") -> "<n>" -> "\\n", "<|tab|>" ->
  "\\t", "<|blank_N|>" -> N spaces; then transformers' `clean_up_tokenization` (" ." -> "." etc., on by default).

`write_tiny_tokenizer` trains a tiny sentencepiece model with the same normalizer, the same special pieces at the
same relative positions and piece types, and writes it in the official two-file layout.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

VOCAB_FILE = "ice_text.model"
CONFIG_FILE = "tokenizer_config.json"

MAX_BLANK_LENGTH = 80  # SPTokenizer(max_blank_length=80)
NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"
# SPTokenizer.special_tokens: the CONTROL pieces that follow the learned vocabulary, in this order.
GLM_SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
# ChatGLMTokenizer.__init__ defaults (num_image_tokens=20000 is the icetk-era default; the official config says 0).
DEFAULT_TOKENS = {
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "end_token": "</s>",
    "mask_token": "[MASK]",
    "gmask_token": "[gMASK]",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}
DEFAULT_NUM_IMAGE_TOKENS = 20000
# The HF special-token attributes that exist on ChatGLMTokenizer (SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES ∩
# what the class sets). Their strings are "no split" in text and their ids are what skip_special_tokens drops.
_HF_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


def blank_piece(n: int) -> str:
    if n < 2:
        raise ValueError(f"blank pieces start at 2 spaces, got {n}")
    return f"<|blank_{n}|>"


def preprocess_whitespace(
    text: str, linebreak: bool = True, whitespaces: bool = True, max_len: int = MAX_BLANK_LENGTH
) -> str:
    """SPTokenizer._preprocess: "\\n" -> "<n>"; "\\t" -> "<|tab|>"; each run of spaces, replaced for N = 80 down
    to 2 (so a run of 165 becomes blank_80 blank_80 blank_5, and 81 becomes blank_80 + one plain space)."""
    if linebreak:
        text = text.replace("\n", NEWLINE_PIECE)
    if whitespaces:
        text = text.replace("\t", TAB_PIECE)
        for n in range(max_len, 1, -1):
            text = text.replace(" " * n, blank_piece(n))
    return text


def postprocess_whitespace(text: str, max_len: int = MAX_BLANK_LENGTH) -> str:
    """SPTokenizer.postprocess: the reverse mapping, applied to decoded text."""
    text = text.replace(NEWLINE_PIECE, "\n").replace(TAB_PIECE, "\t")
    for n in range(2, max_len + 1):
        text = text.replace(blank_piece(n), " " * n)
    return text


def clean_up_tokenization(text: str) -> str:
    """transformers PreTrainedTokenizerBase.clean_up_tokenization (applied by decode by default)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(old, new)
    return text


_CJK = "[\u4e00-\u9fff]"
_PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))


def process_response(text: str) -> str:
    """What upstream `chat()` does to the decoded answer (`process_response` in the HF remote modeling code and in
    THUDM/VisualGLM-6B model/chat.py): strip, "[[训练时间]]" -> "2023年", and half-width , ! : ; ? next to a CJK
    character -> full-width (the nmt_nfkc normalizer turned them half-width on encode)."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for half, full in _PUNCT:
        h = re.escape(half)
        text = re.sub(f"({_CJK}){h}", lambda m: m.group(1) + full, text)
        text = re.sub(f"{h}({_CJK})", lambda m: full + m.group(1), text)
    return text


def _token_name(value) -> str | None:
    # Saved configs spell tokens as plain strings or as {"content": ...} dicts depending on the transformers version.
    if isinstance(value, dict):
        return value.get("content")
    return value


class ChatGLMTokenizer:
    """ChatGLM-6B / VisualGLM-6B tokenizer equal to upstream's `ChatGLMTokenizer` (see the module docstring).

    `encode(text, add_special_tokens=True)` == upstream `tokenizer.encode(text)`; `encode_text(text)` == upstream
    `tokenizer.encode(text, add_special_tokens=False)`; `decode(ids)` == upstream `tokenizer.decode(ids)`.
    """

    def __init__(
        self,
        model_proto: bytes,
        *,
        do_lower_case: bool = False,
        remove_space: bool = False,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        padding_side: str = "left",
        max_blank_length: int = MAX_BLANK_LENGTH,
        **tokens: str,
    ) -> None:
        unknown = set(tokens) - set(DEFAULT_TOKENS)
        if unknown:
            raise TypeError(f"unknown token arguments: {sorted(unknown)}")
        self._model_proto = bytes(model_proto)
        self.do_lower_case = bool(do_lower_case)
        self.remove_space = bool(remove_space)
        self.num_image_tokens = int(num_image_tokens)
        self.padding_side = padding_side
        self.max_blank_length = int(max_blank_length)
        for name, default in DEFAULT_TOKENS.items():
            setattr(self, name, tokens.get(name, default))
        self._load()

    # ------------------------------------------------------------------------------------------------ loading

    def _load(self) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
        self._specials = [getattr(self, a) for a in _HF_SPECIAL_ATTRS if getattr(self, a) is not None]
        alternation = "|".join(re.escape(t) for t in sorted(set(self._specials), key=len, reverse=True))
        self._special_re = re.compile(f"({alternation})") if alternation else None
        for name in DEFAULT_TOKENS:  # the named tokens must exist in the sp model (upstream would map them to <unk>)
            token = getattr(self, name)
            if token is not None and self._sp.piece_to_id(token) == self._sp.unk_id() and token != self.unk_token:
                raise ValueError(f"{name} {token!r} is not a piece of the sentencepiece model")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChatGLMTokenizer:
        """Read `ice_text.model` and (if present) `tokenizer_config.json` from a model folder."""
        path = Path(path)
        model_proto = (path / VOCAB_FILE).read_bytes()
        cfg_path = path / CONFIG_FILE
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        kwargs = {name: _token_name(cfg[name]) for name in DEFAULT_TOKENS if name in cfg}
        return cls(
            model_proto,
            do_lower_case=cfg.get("do_lower_case", False),
            remove_space=cfg.get("remove_space", False),
            num_image_tokens=cfg.get("num_image_tokens", DEFAULT_NUM_IMAGE_TOKENS),
            padding_side=cfg.get("padding_side", "left"),
            **kwargs,
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_sp", "_special_re", "_specials"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()

    @property
    def model_proto(self) -> bytes:
        return self._model_proto

    # ------------------------------------------------------------------------------------------------ vocab

    @property
    def sp_model(self) -> spm.SentencePieceProcessor:
        return self._sp

    @property
    def vocab_size(self) -> int:
        """num_image_tokens + sentencepiece pieces (130344 for the official files; the model pads to 130528)."""
        return self.num_image_tokens + self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def _token_to_id(self, token: str) -> int:
        # SPTokenizer.__getitem__(str)
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self._sp.piece_to_id(token) + self.num_image_tokens

    def _id_to_token(self, index: int) -> str:
        # SPTokenizer.__getitem__(int)
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        sp_id = index - self.num_image_tokens
        if not 0 <= sp_id < self._sp.get_piece_size():
            raise ValueError(f"token id {index} is outside the tokenizer vocabulary (size {self.vocab_size})")
        return self._sp.id_to_piece(sp_id)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int):
            return self._id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._id_to_token(int(i)) for i in ids if int(i) not in special]

    def _maybe_id(self, token: str | None) -> int | None:
        return None if token is None else self._token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._maybe_id(self.bos_token)  # <sop>

    @property
    def eos_token_id(self) -> int | None:
        return self._maybe_id(self.eos_token)  # <eop>

    @property
    def end_token_id(self) -> int | None:
        return self._maybe_id(self.end_token)  # </s>

    @property
    def mask_token_id(self) -> int | None:
        return self._maybe_id(self.mask_token)

    @property
    def gmask_token_id(self) -> int | None:
        return self._maybe_id(self.gmask_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._maybe_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._maybe_id(self.unk_token)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self._specials))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids dropped by decode(skip_special_tokens=True): <sop> <eop> <unk> <pad> [MASK] (upstream: not [gMASK])."""
        return [self._token_to_id(t) for t in self.all_special_tokens]

    # ------------------------------------------------------------------------------------------------ encode

    def _preprocess_text(self, text: str) -> str:
        # ChatGLMTokenizer.preprocess_text
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return text

    def _split_on_specials(self, text: str) -> list[str]:
        if self._special_re is None:
            return [text] if text else []
        return [part for part in self._special_re.split(text) if part]

    def tokenize(self, text: str) -> list[str]:
        """Pieces as upstream `tokenizer.tokenize(text)` (PreTrainedTokenizer.tokenize + ChatGLMTokenizer._tokenize)."""
        specials = set(self._specials)
        if self.do_lower_case:  # lowercase everything but the special-token strings, before splitting on them
            text = "".join(p if p in specials else p.lower() for p in self._split_on_specials(text))
        parts = self._split_on_specials(text)
        for i, part in enumerate(parts):
            if part in specials:  # plain-string special tokens strip whitespace on both sides by default
                if i + 1 < len(parts) and parts[i + 1]:
                    parts[i + 1] = parts[i + 1].lstrip()
                if i > 0 and parts[i - 1]:
                    parts[i - 1] = parts[i - 1].rstrip()
        pieces: list[str] = []
        for part in parts:
            if not part:
                continue
            if part in specials:
                pieces.append(part)
            else:
                segment = preprocess_whitespace(self._preprocess_text(part), max_len=self.max_blank_length)
                pieces.extend(self._sp.encode_as_pieces(segment))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Upstream `tokenizer.encode(text, add_special_tokens=...)`: with special tokens, [gMASK] <sop> at the END."""
        ids = [self._token_to_id(p) for p in self.tokenize(text)]
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def encode_text(self, text: str) -> list[int]:
        """Plain text ids without [gMASK]/<sop> (= upstream `encode(text, add_special_tokens=False)`, the call the
        official fine-tuning scripts make for prompt pieces and answers)."""
        return self.encode(text, add_special_tokens=False)

    def sp_encode(
        self, text: str, add_dummy_prefix: bool = True, linebreak: bool = True, whitespaces: bool = True
    ) -> list[int]:
        """Upstream `SPTokenizer.encode` (no special-token splitting, no remove_space / lower-casing). With
        `add_dummy_prefix=False` it encodes "<n>" + text and drops the first two pieces ("▁", "<n>"), so the result
        has no leading "▁" (useful to continue a sequence in the middle of a word)."""
        text = preprocess_whitespace(text, linebreak, whitespaces, self.max_blank_length)
        if not add_dummy_prefix:
            text = NEWLINE_PIECE + text
        ids = [i + self.num_image_tokens for i in self._sp.encode_as_ids(text)]
        return ids if add_dummy_prefix else ids[2:]

    def build_inputs_with_special_tokens(
        self, token_ids_0: Sequence[int], token_ids_1: Sequence[int] | None = None
    ) -> list[int]:
        """Upstream: `a + [gMASK, <sop>]`, and with a second sequence `a + [gMASK, <sop>] + b + [<eop>]`."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [self.eos_token_id]
        return ids

    # ------------------------------------------------------------------------------------------------ decode

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        return postprocess_whitespace(self._sp.decode_pieces(list(tokens)), self.max_blank_length)

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = True) -> str:
        """Upstream `tokenizer.decode(ids)`: pads dropped, pieces decoded by sentencepiece (CONTROL pieces such as
        [gMASK] / <sop> / <eop> give ""), "<n>"/"<|tab|>"/"<|blank_N|>" mapped back, then clean-up of spaces."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        pad = self.pad_token_id
        ids = [i for i in ids if i != pad]
        tokens = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        text = self.convert_tokens_to_string(tokens) if tokens else ""
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text


# ---------------------------------------------------------------------------------------------------- prompts

IMAGE_LENGTH = 32  # config.json `image_length`: the Q-Former's 32 query tokens


def build_prompt(
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    lang: str = "zh",
    *,
    style: str = "visualglm",
    image: bool = False,
    image_length: int = IMAGE_LENGTH,
    image_placeholder: str = "<unk>",
) -> str:
    """Prompt TEXT of upstream's chat formats; encode it with `ChatGLMTokenizer.encode` (which appends
    [gMASK] <sop>) to get the exact upstream ids.

    style="visualglm" (VisualGLM-6B):
      [`<img>` + image_placeholder * image_length + `</img>`] + for each (q, a) in history `问：{q}\\n答：{a}\\n`
      + `问：{query}\\n答：`; lang="en": `Q:{q}\\nA:{a}\\n` ... `Q:{query}\\nA:`. The image part comes once, before
      all turns. Read in THUDM/VisualGLM-6B model/chat.py `chat()` @ e314fb9c4e778851414f39784317c72765acec47
      (`"<img>{}</img>".format(path)`, `"问：{}\\n答：{}\\n"`, `"问：{}\\n答："`, English `"Q:{}\\nA:{}\\n"`,
      `"Q:{}\\nA:"`;
      the image path is removed from the text and the ids are encode("<img>") + [pad_token_id] * 32 +
      encode("</img>...") + [gMASK, <sop>]); the HF remote code (greensheng/chatglm-6b branch `visual` @
      11f77d9d72c4d314086664bf135910c35c079ca9, modeling_chatglm.py `build_inputs_with_image`) is the same in
      Chinese only, with [unk_token_id] * image_length as placeholders; finetune_visualglm.py (same VisualGLM-6B
      commit) builds `encode("<img>") + [pad_token_id] * 32 + encode("</img>问：" + prompt + "\\n答：")`.
      Because "<unk>" and "<pad>" are special-token strings that upstream's encode splits out (stripping whitespace
      around them, and each neighbouring segment keeps its own "▁" prefix), encoding this text gives exactly those
      three concatenated pieces: pass image_placeholder="<unk>" (HF chat, the default) or "<pad>" (fine-tuning /
      SAT chat). The model swaps the placeholder embeddings for the image at index len(encode_text("<img>")).
    style="chatglm" (ChatGLM-6B text model, HF remote `chat()`/`build_inputs` on main @
      8b7d33596d18c5e83e2da052d05ca4db02e60620; also THUDM/ChatGLM-6B ptuning/main.py @
      401bf3a8a7dd8a26fba189551dccfc61a7079b4e): no history -> the bare query; otherwise for each i, (q, a)
      `[Round {i}]\\n问：{q}\\n答：{a}\\n` then `[Round {len(history)}]\\n问：{query}\\n答：` (rounds count from 0).
      Chinese only, no image.
    """
    history = list(history or [])
    if style == "chatglm":
        if lang != "zh" or image:
            raise ValueError("the ChatGLM-6B [Round N] format is Chinese-only and has no image")
        if not history:
            return query
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
        return prompt + f"[Round {len(history)}]\n问：{query}\n答："
    if style != "visualglm":
        raise ValueError(f"unknown prompt style {style!r} (visualglm | chatglm)")
    if lang == "zh":
        turn, last = "问：{}\n答：{}\n", "问：{}\n答："
    elif lang == "en":
        turn, last = "Q:{}\nA:{}\n", "Q:{}\nA:"
    else:
        raise ValueError(f"unknown language {lang!r} (zh | en)")
    prompt = f"<img>{image_placeholder * image_length}</img>" if image else ""
    prompt += "".join(turn.format(q, a) for q, a in history)
    return prompt + last.format(query)


# ---------------------------------------------------------------------------------------------------- model files
# Minimal protobuf wire-format access to sentencepiece's ModelProto (field numbers from sentencepiece_model.proto):
# ModelProto.pieces = 1 (SentencePiece: piece = 1, score = 2, type = 3), trainer_spec = 2, normalizer_spec = 3
# (name = 1, add_dummy_prefix = 3, remove_extra_whitespaces = 4, escape_whitespaces = 5), denormalizer_spec = 5.

PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """(field number, wire type, value bytes, the whole raw field) for each field of a message, in order."""
    out, pos = [], 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _read_varint(buf, pos)
            value, pos = buf[pos:end], end
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, wire, value, buf[start:pos]))
    return out


def model_pieces(model_proto: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of a sentencepiece model, in id order (type 1 NORMAL .. 6 BYTE)."""
    pieces = []
    for number, _, value, _ in _fields(model_proto):
        if number != 1:
            continue
        piece, score, ptype = "", 0.0, PIECE_NORMAL
        for n, _, v, _ in _fields(value):
            if n == 1:
                piece = v.decode("utf-8")
            elif n == 2:
                score = struct.unpack("<f", v)[0]
            elif n == 3:
                ptype = _read_varint(v, 0)[0]
        pieces.append((piece, score, ptype))
    return pieces


def normalizer_settings(model_proto: bytes) -> dict:
    """The normalizer fields that change encoding (proto2 defaults when a field is absent)."""
    spec = {"name": "", "add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True}
    for number, _, value, _ in _fields(model_proto):
        if number == 3:
            for n, _, v, _ in _fields(value):
                if n == 1:
                    spec["name"] = v.decode("utf-8")
                elif n in (3, 4, 5):
                    key = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}[n]
                    spec[key] = bool(_read_varint(v, 0)[0])
    return spec


def _piece_field(piece: str, ptype: int, score: float = 0.0) -> bytes:
    data = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(data)) + data + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(ptype)
    return b"\x0a" + _varint(len(body)) + body


def _glm_layout(model_proto: bytes, max_blank_length: int = MAX_BLANK_LENGTH) -> bytes:
    """Rearrange a freshly trained model into ice_text.model's layout: learned pieces (with <unk> <s> </s> <pad> <n>
    first), then the 8 CONTROL GLM pieces, <|tab|> and <|blank_2..N|> (USER_DEFINED), then the 256 byte pieces."""
    fields = _fields(model_proto)
    head, tail, rest = [], [], []
    for number, _, value, raw in fields:
        if number == 1:
            ptype = next((_read_varint(v, 0)[0] for n, _, v, _ in _fields(value) if n == 3), PIECE_NORMAL)
            (tail if ptype == PIECE_BYTE else head).append(raw)
        else:
            rest.append(raw)
    if len(tail) != 256:
        raise ValueError(f"expected 256 byte-fallback pieces, found {len(tail)}")
    added = [_piece_field(p, PIECE_CONTROL) for p in GLM_SPECIAL_PIECES]
    added += [_piece_field(TAB_PIECE, PIECE_USER_DEFINED)]
    added += [_piece_field(blank_piece(n), PIECE_USER_DEFINED) for n in range(2, max_blank_length + 1)]
    return b"".join(head + added + tail + rest)


def _training_text(text: str) -> str:
    # Newlines become the <n> user symbol as in encoding; tabs and space runs are not learned (they get their own
    # pieces after training), so they collapse to single spaces here.
    return " ".join(text.replace("\n", NEWLINE_PIECE).split())


def write_tiny_tokenizer(
    out_dir: str | Path,
    corpus: Sequence[str],
    vocab_size: int,
    *,
    name_or_path: str = "glmtune/tiny-visualglm-6b",
) -> dict[str, int]:
    """Train a tiny `ice_text.model` (unigram, nmt_nfkc, dummy prefix, split digits, byte fallback, <n> user symbol,
    <pad> = 3, as the official one) and write it with a `tokenizer_config.json` in the official layout.

    `vocab_size` is the number of learned pieces (the official model has 130000: the [MASK] id); the model then
    holds vocab_size + 8 GLM control pieces + 80 whitespace pieces + 256 byte pieces, laid out like ice_text.model,
    so [MASK] = vocab_size, [gMASK] = +1, <sop> = +4, <eop> = +5, <|tab|> = +8, <|blank_N|> = +7+N, bytes from +88.
    Sentencepiece requires vocab_size to be at least the number of distinct characters + 5 and refuses one larger
    than the corpus supports (its error says the limit). Single-threaded, unshuffled, fixed seed: same corpus and
    vocab_size -> same bytes. Returns the token ids and `sp_vocab_size` (the model's piece count).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences = [s for s in (_training_text(t) for t in corpus) if s]
    if not sentences:
        raise ValueError("empty corpus")
    spm.set_random_generator_seed(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size + 256,  # the trainer counts the byte pieces; they move behind the GLM pieces below
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=True,
        user_defined_symbols=[NEWLINE_PIECE],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        hard_vocab_limit=True,
        num_threads=1,
        input_sentence_size=max(101, len(sentences)),  # sentencepiece wants 0 or > 100; all sentences are kept
        shuffle_input_sentence=False,
        seed_sentencepiece_size=1_000_000,
        minloglevel=2,
    )
    proto = _glm_layout(buf.getvalue())
    (out_dir / VOCAB_FILE).write_bytes(proto)

    config = {  # THUDM/visualglm-6b tokenizer_config.json without auto_map
        "name_or_path": name_or_path,
        "bos_token": "<sop>",
        "eos_token": "<eop>",
        "end_token": "</s>",
        "gmask_token": "[gMASK]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "num_image_tokens": 0,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    tok = ChatGLMTokenizer.from_pretrained(out_dir)
    if tok.mask_token_id != vocab_size:
        raise RuntimeError(f"[MASK] landed at {tok.mask_token_id}, expected {vocab_size}")
    return {
        "unk_token_id": tok.unk_token_id,
        "pad_token_id": tok.pad_token_id,
        "end_token_id": tok.end_token_id,
        "mask_token_id": tok.mask_token_id,
        "gmask_token_id": tok.gmask_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "sp_vocab_size": tok.vocab_size,
    }
