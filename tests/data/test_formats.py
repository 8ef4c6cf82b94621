"""Raw formats -> Sample: the bundled samples, auto-detection, the streaming reader, bad inputs."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from glmtune.data.formats import FORMATS, detect_format, iter_records, parse_record
from glmtune.data.sample import Sample, SampleError, Turn

DATA = Path(__file__).resolve().parents[2] / "data_formats"
SAMPLE_FILES = {
    "glm4": DATA / "glm4" / "train.jsonl",
    "visualglm": DATA / "visualglm" / "dataset.json",
    "llava": DATA / "llava" / "train.json",
    "sharegpt": DATA / "sharegpt" / "train.jsonl",
}


def read_all(path: Path, fmt: str = "auto") -> list[Sample | SampleError]:
    """What a skip-policy reader would see: every record as a Sample or its SampleError."""
    out = []
    for source, record in iter_records(path):
        if isinstance(record, SampleError):
            out.append(record)
            continue
        try:
            out.append(parse_record(record, source, path.parent, fmt))
        except SampleError as e:
            out.append(e)
    return out


def U(text: str) -> Turn:
    return Turn("user", text)


def A(text: str) -> Turn:
    return Turn("assistant", text)


def S(text: str) -> Turn:
    return Turn("system", text)


def expected_samples(fmt: str) -> list[Sample]:
    path = SAMPLE_FILES[fmt]
    img = lambda name: DATA / fmt / "images" / f"{name}.png"  # noqa: E731
    src = lambda line: f"{path}:{line}"  # noqa: E731
    if fmt == "glm4":
        return [
            Sample([U("<image>What shape is in the picture?"), A("A red square.")], [img("red_square")], src(1)),
            Sample(
                [
                    S("You are a careful visual assistant."),
                    U("<image>What colour is the shape?"),
                    A("Blue."),
                    U("And what shape is it?"),
                    A("It is a circle."),
                ],
                [img("blue_circle")],
                src(2),
            ),
            Sample([U("介绍一下你自己。"), A("我是一个视觉语言模型助手。")], [], src(3)),
        ]
    if fmt == "visualglm":
        return [
            Sample([U("<image>这张图片里有什么形状？"), A("一个绿色的三角形。")], [img("green_triangle")], src(2)),
            Sample([U("<image>What colour is the square?"), A("Yellow.")], [img("yellow_square")], src(7)),
            Sample([U("<image>Describe the image."), A("A red circle on a white background.")], [img("red_circle")],
                   src(12)),
        ]
    if fmt == "llava":
        return [
            Sample(
                [
                    U("<image>\nWhat is in the image?"),
                    A("A blue square."),
                    U("Where is it?"),
                    A("In the middle of the picture."),
                ],
                [img("blue_square")],
                src(2),
            ),
            Sample([U("What colour is the circle?\n<image>"), A("Green.")], [img("green_circle")], src(12)),
            Sample([U("Name a primary colour."), A("Red.")], [], src(20)),
        ]
    assert fmt == "sharegpt"
    return [
        Sample(
            [U("<image>What shape is this?"), A("A triangle."), U("What colour is it?"), A("Red.")],
            [img("red_triangle")],
            src(1),
        ),
        Sample(
            [S("Answer briefly."), U("<image><image>Which of the two shapes is a circle?"), A("The second one.")],
            [img("blue_triangle"), img("yellow_circle")],
            src(2),
        ),
        Sample([U("Say hello."), A("Hello!")], [], src(3)),
    ]


# --- the bundled samples ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(SAMPLE_FILES))
@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_bundled_samples_parse(fmt, mode):
    got = read_all(SAMPLE_FILES[fmt], fmt if mode == "explicit" else "auto")
    assert got == expected_samples(fmt)
    for sample in got:
        assert all(p.is_absolute() and p.is_file() for p in sample.images)


@pytest.mark.parametrize("fmt", sorted(SAMPLE_FILES))
def test_auto_detection_picks_the_format_of_each_bundled_record(fmt):
    names = [detect_format(record, source) for source, record in iter_records(SAMPLE_FILES[fmt])]
    assert names == [fmt] * 3


def test_formats_registry():
    assert sorted(FORMATS) == ["glm4", "llava", "sharegpt", "visualglm"]
    for module in FORMATS.values():
        assert callable(module.parse) and callable(module.matches)


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"img": "a.png", "prompt": "q", "label": "a"}, "visualglm"),
        ({"messages": [], "images": []}, "sharegpt"),
        ({"conversations": [], "images": ["a.png"]}, "sharegpt"),
        ({"messages": []}, "glm4"),
        ({"conversations": [], "image": "a.png", "id": 1}, "llava"),
        ({"conversations": []}, "llava"),
    ],
)
def test_auto_detection_rules(record, fmt):
    assert detect_format(record, "f.jsonl:1") == fmt


def test_auto_detection_failure_names_keys_and_formats():
    with pytest.raises(SampleError) as e:
        detect_format({"instruction": "x", "output": "y"}, "f.jsonl:4")
    assert str(e.value) == (
        "f.jsonl:4: cannot tell the data format from the keys (instruction, output); "
        "known formats: visualglm, sharegpt, glm4, llava"
    )


def test_unknown_format_name_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="unknown data format 'alpaca'"):
        parse_record({"messages": []}, "f:1", tmp_path, "alpaca")


def test_unsupported_file_type(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported data file type '\.csv'"):
        iter_records(tmp_path / "data.csv")


# --- image paths -----------------------------------------------------------------------------------


def test_image_paths_absolute_relative_and_dotdot(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "data").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(b"not decoded at parse time")
    record = {
        "messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}],
        "images": [str(tmp_path / "imgs" / "a.png"), "../imgs/b.png"],
    }
    sample = parse_record(record, "x:1", tmp_path / "data", "sharegpt")
    assert sample.images == [tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "b.png"]


def test_llava_image_list_and_null(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    turns = [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "ok"}]
    record = {"image": ["a.png", "b.png"], "conversations": turns}
    assert parse_record(record, "x:1", tmp_path, "llava").images == [tmp_path / "a.png", tmp_path / "b.png"]
    record = {"image": None, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    assert parse_record(record, "x:1", tmp_path, "auto").images == []


# --- bad records: SampleError with file:line and the reason -----------------------------------------

GOOD = {  # a valid line 1 in each format, so that the bad record is on line 2
    "glm4": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "visualglm": {"img": "red.png", "prompt": "q", "label": "a"},
    "llava": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "sharegpt": {"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "a"}],
                 "images": ["red.png"]},
}

def msgs(*turns, **extra) -> dict:
    """{"messages": [...]} from (role, content) or (role, content, image) tuples."""
    items = [dict(zip(("role", "content", "image"), t)) for t in turns]
    return {"messages": items, **extra}


def convs(*turns, **extra) -> dict:
    """{"conversations": [...]} from (from, value) tuples."""
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


QA = (("user", "q"), ("assistant", "a"))
IMG_QA = (("user", "<image>q"), ("assistant", "a"))

BAD_RECORDS = [
    # (format, record, reason: the exact text after "<file>:2: ")
    ("glm4", {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     "missing field 'messages[0].content'"),
    ("glm4", {"messages": "hi"}, "field 'messages' must be a list, got str"),
    ("glm4", msgs(("user", 3), ("assistant", "a")), "field 'messages[0].content' must be a string, got int"),
    ("glm4", {"messages": ["hi"]}, "field 'messages[0]' must be an object, got str"),
    ("glm4", msgs(("bot", "q"), ("assistant", "a")),
     "field 'messages[0].role': unknown role 'bot'; expected one of ['assistant', 'system', 'user']"),
    ("glm4", msgs(("user", "q"), ("observation", "{}")),
     "field 'messages[1].role': role 'observation' is not supported (tool calling is not)"),
    ("glm4", {"messages": [{"role": "system", "content": "", "tools": [{"name": "f"}]}, *msgs(*QA)["messages"]]},
     "field 'messages[0].tools': tool definitions are not supported"),
    ("glm4", msgs(("user", "q"), ("user", "q2"), ("assistant", "a")),
     "turns must alternate user/assistant, got ['user', 'user', 'assistant']"),
    ("glm4", msgs(*QA, ("system", "s")), "a system turn may only come first"),
    ("glm4", msgs(*QA, ("user", "q2")), "the last turn must be an assistant answer (nothing to learn otherwise)"),
    ("glm4", {"messages": []}, "sample has no turns"),
    ("glm4", msgs(("user", "q"), ("assistant", "a", "red.png")),
     "field 'messages[1].image': only user messages may have an image, not assistant"),
    ("glm4", msgs(*IMG_QA), "field 'messages[0].content' contains <image>; glm4 data gives images in 'image'"),
    ("glm4", msgs(("user", "q", "nope.png"), ("assistant", "a")), "image not found: {dir}/nope.png"),
    ("visualglm", {"img": "red.png", "prompt": "q"}, "missing field 'label'"),
    ("visualglm", {"img": "", "prompt": "q", "label": "a"}, "field 'img' must be a non-empty image path, got ''"),
    ("visualglm", {"img": "sub/missing.png", "prompt": "q", "label": "a"}, "image not found: {dir}/sub/missing.png"),
    ("llava", convs(("human", "q"), ("gpt", "a"), image="red.png"), "0 <image> placeholder(s) but 1 image(s)"),
    ("llava", convs(("human", "<image>\nq"), ("gpt", "a")), "1 <image> placeholder(s) but 0 image(s)"),
    ("llava", convs(("human", "q"), ("gpt", "<image>"), image="red.png"), "<image> may only appear in user turns"),
    ("llava", {"image": 5, "conversations": []}, "field 'image' must be a path or a list of paths, got int"),
    ("llava", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
     "missing field 'conversations[0].value'"),
    ("llava", convs(("gpt", "a"), ("human", "q"), ("gpt", "b")),
     "turns must alternate user/assistant, got ['assistant', 'user', 'assistant']"),
    ("sharegpt", msgs(("user", "<image><image>q"), ("assistant", "a"), images=["red.png"]),
     "2 <image> placeholder(s) but 1 image(s)"),
    ("sharegpt", {"images": ["red.png"]}, "missing field 'messages'"),
    ("sharegpt", msgs(*IMG_QA, images="red.png"), "field 'images' must be a list, got str"),
    ("sharegpt", msgs(*QA, images=[], videos=["v.mp4"]), "field 'videos' is not supported"),
    ("sharegpt", convs(("human", "<image>q"), ("function_call", "{}"), images=["red.png"]),
     "field 'conversations[1].from': role 'function_call' is not supported (tool calling is not)"),
    ("sharegpt", msgs(("system", "s1"), *QA, images=[], system="s2"),
     "a system prompt is given both in 'system' and as the first message"),
    ("sharegpt", msgs(*IMG_QA, images=["http://example.com/a.png"]),
     "field 'images[0]': image URLs are not supported, download first: http://example.com/a.png"),
    ("sharegpt", msgs(*IMG_QA, images=["../elsewhere/red.png"]), "image not found: {parent}/elsewhere/red.png"),
]


@pytest.mark.parametrize("fmt, record, reason", BAD_RECORDS, ids=[f"{f}-{i}" for i, (f, *_) in enumerate(BAD_RECORDS)])
@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_bad_record_gives_sample_error_with_file_line_and_reason(tmp_path, fmt, record, reason, mode):
    (tmp_path / "red.png").write_bytes(b"exists; not decoded at parse time")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD[fmt]) + "\n" + json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    got = read_all(path, fmt if mode == "explicit" else "auto")
    assert len(got) == 2 and isinstance(got[0], Sample)
    error = got[1]
    assert isinstance(error, SampleError)
    expected = reason.format(dir=tmp_path, parent=tmp_path.parent)
    assert error.source == f"{path}:2"
    assert str(error) == f"{path}:2: {expected}"


# --- the .jsonl reader -----------------------------------------------------------------------------


def test_jsonl_reader_line_numbers_blank_lines_and_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        "\ufeff".encode() + b'{"a": 1}\n'  # a BOM (Windows editors) is not an error
        b"\n"
        b"   \n"
        b'{"a": 2\n'  # invalid JSON
        b"[1, 2]\n"  # valid JSON, not an object
        b'{"a": "\xff"}\n'  # not UTF-8
        b'{"a": 3}\r\n'
        b'{"a": 4}'  # no final newline
    )
    got = [(s, r if isinstance(r, dict) else str(r)) for s, r in iter_records(path)]
    assert got == [
        (f"{path}:1", {"a": 1}),
        (f"{path}:4", f"{path}:4: invalid JSON: Expecting ',' delimiter (column 8)"),
        (f"{path}:5", f"{path}:5: invalid JSON: expected an object, got list"),
        (f"{path}:6", f"{path}:6: invalid JSON: not UTF-8 text (invalid start byte at byte 7)"),
        (f"{path}:7", {"a": 3}),
        (f"{path}:8", {"a": 4}),
    ]


# --- the .json reader ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1 << 16])
def test_json_array_line_numbers_whatever_the_chunk_size(tmp_path, chunk_size):
    path = tmp_path / "d.json"
    path.write_text(
        '\n\n  [ {"a": 1},\n'  # line 3
        '{"b": "x\\ny",\n  "c": [1, 2]},\n'  # line 4, spans two lines and holds an escaped newline
        "1234567,\n"  # line 6: a number split across chunks must not become two
        '\n{"d": {"e": "\u732b\\u732b"}}\n'  # line 8, non-ASCII and \u escapes
        "]\n\n",
        encoding="utf-8",
    )
    got = [(s, r if isinstance(r, dict) else str(r)) for s, r in iter_records(path, chunk_size=chunk_size)]
    assert got == [
        (f"{path}:3", {"a": 1}),
        (f"{path}:4", {"b": "x\ny", "c": [1, 2]}),
        (f"{path}:6", f"{path}:6: invalid JSON: expected an object, got int"),
        (f"{path}:8", {"d": {"e": "猫猫"}}),
    ]


@pytest.mark.parametrize("chunk_size", [1, 5, 1 << 16])
def test_json_array_broken_tail_yields_the_head_first(tmp_path, chunk_size):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"b": 2},\n  {"c": 3\n  {"d": 4}\n]\n')
    records = iter_records(path, chunk_size=chunk_size)
    assert next(records) == (f"{path}:2", {"a": 1})  # before the reader has met the error
    assert next(records) == (f"{path}:3", {"b": 2})
    source, error = next(records)
    assert isinstance(error, SampleError)
    assert source == f"{path}:5"  # where the syntax error is, not where the element starts
    assert str(error) == f"{path}:5: invalid JSON: Expecting ',' delimiter; the rest of the file is skipped"
    assert list(records) == []  # the file stops there


SKIP = "; the rest of the file is skipped"
NO_CLOSE = "the file ends inside the top-level array (missing ']')"
NO_COMMA = "expected ',' or ']' after an element, found '{'"


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[{"a": 1},]', [("1", {"a": 1}), ("1", "invalid JSON: Expecting value" + SKIP)]),
        ('[{"a": 1}\n', [("1", {"a": 1}), ("2", "invalid JSON: " + NO_CLOSE)]),
        ('[{"a": 1} {"b": 2}]', [("1", {"a": 1}), ("1", "invalid JSON: " + NO_COMMA + SKIP)]),
        ('[{"a": 1}]\nx', [("1", {"a": 1}), ("2", "invalid JSON: unexpected 'x' after the closing ']'")]),
        ('[{"a": "unterminated}]', [("1", "invalid JSON: Unterminated string" + SKIP)]),
        ('[\n{"a": "raw\nnewline"}]', [("2", "invalid JSON: Invalid control character" + SKIP)]),
        ('"just a string"', [("1", "invalid JSON: expected a top-level array of objects, found '\"'")]),
        ("[]", []),
        ("  \n", []),
        # JSON lines saved as .json, or one object, are read as a sequence of objects
        ('{"a": 1}\n{"b": 2}\n', [("1", {"a": 1}), ("2", {"b": 2})]),
        ('{\n  "a": 1\n}\n', [("1", {"a": 1})]),
    ],
)
def test_json_reader_edge_cases(tmp_path, text, expected):
    path = tmp_path / "d.json"
    path.write_text(text)
    got = [(s, r if isinstance(r, dict) else str(r)) for s, r in iter_records(path, chunk_size=4)]
    assert got == [(f"{path}:{line}", r if isinstance(r, dict) else f"{path}:{line}: {r}") for line, r in expected]


def test_json_array_streams_in_bounded_memory(tmp_path):
    # ~6 MB of records: loading the file at once would allocate more than that; the reader must
    # stay near its chunk size (64 KiB characters) plus one record.
    path = tmp_path / "big.json"
    record = {"img": "x.png", "prompt": "q" * 200, "label": "a" * 200}
    with open(path, "w") as f:
        f.write("[\n")
        f.write(",\n".join(json.dumps(record) for _ in range(12_000)))
        f.write("\n]\n")
    assert path.stat().st_size > 5_000_000
    tracemalloc.start()
    try:
        count = 0
        last = None
        for source, rec in iter_records(path):
            assert rec == record
            count += 1
            last = source
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 12_000 and last == f"{path}:12001"
    assert peak < 1_000_000, peak


def test_json_record_much_larger_than_a_chunk(tmp_path):
    path = tmp_path / "d.json"
    big = {"label": "x" * 300_000, "n": list(range(1000))}
    path.write_text("[\n" + json.dumps(big) + ",\n" + json.dumps({"a": 1}) + "\n]")
    assert list(iter_records(path, chunk_size=10)) == [(f"{path}:2", big), (f"{path}:3", {"a": 1})]


@pytest.mark.parametrize("layout", ["one line", "pretty", "bom and blank lines"])
def test_a_json_array_is_read_as_one_whatever_the_suffix(tmp_path, layout):
    """VisualGLM's fewshot data (a JSON array) saved as .jsonl: its records, not one bad list per line."""
    records = [{"img": f"{i}.png", "prompt": "q", "label": f"a{i}"} for i in range(3)]
    text = {"one line": json.dumps(records), "pretty": json.dumps(records, indent=2),
            "bom and blank lines": "\ufeff\n\n  " + json.dumps(records, indent=1)}[layout]
    path = tmp_path / "data.jsonl"
    path.write_text(text + "\n", encoding="utf-8")
    got = list(iter_records(path))
    assert [r for _, r in got] == records
    first_line = {"one line": 1, "pretty": 2, "bom and blank lines": 4}[layout]
    assert got[0][0] == f"{path}:{first_line}"
    # JSON lines stay JSON lines, a .jsonl file of one object too
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert [(s, r) for s, r in iter_records(path)] == [(f"{path}:{i + 1}", r) for i, r in enumerate(records)]
