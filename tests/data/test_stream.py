"""glmtune/data/stream.py: determinism, rank split, exact resume, worker order, bad samples, epochs, shuffle."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch

from glmtune.data.stream import BatchStream, StreamSpec, make_loader, rank_records, record_batches
from glmtune.models import get_family

N_TRAIN = 64


@pytest.fixture(scope="module")
def proc(tiny_glm41v):
    return get_family("glm41v").load_processor(tiny_glm41v)


@pytest.fixture(scope="module")
def train_file(shapes_data) -> str:
    path = shapes_data / "train.jsonl"
    assert len(path.read_text().splitlines()) == N_TRAIN
    return str(path)


def take(iterable, n):
    return list(itertools.islice(iter(iterable), n))


def sources(spec: StreamSpec, epoch: int = 0) -> list[str]:
    return [source for source, _, _ in rank_records(spec, epoch)]


def assert_same_batches(a: list[dict], b: list[dict]):
    assert [x["index"] for x in a] == [x["index"] for x in b]
    assert [x["epoch"] for x in a] == [x["epoch"] for x in b]
    for x, y in zip(a, b):
        assert x["samples"] == y["samples"] and x["tokens"] == y["tokens"]
        assert set(x["batch"]) == set(y["batch"])
        for key in x["batch"]:
            assert torch.equal(x["batch"][key], y["batch"][key]), (x["index"], key)


# --- determinism, shuffle --------------------------------------------------------------------------


def test_same_spec_same_batches(train_file, proc):
    spec = StreamSpec(files=[train_file], batch_size=4, shuffle_buffer=8, seed=3)
    a = take(BatchStream(spec, proc), 18)  # 16 batches per epoch: crosses into epoch 1
    b = take(BatchStream(spec, proc), 18)
    assert [x["index"] for x in a] == list(range(18))
    assert [x["epoch"] for x in a] == [0] * 16 + [1] * 2
    for x, y in zip(a, b):
        assert torch.equal(x["batch"]["input_ids"], y["batch"]["input_ids"])
        assert torch.equal(x["batch"]["labels"], y["batch"]["labels"])
        assert torch.equal(x["batch"]["pixel_values"], y["batch"]["pixel_values"])
    first = a[0]
    assert first["samples"] == 4 and first["skipped"] == [] and first["error"] is None and first["truncated"] == 0
    assert first["tokens"] == int(first["batch"]["attention_mask"].sum())
    assert first["batch"]["input_ids"].shape[0] == 4
    assert first["batch"]["image_grid_thw"].tolist() == [[1, 8, 8]] * 4


def test_shuffle_changes_order_keeps_records(train_file):
    plain = StreamSpec(files=[train_file], shuffle_buffer=0)
    in_order = sources(plain)
    assert in_order == [f"{train_file}:{i}" for i in range(1, N_TRAIN + 1)]
    assert sources(StreamSpec(files=[train_file], shuffle_buffer=1)) == in_order  # 1 = keep file order
    spec = StreamSpec(files=[train_file], shuffle_buffer=16, seed=0)
    epoch0, epoch1 = sources(spec, 0), sources(spec, 1)
    other_seed = sources(StreamSpec(files=[train_file], shuffle_buffer=16, seed=1), 0)
    for order in (epoch0, epoch1, other_seed):
        assert order != in_order
        assert Counter(order) == Counter(in_order)  # same multiset: every record exactly once
    assert epoch0 != epoch1  # a new order every epoch
    assert epoch0 != other_seed
    assert sources(spec, 0) == epoch0  # but reproducible
    # the bounded buffer only moves a record so far ahead: the first output comes from the first 17 records
    assert int(epoch0[0].rsplit(":", 1)[1]) <= 17
    # whole shuffled batches hold the same records as the per-epoch order
    batched = [s for _, epoch, recs in take(record_batches(StreamSpec(files=[train_file], shuffle_buffer=16,
                                                                       batch_size=5)), 13) for s, _, _ in recs]
    assert batched == epoch0


def test_shuffle_buffer_larger_than_data(train_file):
    spec = StreamSpec(files=[train_file], shuffle_buffer=1000, seed=0)
    order = sources(spec)
    assert sorted(order) == sorted(f"{train_file}:{i}" for i in range(1, N_TRAIN + 1))
    assert order != sorted(order, key=lambda s: int(s.rsplit(":", 1)[1]))


# --- ranks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_rank_split_is_a_partition(train_file, proc, shuffle_buffer):
    specs = [StreamSpec(files=[train_file], batch_size=4, shuffle_buffer=shuffle_buffer, rank=r, world_size=2,
                        epochs=1) for r in range(2)]
    r0, r1 = sources(specs[0]), sources(specs[1])
    assert len(r0) == len(r1) == N_TRAIN // 2
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(f"{train_file}:{i}" for i in range(1, N_TRAIN + 1))
    if shuffle_buffer == 0:  # round-robin over the file
        assert r0 == [f"{train_file}:{i}" for i in range(1, N_TRAIN + 1, 2)]
    # the encoded streams agree: 8 batches of 4 per rank, every sample once
    for spec in specs:
        out = list(BatchStream(spec, proc))
        assert [x["index"] for x in out] == list(range(8))
        assert sum(x["samples"] for x in out) == N_TRAIN // 2


def test_rank_split_over_several_files(shapes_data):
    files = [str(shapes_data / "train.jsonl"), str(shapes_data / "val.jsonl")]
    everything = sources(StreamSpec(files=files))
    assert len(everything) == 80
    per_rank = [sources(StreamSpec(files=files, rank=r, world_size=3, shuffle_buffer=4, seed=5)) for r in range(3)]
    assert [len(x) for x in per_rank] == [27, 27, 26]
    assert sorted(sum(per_rank, [])) == sorted(everything)


# --- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_resume_is_exact(train_file, proc, shuffle_buffer):
    # 64 records in batches of 5: 13 batches per epoch (the last one of 4); batches 11..17 cross the boundary
    spec = StreamSpec(files=[train_file], batch_size=5, shuffle_buffer=shuffle_buffer, seed=7)
    fresh = take(BatchStream(spec, proc), 18)
    assert [x["samples"] for x in fresh[10:15]] == [5, 5, 4, 5, 5]
    assert [x["epoch"] for x in fresh[10:15]] == [0, 0, 0, 1, 1]
    resumed = take(BatchStream(spec, proc, start_batch=11), 7)
    assert [x["index"] for x in resumed] == list(range(11, 18))
    assert_same_batches(resumed, fresh[11:18])
    # resuming at the very start of an epoch
    assert_same_batches(take(BatchStream(spec, proc, start_batch=13), 2), fresh[13:15])


def test_resume_with_ranks(train_file, proc):
    spec = StreamSpec(files=[train_file], batch_size=3, shuffle_buffer=4, rank=1, world_size=2)
    fresh = take(BatchStream(spec, proc), 13)  # 32 records per rank: 11 batches per epoch
    assert_same_batches(take(BatchStream(spec, proc, start_batch=9), 4), fresh[9:13])


# --- workers ---------------------------------------------------------------------------------------


def test_workers_keep_batch_order(train_file, proc):
    spec = StreamSpec(files=[train_file], batch_size=6, shuffle_buffer=8, seed=1)
    start = 5
    single = take(make_loader(spec, proc, start_batch=start, num_workers=0), 9)
    it = iter(make_loader(spec, proc, start_batch=start, num_workers=2))
    multi = take(it, 9)
    del it  # shuts the workers down
    assert [x["index"] for x in single] == list(range(start, start + 9))
    assert [x["index"] for x in multi] == list(range(start, start + 9))  # crosses the epoch end at 11
    assert_same_batches(multi, single)
    # and both are the plain stream's batches
    assert_same_batches(single, take(BatchStream(spec, proc), start + 9)[start:])


def test_workers_finite_stream(train_file, proc):
    spec = StreamSpec(files=[train_file], batch_size=10, epochs=1)
    out = list(make_loader(spec, proc, num_workers=2))
    assert [x["index"] for x in out] == list(range(7))
    assert sum(x["samples"] for x in out) == N_TRAIN


# --- bad samples -----------------------------------------------------------------------------------


@pytest.fixture()
def bad_file(tmp_path, shapes_data) -> tuple[str, dict[int, str]]:
    """A jsonl mixing good records with one bad line of each kind; returns (path, {line: reason substring})."""
    image = str(shapes_data / "images" / "train_00000.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"<html>not a png</html>")

    def good(answer):
        return json.dumps({"messages": [{"role": "user", "content": "What shape is it?", "image": image},
                                        {"role": "assistant", "content": answer}]})

    lines = [
        good("circle"),                                                                   # 1
        '{"messages": [{"role": "user", "content": "broken"',                             # 2 bad JSON
        good("square"),                                                                   # 3
        json.dumps({"messages": [{"role": "user", "content": "q", "image": str(tmp_path / "missing.png")},
                                 {"role": "assistant", "content": "a"}]}),               # 4 missing image
        good("triangle"),                                                                 # 5
        json.dumps({"messages": [{"role": "robot", "content": "q"},
                                 {"role": "assistant", "content": "a"}]}),               # 6 wrong role
        json.dumps({"messages": [{"role": "user", "content": "q", "image": str(corrupt)},
                                 {"role": "assistant", "content": "a"}]}),               # 7 corrupt image
        good("red"),                                                                      # 8
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    reasons = {2: "invalid JSON", 4: "image not found", 6: "unknown role 'robot'", 7: "cannot read image"}
    return str(path), reasons


def test_bad_samples_skipped_once(bad_file, proc):
    path, reasons = bad_file
    spec = StreamSpec(files=[path], batch_size=3, on_bad_sample="skip", epochs=1)
    out = list(BatchStream(spec, proc))
    assert [x["index"] for x in out] == [0, 1, 2]
    assert [x["samples"] for x in out] == [2, 1, 1]
    assert all(x["error"] is None for x in out)
    skipped = [s for x in out for s in x["skipped"]]
    assert [s for s, _ in skipped] == [f"{path}:{n}" for n in sorted(reasons)]
    for (source, reason), n in zip(skipped, sorted(reasons)):
        assert reasons[n] in reason, (source, reason)
    assert [[s for s, _ in x["skipped"]] for x in out] == [[f"{path}:2"], [f"{path}:4", f"{path}:6"],
                                                           [f"{path}:7"]]
    # the good ones come through, in order: answers decode from the labels
    answers = []
    for x in out:
        for row in x["batch"]["labels"]:
            answers.append(proc.decode([v for v in row.tolist() if v != -100]))
    assert answers == ["circle", "square", "triangle", "red"]
    assert sum(x["batch"]["pixel_values"].shape[0] for x in out) == 4 * 64


def test_bad_samples_reported_by_one_rank_only(bad_file, proc):
    path, reasons = bad_file
    seen = []
    good = 0
    for rank in range(2):
        spec = StreamSpec(files=[path], batch_size=2, on_bad_sample="skip", epochs=1, rank=rank, world_size=2,
                          shuffle_buffer=3)
        for x in BatchStream(spec, proc):
            seen += [s for s, _ in x["skipped"]]
            good += x["samples"]
    assert sorted(seen) == sorted(f"{path}:{n}" for n in reasons)
    assert good == 4


def test_all_bad_batch_is_none(bad_file, proc):
    path, _ = bad_file
    spec = StreamSpec(files=[path], batch_size=8, on_bad_sample="skip", epochs=1, max_length=10)  # image cut
    (out,) = list(BatchStream(spec, proc))
    assert out["batch"] is None and out["samples"] == 0 and out["tokens"] == 0
    assert len(out["skipped"]) == 8
    assert "data.max_length=10" in out["skipped"][0][1]


def test_bad_sample_error_stops(bad_file, proc):
    path, reasons = bad_file
    spec = StreamSpec(files=[path], batch_size=1, on_bad_sample="error", epochs=1)
    out = list(BatchStream(spec, proc))
    assert [x["index"] for x in out] == [0, 1]
    assert out[0]["error"] is None and out[0]["samples"] == 1
    err = out[1]["error"]
    assert isinstance(err, tuple) and len(err) == 2
    assert err[0] == f"{path}:2" and reasons[2] in err[1]
    assert out[1]["batch"] is None
    # with bigger batches the first bad item still stops the stream at its batch
    spec = StreamSpec(files=[path], batch_size=3, on_bad_sample="error", epochs=1)
    (only,) = list(BatchStream(spec, proc))
    assert only["index"] == 0 and only["error"][0] == f"{path}:2"
    # resumed past the first bad line, the next one is reported
    (resumed,) = list(BatchStream(StreamSpec(files=[path], batch_size=1, on_bad_sample="error", epochs=1), proc,
                                  start_batch=2))[1:]
    assert resumed["index"] == 3 and resumed["error"][0] == f"{path}:4" and reasons[4] in resumed["error"][1]


def test_bad_sample_error_through_the_loader(bad_file, proc):
    path, _ = bad_file
    spec = StreamSpec(files=[path], batch_size=3, on_bad_sample="error", epochs=1)
    (only,) = list(make_loader(spec, proc))
    assert tuple(only["error"])[0] == f"{path}:2"


# --- epochs ----------------------------------------------------------------------------------------


def test_epochs_end(train_file, proc):
    spec = StreamSpec(files=[train_file], batch_size=5, epochs=1, shuffle_buffer=8)
    out = list(BatchStream(spec, proc))
    assert [x["index"] for x in out] == list(range(13))
    assert [x["samples"] for x in out] == [5] * 12 + [4]
    assert {x["epoch"] for x in out} == {0}
    two = list(record_batches(StreamSpec(files=[train_file], batch_size=5, epochs=2, shuffle_buffer=8)))
    assert [b for b, _, _ in two] == list(range(26))
    assert [e for _, e, _ in two] == [0] * 13 + [1] * 13
    assert sum(len(r) for _, _, r in two) == 2 * N_TRAIN


def test_empty_rank_stops(tmp_path, proc):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello!"},
                                             {"role": "assistant", "content": "Yes"}]}) + "\n")
    # rank 1 of 2 has no record at all: the endless training stream must still end
    assert list(BatchStream(StreamSpec(files=[str(path)], rank=1, world_size=2), proc)) == []
    out = take(BatchStream(StreamSpec(files=[str(path)], rank=0, world_size=2), proc), 3)
    assert [(x["index"], x["epoch"], x["samples"]) for x in out] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
