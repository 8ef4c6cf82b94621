"""Native GLM-4 tokenizer (GLM-4-9B-Chat, GLM-4V-9B) on tiktoken, with no remote code.

Upstream ships `tokenization_chatglm.py` (remote code) over two files that we read directly:
- `tokenizer.model`: one `base64(token bytes) rank` per line, ranks 0..151328, a byte-level BPE in tiktoken's format;
- `tokenizer_config.json`: the special tokens and their ids in `added_tokens_decoder` (151329..151342 officially),
  plus eos/pad token names and the padding side.

The chat layout built by `build_chat_ids` follows upstream's `ChatGLM4Tokenizer.apply_chat_template` /
`build_single_message` (read in the vendored copy sophgo/LLM-TPU models/GLM4v/token_config/tokenization_chatglm.py
@ 031f42f1ada41fd87417eabc5ccaddc0c7855acd):
    [gMASK]<sop> then per message: <|role|> + enc(metadata + "\\n") + [image span] + enc(content)
    and <|assistant|> (no newline) as the generation prompt.

`write_tiny_tokenizer` writes a small tokenizer in the same two-file layout, for tiny test checkpoints.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex
import tiktoken
import torch

from glmtune.config import CheckpointError

# GLM-4 pre-tokenizer, verbatim from ChatGLM4Tokenizer.__init__ (`pat_str`) in the vendored remote code
# sophgo/LLM-TPU models/GLM4v/token_config/tokenization_chatglm.py @ 031f42f1ada41fd87417eabc5ccaddc0c7855acd
# (same string in ssbuild/deep_training src/deep_training/nlp/models/glm4v/tokenization_chatglm.py @ 6724c7e3).
# It is the original (2023) cl100k_base pattern; today's tiktoken spells cl100k with possessive quantifiers, so the
# string is pinned here rather than borrowed from tiktoken.
GLM4_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The official special tokens in the official order (ids 151329..151342 in the real files). Only the names and the
# order live here: ids are always read from tokenizer_config.json.
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip

# GLM-4V's image placeholder inside a message: the single <|endoftext|> is what the model swaps for the vision
# embeddings (upstream `message_prefix` in apply_chat_template).
IMAGE_SPAN_TOKENS = ("<|begin_of_image|>", "<|endoftext|>", "<|end_of_image|>")
CHAT_ROLES = ("system", "user", "assistant", "observation")


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            token_b64, rank = line.split()
            token = base64.b64decode(token_b64)
            if token in ranks:
                raise CheckpointError(f"{path}:{lineno}: token {token!r} listed twice")
            ranks[token] = int(rank)
    # Contiguous ranks make "is this id a BPE token" a range check (decode) and match both official and tiny files.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


def _token_name(value) -> str | None:
    # transformers writes special tokens either as plain strings or as {"content": ...} dicts depending on version.
    if isinstance(value, dict):
        return value.get("content")
    return value


class Glm4Tokenizer:
    """GLM-4 tokenizer: tiktoken BPE over `tokenizer.model` plus special tokens from `tokenizer_config.json`.

    `vocab_size` counts the BPE ranks only and `len()` counts BPE ranks + special tokens, as upstream does
    (151329 and 151343 for the official files; the model's embedding is padded further, to 151552).
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_ids: dict[str, int],
        *,
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        padding_side: str = "left",
        model_max_length: int | None = None,
        image_size: int | None = None,
    ):
        overlap = set(special_ids.values()) & set(range(len(mergeable_ranks)))
        if overlap:
            raise ValueError(
                f"special token ids {sorted(overlap)} collide with BPE ranks 0..{len(mergeable_ranks) - 1}"
            )
        for name in (eos_token, pad_token):
            if name not in special_ids:
                raise ValueError(f"{name!r} is not one of the special tokens {sorted(special_ids)}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        # Kept verbatim so pickling can rebuild the tiktoken Encoding in a DataLoader worker.
        self._init_args = dict(
            mergeable_ranks=mergeable_ranks,
            special_ids=dict(special_ids),
            eos_token=eos_token,
            pad_token=pad_token,
            padding_side=padding_side,
            model_max_length=model_max_length,
            image_size=image_size,
        )
        self._ranks = mergeable_ranks
        self.special_ids: dict[str, int] = dict(special_ids)
        self._special_by_id = {i: name for name, i in special_ids.items()}
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_token_id = special_ids[eos_token]
        self.pad_token_id = special_ids[pad_token]
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.image_size = image_size
        self._enc = tiktoken.Encoding(
            name="glm4",
            pat_str=GLM4_PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=dict(special_ids),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Glm4Tokenizer:
        """Load from a checkpoint folder holding `tokenizer.model` and `tokenizer_config.json`."""
        path = Path(path)
        ranks = _read_ranks(path / "tokenizer.model")
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder")
        if not decoder:
            raise CheckpointError(f"{path / 'tokenizer_config.json'} has no added_tokens_decoder: special ids unknown")
        special_ids = {}
        for id_str, entry in decoder.items():
            name = _token_name(entry)
            if name in special_ids:
                raise ValueError(f"special token {name!r} appears twice in added_tokens_decoder")
            special_ids[name] = int(id_str)
        return cls(
            ranks,
            special_ids,
            eos_token=_token_name(config.get("eos_token")) or "<|endoftext|>",
            pad_token=_token_name(config.get("pad_token")) or "<|endoftext|>",
            padding_side=config.get("padding_side", "left"),
            model_max_length=config.get("model_max_length"),
            image_size=config.get("image_size"),
        )

    # -- pickling: rebuild the Rust-backed Encoding instead of relying on how tiktoken pickles itself
    def __getstate__(self) -> dict:
        return self._init_args

    def __setstate__(self, state: dict) -> None:
        self.__init__(
            state["mergeable_ranks"],
            state["special_ids"],
            **{k: v for k, v in state.items() if k not in ("mergeable_ranks", "special_ids")},
        )

    # -- sizes and ids
    @property
    def vocab_size(self) -> int:
        return len(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks) + len(self.special_ids)

    @property
    def prefix_ids(self) -> list[int]:
        """`[gMASK] <sop>`, which upstream puts before every prompt (`get_prefix_tokens`)."""
        return [self.special_ids["[gMASK]"], self.special_ids["<sop>"]]

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a reply in upstream `chat()`: eos, <|user|>, <|observation|> (config.json eos_token_id)."""
        return [self.eos_token_id, self.special_ids["<|user|>"], self.special_ids["<|observation|>"]]

    def convert_tokens_to_ids(self, token: str | Sequence[str]) -> int | list[int]:
        """Special token name (or a string that is a single BPE token) -> id; lists map element-wise."""
        if not isinstance(token, str):
            return [self.convert_tokens_to_ids(t) for t in token]
        if token in self.special_ids:
            return self.special_ids[token]
        rank = self._ranks.get(token.encode("utf-8"))
        if rank is None:
            raise KeyError(f"{token!r} is neither a special token nor a single BPE token")
        return rank

    # -- encode / decode
    def encode(self, text: str, allowed_special: str | Iterable[str] = (), add_prefix: bool = False) -> list[int]:
        """Text -> ids. By default special-token strings in `text` stay plain text (user data can never inject
        `<|assistant|>`); pass `allowed_special="all"` or a set of names to turn those strings into special ids.
        `add_prefix=True` prepends `[gMASK]<sop>` like upstream `tokenizer.encode(text)`.
        """
        if allowed_special == "all" or allowed_special:
            allowed = "all" if allowed_special == "all" else set(allowed_special)
            unknown = set() if allowed == "all" else allowed - set(self.special_ids)
            if unknown:
                raise ValueError(f"unknown special tokens {sorted(unknown)}")
            # disallowed_special=(): special strings that are not allowed are encoded as text, never an error.
            ids = self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        else:
            ids = self._enc.encode_ordinary(text)
        return self.prefix_ids + ids if add_prefix else ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Ids -> text. Invalid UTF-8 (a reply cut mid-character) becomes U+FFFD; ids outside the vocabulary (the
        embedding's padding rows) decode to nothing, as upstream's `_convert_id_to_token` does."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        n = len(self._ranks)
        keep = []
        for i in ids:
            i = int(i)
            if 0 <= i < n or (i in self._special_by_id and not skip_special_tokens):
                keep.append(i)
        return self._enc.decode(keep, errors="replace")

    # -- batching
    def pad(
        self,
        batch: Sequence[Sequence[int]],
        side: str | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad id lists to one length with `pad_token_id`; returns (input_ids, attention_mask), both int64 [B, T].
        `side` defaults to the tokenizer's padding side ("left" upstream, which generation needs)."""
        side = side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if not batch:
            raise ValueError("cannot pad an empty batch")
        rows = [
            torch.as_tensor(list(map(int, seq)) if not isinstance(seq, torch.Tensor) else seq, dtype=torch.long)
            for seq in batch
        ]
        length = max(r.numel() for r in rows)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            n = row.numel()
            span = slice(length - n, length) if side == "left" else slice(0, n)
            ids[b, span] = row
            mask[b, span] = 1
        return ids, mask


def build_chat_ids(
    tokenizer: Glm4Tokenizer,
    messages: Sequence[dict],
    add_generation_prompt: bool = True,
    add_prefix: bool = True,
) -> list[int]:
    """Token ids of a conversation in upstream GLM-4 / GLM-4V chat layout.

    Each message is {"role", "content", optional "metadata", optional "image"}; a truthy "image" inserts the
    placeholder span <|begin_of_image|><|endoftext|><|end_of_image|> right after the role line (at most one image
    per conversation, like upstream). Layout, e.g. for one user turn with an image:
        [gMASK] <sop> <|user|> "\\n" <boi> <|endoftext|> <eoi> "question" <|assistant|>
    The "{metadata}\\n" line and the content are encoded separately (as upstream does), so a newline never merges
    with the first content characters. Messages with neither content nor image are skipped, as upstream does.
    """
    ids = list(tokenizer.prefix_ids) if add_prefix else []
    seen_image = False
    for message in messages:
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {CHAT_ROLES}")
        if message.get("tools"):
            # Upstream replaces tools by a long built-in Chinese system prompt; not reproduced here on purpose.
            raise ValueError("messages with 'tools' are not supported by build_chat_ids")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise TypeError(f"message content must be a string, got {type(content).__name__}")
        image_ids: list[int] = []
        if message.get("image"):
            if seen_image:
                raise ValueError("GLM-4V supports one image per conversation")
            seen_image = True
            image_ids = tokenizer.convert_tokens_to_ids(list(IMAGE_SPAN_TOKENS))
        if not content and not image_ids:
            continue
        ids.append(tokenizer.special_ids[f"<|{role}|>"])
        ids += tokenizer.encode(f"{message.get('metadata') or ''}\n")
        ids += image_ids
        ids += tokenizer.encode(content)
    if add_generation_prompt:
        ids.append(tokenizer.special_ids["<|assistant|>"])
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Tiny tokenizer in the official layout


def _base_byte_order() -> list[int]:
    """The order of the 256 single-byte ranks in the official tokenizer.model: printable Latin-1 bytes first
    (0x21-0x7E, 0xA1-0xAC, 0xAE-0xFF), then the remaining bytes ascending (0x00-0x20, 0x7F-0xA0, 0xAD), i.e. the
    GPT-2 byte-to-unicode table order. Checked against the first 256 lines of the real file."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in set(printable)]
    return printable + rest


def _merge_pair(word: list[bytes], a: bytes, b: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_bpe(corpus: Sequence[str], n_merges: int) -> list[bytes]:
    """Deterministic byte-level BPE over the GLM-4 pre-tokenized corpus; returns up to `n_merges` new tokens in
    rank order. Each step merges the most frequent adjacent pair (ties: smallest merged bytes, then pair), and stops
    early once every pre-token is a single token."""
    chunks = Counter(piece.encode("utf-8") for text in corpus for piece in regex.findall(GLM4_PAT_STR, text))
    order = sorted(chunks)
    words = [[bytes([c]) for c in chunk] for chunk in order]
    freqs = [chunks[chunk] for chunk in order]
    known = {bytes([c]) for c in range(256)}
    new_tokens: list[bytes] = []
    while len(new_tokens) < n_merges:
        pairs: Counter = Counter()
        for word, freq in zip(words, freqs):
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p[0] + p[1], p))
        words = [_merge_pair(w, a, b) if len(w) > 1 else w for w in words]
        # Two different pairs can spell the same bytes ("ab"+"c", "a"+"bc"): one rank per byte string.
        if a + b not in known:
            known.add(a + b)
            new_tokens.append(a + b)
    return new_tokens


def write_tiny_tokenizer(
    out_dir: str | Path,
    corpus: Sequence[str],
    n_merges: int,
    *,
    model_max_length: int = 8192,
    image_size: int | None = 1120,
) -> dict[str, int]:
    """Write a small `tokenizer.model` + `tokenizer_config.json` in the official GLM-4V layout and return the
    special-token ids (numbered right after the BPE vocabulary, in the official order).

    The config mirrors THUDM/glm-4v-9b's keys except `auto_map` (glmtune runs no remote code). Pass
    `image_size=None, model_max_length=128000` for the glm-4-9b-chat flavour. Same corpus -> same bytes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([b]) for b in _base_byte_order()] + learn_bpe(corpus, n_merges)
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for rank, tok in enumerate(tokens)]
    (out_dir / "tokenizer.model").write_bytes("".join(lines).encode("ascii"))

    special_ids = {name: len(tokens) + i for i, name in enumerate(GLM4_SPECIAL_TOKENS)}
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    config = {
        "added_tokens_decoder": {str(i): {"content": name, **flags} for name, i in special_ids.items()},
        "additional_special_tokens": list(GLM4_SPECIAL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": model_max_length,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }
    if image_size is not None:
        config["image_size"] = image_size
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return special_ids
