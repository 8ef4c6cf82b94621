"""Raw data formats -> canonical `Sample`.

Each format module (`glm4`, `visualglm`, `llava`, `sharegpt`) exposes

    matches(record: dict) -> bool                                  # used by fmt="auto"
    parse(record: dict, source: str, base_dir: Path) -> Sample     # not yet validated

This package adds the file reader (`iter_records`, streaming, never loads a whole file) and the
entry point `parse_record` (pick the format, parse, `Sample.validate()`).

Errors are never raised by the reader: a broken record comes out as a `SampleError` in place of the
record, so that the caller (stream.py) alone decides between skipping and stopping.

Auto-detection order (`AUTO_ORDER`), first match wins; the `matches` functions are written to be
mutually exclusive on the keys that tell the formats apart, the order only settles odd records:

    visualglm  "img" key                                   {"img", "prompt", "label"}
    sharegpt   "images" key (plural, LLaMA-Factory)        {"messages" | "conversations", "images"}
    glm4       "messages" key without "images"             {"messages": [{"role", "content", "image"?}]}
    llava      "conversations" key without "images"        {"image"?, "conversations": [{"from", "value"}]}

A text-only ShareGPT record without an "images" key is read as glm4 ("messages") or llava
("conversations"); both give the same Sample, so nothing is lost.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from glmtune.data.sample import Sample, SampleError, Turn

# --- helpers shared by the format modules --------------------------------------------------------
# They live here (above the submodule imports) because every format module needs them and the
# package must stay a flat list of one module per format.


def require(obj: dict, key: str, kind: type | tuple[type, ...], source: str, where: str = "") -> object:
    """obj[key] checked against `kind`; the error names the field path (`where` + key)."""
    name = f"{where}{key}"
    if key not in obj:
        raise SampleError(source, f"missing field {name!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise SampleError(source, f"field {name!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", list: "a list", dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def resolve_image(value: object, base_dir: Path, source: str, name: str) -> Path:
    """An image path from a record -> absolute Path of an existing file.

    Relative paths are relative to `base_dir` (the data file's folder), never to the working
    directory, so that a dataset folder can be moved as a whole.
    """
    if not isinstance(value, str) or not value.strip():
        raise SampleError(source, f"field {name!r} must be a non-empty image path, got {value!r}")
    if "://" in value:
        raise SampleError(source, f"field {name!r}: image URLs are not supported, download first: {value}")
    # abspath (not resolve) normalises `..` without following symlinks: error messages then show
    # the path the user wrote.
    path = Path(os.path.abspath(Path(base_dir) / value))
    if not path.is_file():
        raise SampleError(source, f"image not found: {path}")
    return path


def parse_turns(
    record: dict, key: str, role_key: str, text_key: str, roles: dict[str, str], source: str
) -> list[Turn]:
    """record[key] = [{role_key: ..., text_key: ...}, ...] -> Turns (text kept verbatim)."""
    items = require(record, key, list, source)
    turns = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]."
        if not isinstance(item, dict):
            raise SampleError(source, f"field '{key}[{i}]' must be an object, got {type(item).__name__}")
        role = role_of(require(item, role_key, str, source, where), roles, source, where + role_key)
        turns.append(Turn(role, require(item, text_key, str, source, where)))
    return turns


def role_of(value: object, roles: dict[str, str], source: str, name: str) -> str:
    """Map a raw role tag to a canonical role; tool-use roles get their own clear message."""
    if value in roles:
        return roles[value]
    if value in ("observation", "tool", "function", "function_call", "ipython"):
        raise SampleError(source, f"field {name!r}: role {value!r} is not supported (tool calling is not)")
    raise SampleError(source, f"field {name!r}: unknown role {value!r}; expected one of {sorted(roles)}")


# --- formats ---------------------------------------------------------------------------------------

from glmtune.data.formats import glm4, llava, sharegpt, visualglm  # noqa: E402  (needs the helpers above)

FORMATS = {"glm4": glm4, "visualglm": visualglm, "llava": llava, "sharegpt": sharegpt}
AUTO_ORDER = ("visualglm", "sharegpt", "glm4", "llava")


def detect_format(record: dict, source: str) -> str:
    """Name of the first format in AUTO_ORDER that matches `record`; SampleError if none does."""
    if not isinstance(record, dict):
        raise SampleError(source, f"a record must be a JSON object, got {type(record).__name__}")
    for name in AUTO_ORDER:
        if FORMATS[name].matches(record):
            return name
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise SampleError(
        source, f"cannot tell the data format from the keys ({keys}); known formats: {', '.join(AUTO_ORDER)}"
    )


def parse_record(record: dict, source: str, base_dir: Path, fmt: str = "auto") -> Sample:
    """One raw record -> validated Sample. `fmt` is a FORMATS key or "auto".

    An unknown `fmt` is a configuration error (ValueError), not a bad sample.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected 'auto' or one of {sorted(FORMATS)}")
    if not isinstance(record, dict):
        raise SampleError(source, f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record, source)
    return FORMATS[fmt].parse(record, source, Path(base_dir)).validate()


# --- streaming reader ------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def iter_records(path: str | os.PathLike, chunk_size: int = 1 << 16) -> Iterator[tuple[str, dict | SampleError]]:
    """Yield (source, record) for each record of a .jsonl or .json file, reading it incrementally.

    source is "<path>:<line>" with the 1-based line where the record starts. A record that cannot
    be read comes out as a SampleError in place of the dict (the caller applies the skip policy).
    `chunk_size` (characters read at a time from .json files) only matters for tests.

    A file whose content starts with "[" is one JSON array whatever its suffix: VisualGLM's fewshot
    data is a JSON array, and saved as .jsonl it was read line by line, every record bad.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: unsupported data file type {suffix!r}; expected .jsonl or .json")
    if suffix == ".json" or _starts_with_array(path):
        return _iter_json(path, chunk_size)
    return _iter_jsonl(path)


def _starts_with_array(path: str | os.PathLike) -> bool:
    """Whether the first non-blank character of the file (after a UTF-8 BOM) is "["; reads only up to it."""
    with open(path, "rb") as f:
        head = f.read(3)
        if head != b"\xef\xbb\xbf":
            f.seek(0)
        while chunk := f.read(4096):
            text = chunk.lstrip(b" \t\r\n")
            if text:
                return text[:1] == b"["
    return False


def _iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict | SampleError]]:
    # Binary lines decoded one by one: a stray invalid byte spoils one record, not the file.
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            source = f"{path}:{number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield source, SampleError(source, f"invalid JSON: not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text.rstrip("\r\n"))  # so that colno counts in this line
            except json.JSONDecodeError as e:
                yield source, SampleError(source, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(record, dict):
                yield source, SampleError(source, f"invalid JSON: expected an object, got {type(record).__name__}")
                continue
            yield source, record


def _iter_json(path: str | os.PathLike, chunk_size: int) -> Iterator[tuple[str, dict | SampleError]]:
    """A top-level array of objects, decoded element by element with raw_decode over a buffer that
    holds only the unread part of the file (memory ~ chunk_size + the largest record).

    A file whose first character is "{" is read as a sequence of objects (JSON lines saved as
    .json, or a single object). A syntax error ends the file: after it there is no telling where
    the next element starts.
    """
    buf, pos, line, eof = "", 0, 1, False  # `line` is the line number of buf[pos]

    def fill() -> bool:
        # Drop what was consumed and read more; reads at least as much as is buffered so that a
        # record spanning many chunks is re-decoded O(log n) times, not O(n).
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = f.read(max(chunk_size, len(buf) - pos))
        if not chunk:
            eof = True
            return False
        buf, pos = buf[pos:] + chunk, 0
        return True

    def peek() -> str:
        # Skip whitespace; return the next character, "" at end of file.
        nonlocal pos, line
        while True:
            end = _WS.match(buf, pos).end()
            line += buf.count("\n", pos, end)
            pos = end
            if pos < len(buf):
                return buf[pos]
            if not fill():
                return ""

    def decode() -> object:
        nonlocal pos, line
        while True:
            try:
                value, end = _DECODER.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                # An error at the buffer's tail (or an unterminated string) may just mean the
                # record continues in the next chunk; anywhere else it is a real syntax error.
                at_tail = e.pos >= len(buf) - 8 or e.msg.startswith("Unterminated string")
                if at_tail and fill():
                    continue
                line += buf.count("\n", pos, e.pos)
                raise
            if end == len(buf) and fill():  # a number may continue in the next chunk
                continue
            line += buf.count("\n", pos, end)
            pos = end
            return value

    def error(reason: str) -> tuple[str, SampleError]:
        source = f"{path}:{line}"
        return source, SampleError(source, f"invalid JSON: {reason}")

    with open(path, encoding="utf-8-sig") as f:
        try:
            first = peek()
            if first not in ("", "[", "{"):
                yield error(f"expected a top-level array of objects, found {first!r}")
                return
            in_array = first == "["
            pos += in_array
            after_comma = False  # an element must follow a ","; "]" there is a syntax error
            while True:
                c = peek()
                if in_array and c == "]" and not after_comma:
                    pos += 1
                    c = peek()
                    if c:
                        yield error(f"unexpected {c!r} after the closing ']'")
                    return
                if c == "":
                    if in_array:
                        yield error("the file ends inside the top-level array (missing ']')")
                    return
                start = line
                value = decode()
                source = f"{path}:{start}"
                if isinstance(value, dict):
                    yield source, value
                else:
                    yield source, SampleError(source, f"invalid JSON: expected an object, got {type(value).__name__}")
                if in_array:
                    c = peek()
                    after_comma = c == ","
                    if after_comma:
                        pos += 1
                    elif c not in ("]", ""):
                        reason = f"expected ',' or ']' after an element, found {c!r}; the rest of the file is skipped"
                        yield error(reason)
                        return
        except json.JSONDecodeError as e:
            # e.msg ends in " at" where e.lineno/colno would follow; they count from our buffer's
            # start, not the file's, and the line is already in the source.
            yield error(f"{e.msg.removesuffix(' at').removesuffix(' starting')}; the rest of the file is skipped")
        except UnicodeDecodeError as e:
            yield error(f"not UTF-8 text ({e.reason}); the rest of the file is skipped")
