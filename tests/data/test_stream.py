"""glmtune/data/stream.py: one global record order split by rank, exact resume from any record position under any
process count, epochs back to back, shuffle, max_records, workers, bad samples."""

from __future__ import annotations

import itertools
import json
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from glmtune.data.sample import SampleError
from glmtune.data.stream import (
    BatchStream,
    StreamSpec,
    check_start,
    epoch_records,
    global_records,
    make_loader,
    record_batches,
)
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


def within(fn, seconds: float = 30):
    """fn() run in a thread: fails instead of hanging if the stream never ends."""
    box = []
    thread = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the stream did not end"
    return box[0]


def lines(path: str, n: int) -> list[str]:
    return [f"{path}:{i}" for i in range(1, n + 1)]


def epoch_sources(spec: StreamSpec, epoch: int = 0) -> list[str]:
    return [source for source, _, _ in epoch_records(spec, epoch)]


def reference(spec: StreamSpec, epochs: int) -> list[tuple[int, str]]:
    """(epoch, source) of the global order, built from the per-epoch orders laid back to back."""
    return [(e, s) for e in range(epochs) for s in epoch_sources(spec, e)]


def steps(spec: StreamSpec, start: int = 0, n: int | None = None) -> list[tuple[int, int, int, list[str]]]:
    """(k, epoch, position, sources) of this rank's batches."""
    out = ((k, e, p, [s for s, *_ in recs]) for k, e, p, recs in record_batches(spec, start))
    return list(out) if n is None else take(out, n)


def ranks(spec: StreamSpec, world: int, batch_size: int) -> list[StreamSpec]:
    return [replace(spec, rank=r, world_size=world, batch_size=batch_size) for r in range(world)]


def check_global_batches(specs: list[StreamSpec], start: int, ref: list[tuple[int, str]], n: int | None = None):
    """The ranks read from `start` (n batches each; None = to the end of a finite `ref`): global batch k is
    ref[start + k*G : start + (k+1)*G] cut into batch_size slices, rank 0 first; a rank yields a batch iff its
    slice is not empty; `epoch` is that of the rank's first record, `position` the records consumed. Returns the
    records read over all ranks, in global order."""
    size, g = specs[0].batch_size, specs[0].batch_size * len(specs)
    window = ref[start:] if n is None else ref[start:start + n * g]
    assert n is None or len(window) == n * g, "reference too short"
    expected = [[] for _ in specs]
    for k in range(-(-len(window) // g)):
        chunk = window[k * g:(k + 1) * g]
        for r, want in enumerate(expected):
            if mine := chunk[r * size:(r + 1) * size]:
                want.append((k, mine[0][0], start + k * g + len(chunk), [s for _, s in mine]))
    for spec, want in zip(specs, expected):
        assert steps(spec, start, n and len(want)) == want, (spec.rank, spec.world_size, start)
    return [s for _, s in window]


def assert_same_batches(a: list[dict], b: list[dict]):
    for key in ("index", "epoch", "position", "samples", "tokens"):
        assert [x[key] for x in a] == [x[key] for x in b], key
    for x, y in zip(a, b):
        assert set(x["batch"]) == set(y["batch"])
        for key in x["batch"]:
            assert torch.equal(x["batch"][key], y["batch"][key]), (x["index"], key)


# --- determinism, shuffle --------------------------------------------------------------------------


def test_same_spec_same_batches(train_file, proc):
    spec = StreamSpec(files=[train_file], batch_size=4, shuffle_buffer=8, seed=3)
    a = take(BatchStream(spec, proc), 17)  # 16 batches per epoch: crosses into epoch 1
    b = take(BatchStream(spec, proc), 17)
    assert [x["index"] for x in a] == list(range(17))
    assert [x["epoch"] for x in a] == [0] * 16 + [1]
    assert [x["position"] for x in a] == [4 * (k + 1) for k in range(17)]
    assert_same_batches(a, b)
    first = a[0]
    assert first["samples"] == 4 and first["skipped"] == [] and first["error"] is None and first["truncated"] == 0
    assert first["tokens"] == int(first["batch"]["attention_mask"].sum())
    assert first["batch"]["input_ids"].shape[0] == 4
    assert first["batch"]["image_grid_thw"].tolist() == [[1, 8, 8]] * 4


def test_shuffle_changes_order_keeps_records(train_file):
    in_order = lines(train_file, N_TRAIN)
    assert epoch_sources(StreamSpec(files=[train_file], shuffle_buffer=0)) == in_order
    assert epoch_sources(StreamSpec(files=[train_file], shuffle_buffer=1), 3) == in_order  # 1 = keep file order
    spec = StreamSpec(files=[train_file], shuffle_buffer=16, seed=0)
    epoch0, epoch1 = epoch_sources(spec, 0), epoch_sources(spec, 1)
    other_seed = epoch_sources(replace(spec, seed=1), 0)
    for order in (epoch0, epoch1, other_seed):
        assert order != in_order
        assert Counter(order) == Counter(in_order)  # same multiset: every record exactly once
    assert epoch0 != epoch1 and epoch0 != other_seed  # a new order every epoch and seed
    assert epoch_sources(spec, 0) == epoch0  # but reproducible
    big = epoch_sources(replace(spec, shuffle_buffer=1000))  # a buffer larger than the data
    assert big != in_order and sorted(big) == sorted(in_order)
    # the bounded buffer: the i-th output (0-based) is one of the first i + 1 + 16 records read
    for order in (epoch0, epoch1, other_seed):
        assert all(int(s.rsplit(":", 1)[1]) <= i + 1 + 16 for i, s in enumerate(order))
    # the seed does not depend on the rank: every process computes the same order
    for world in (2, 3):
        for rank in range(world):
            assert epoch_sources(replace(spec, rank=rank, world_size=world, batch_size=5), 1) == epoch1


# --- ranks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_rank_split_partitions_global_batches(shapes_data, world, shuffle_buffer):
    files = [str(shapes_data / "train.jsonl"), str(shapes_data / "val.jsonl")]
    spec = StreamSpec(files=files, shuffle_buffer=shuffle_buffer, seed=5, epochs=2)  # 2 x 80 records
    one = {k: (e, p, s) for k, e, p, s in steps(replace(spec, batch_size=3 * world))}  # 1 process, batch 3W
    per_rank = [{k: (e, p, s) for k, e, p, s in steps(r)} for r in ranks(spec, world, 3)]
    assert sorted(one) == list(range(-(-160 // (3 * world))))  # ends with a short global batch
    assert one[len(one) - 1][1] == 160
    for k, (_, position, records) in one.items():
        union = [s for rank in per_rank if k in rank for s in rank[k][2]]
        assert union == records, k  # the ranks' slices, rank 0 first, are the 1-process batch
        assert all(rank[k][1] == position for rank in per_rank if k in rank)
    if shuffle_buffer == 0:
        assert per_rank[0][0][2] == lines(files[0], 3)
        assert per_rank[1][0][2] == [f"{files[0]}:{i}" for i in (4, 5, 6)]
    # and the same against the global order itself (epochs, positions, which rank gets the short slice)
    check_global_batches(ranks(spec, world, 3), 0, reference(spec, 2))


def test_ranks_and_one_process_encode_the_same_records(train_file, proc):
    spec = StreamSpec(files=[train_file], shuffle_buffer=8, seed=2)
    one = take(BatchStream(replace(spec, batch_size=6), proc, start_record=57), 3)  # crosses the epoch end
    two = [take(BatchStream(s, proc, start_record=57), 3) for s in ranks(spec, 2, 3)]
    assert [x["position"] for x in one] == [63, 69, 75] == [x["position"] for x in two[1]]
    for k, x in enumerate(one):
        parts = [two[0][k], two[1][k]]
        assert [p["index"] for p in parts] == [k, k]
        assert x["samples"] == sum(p["samples"] for p in parts) == 6
        assert x["tokens"] == sum(p["tokens"] for p in parts)
        for key in ("pixel_values", "image_grid_thw"):
            assert torch.equal(x["batch"][key], torch.cat([p["batch"][key] for p in parts])), (k, key)
    # `epoch` is that of the rank's first record: global batch 1 = records 63..68, rank 1 starts at 66
    assert [x["epoch"] for x in one] == [x["epoch"] for x in two[0]] == [0, 0, 1]
    assert [x["epoch"] for x in two[1]] == [0, 1, 1]


# --- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_resume_from_any_record(train_file, shuffle_buffer):
    spec = StreamSpec(files=[train_file], shuffle_buffer=shuffle_buffer, seed=7)
    ref = reference(spec, 3)
    if shuffle_buffer == 0:
        assert [s for _, s in ref] == lines(train_file, N_TRAIN) * 3
    for start in (0, 1, 7, 13, 59, 63, 64, 65, 127, 130):
        for world in (1, 2, 3):
            check_global_batches(ranks(spec, world, 5), start, ref, n=3)  # up to 45 records past `start`


def test_resume_under_another_world_size(train_file):
    spec = StreamSpec(files=[train_file], shuffle_buffer=8, seed=4)
    ref = reference(spec, 3)
    read, position = [], 0
    for world, size, n in ((2, 5, 7), (3, 2, 10), (1, 7, 4), (2, 1, 11)):  # positions 70, 130, 158, 180
        read += check_global_batches(ranks(spec, world, size), position, ref, n=n)  # checks `position` too
        position += n * world * size
    assert position == 180 and read == [s for _, s in ref[:180]]
    by_epoch = [read[:64], read[64:128], read[128:]]
    assert all(Counter(e) == Counter(lines(train_file, N_TRAIN)) for e in by_epoch[:2])  # nothing lost/repeated
    assert len(set(by_epoch[2])) == len(by_epoch[2]) == 52


def test_resume_encoded_batches(train_file, proc):
    spec = StreamSpec(files=[train_file], batch_size=3, shuffle_buffer=8, seed=1, rank=1, world_size=2)
    fresh = take(BatchStream(spec, proc), 12)  # global batches of 6: rank 1 takes 63..65 of batch 10
    resumed = take(BatchStream(spec, proc, start_record=54), 3)
    assert [x["index"] for x in resumed] == [0, 1, 2]  # counted from the resume point
    for x in resumed:
        x["index"] += 9
    assert_same_batches(resumed, fresh[9:12])
    assert [x["position"] for x in resumed] == [60, 66, 72] and [x["epoch"] for x in resumed] == [0, 0, 1]


# --- positions, epochs -----------------------------------------------------------------------------


def test_positions_of_a_finite_stream(train_file):
    spec = StreamSpec(files=[train_file], epochs=1, shuffle_buffer=4)
    r0, r1 = (steps(s) for s in ranks(spec, 2, 3))  # 64 = 10 x 6 + 4: the last global batch is 3 + 1
    assert [p for _, _, p, _ in r0] == [p for _, _, p, _ in r1] == [6 * (k + 1) for k in range(10)] + [64]
    assert [len(s) for *_, s in r0] == [3] * 11 and [len(s) for *_, s in r1] == [3] * 10 + [1]
    out = [steps(s) for s in ranks(spec, 3, 5)]  # 64 = 4 x 15 + 4: ranks 1 and 2 get nothing of the last one
    assert [[(k, p) for k, _, p, _ in x] for x in out] == [[(0, 15), (1, 30), (2, 45), (3, 60), (4, 64)]] + [
        [(0, 15), (1, 30), (2, 45), (3, 60)]] * 2
    assert out[0][-1][3] == epoch_sources(spec)[60:]
    r0, r1 = (steps(s, 61) for s in ranks(spec, 2, 3))  # resumed near the end
    assert r0 == [(0, 0, 64, epoch_sources(spec)[61:])] and r1 == []
    assert [steps(s, 64) for s in ranks(spec, 2, 3)] == [[], []]


def test_global_batch_spans_two_epochs(train_file, proc):
    spec = StreamSpec(files=[train_file], shuffle_buffer=8, seed=3)
    e0, e1 = epoch_sources(spec, 0), epoch_sources(spec, 1)
    r0, r1 = (steps(s, n=7)[6] for s in ranks(spec, 2, 5))  # global batch 6 = records 60..69
    assert r0 == (6, 0, 70, e0[60:] + e1[:1])  # the end of epoch 0 and the start of epoch 1, no break
    assert r1 == (6, 1, 70, e1[1:6])
    # one process: never a short batch at the epoch end
    one = steps(replace(spec, batch_size=5), n=26)
    assert all(len(s) == 5 for *_, s in one) and one[12][3] == e0[60:] + e1[:1]
    assert [e for _, e, _, _ in one] == [0] * 13 + [1] * 13
    (x,) = take(BatchStream(replace(spec, batch_size=5, rank=0, world_size=2), proc, start_record=60), 1)
    (y,) = take(BatchStream(replace(spec, batch_size=5, rank=1, world_size=2), proc, start_record=60), 1)
    assert (x["index"], x["epoch"], x["position"], x["samples"]) == (0, 0, 70, 5)
    assert (y["index"], y["epoch"], y["position"], y["samples"]) == (0, 1, 70, 5)


def test_epochs_end(train_file, proc):
    spec = StreamSpec(files=[train_file], batch_size=5, epochs=1, shuffle_buffer=8)
    out = list(BatchStream(spec, proc))
    assert [x["index"] for x in out] == list(range(13))
    assert [x["samples"] for x in out] == [5] * 12 + [4]
    assert [x["position"] for x in out] == [5 * (k + 1) for k in range(12)] + [64]
    assert {x["epoch"] for x in out} == {0}
    two = steps(replace(spec, epochs=2))  # 128 records in batches of 5, across the epoch boundary
    assert [k for k, *_ in two] == list(range(26))
    assert [len(s) for *_, s in two] == [5] * 25 + [3]
    assert [e for _, e, _, _ in two] == [0] * 13 + [1] * 13
    assert [p for _, _, p, _ in two][-2:] == [125, 128]


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_max_records_caps_every_epoch(shapes_data, train_file, shuffle_buffer):
    spec = StreamSpec(files=[train_file], max_records=10, shuffle_buffer=shuffle_buffer, seed=9, epochs=3)
    orders = [epoch_sources(spec, e) for e in range(3)]
    for order in orders:  # every epoch: the same 10 records, each once
        assert sorted(order) == sorted(lines(train_file, 10))
    if shuffle_buffer:
        assert orders[0] != lines(train_file, 10) and len({tuple(o) for o in orders}) > 1
    else:
        assert orders == [lines(train_file, 10)] * 3
    assert [(e, s) for e, (s, _, _) in global_records(spec)] == reference(spec, 3)
    check_global_batches(ranks(spec, 2, 2), 0, reference(spec, 3))  # 30 records, batches of 4 across epochs
    check_global_batches(ranks(replace(spec, epochs=None), 3, 2), 13, reference(spec, 3), n=2)
    files = [train_file, str(shapes_data / "val.jsonl")]  # the cap counts over the files
    assert epoch_sources(StreamSpec(files=files, max_records=70)) == lines(train_file, 64) + lines(files[1], 6)
    assert len(epoch_sources(replace(spec, max_records=1000))) == N_TRAIN


def test_single_record_feeds_two_ranks(tmp_path, proc):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello!"},
                                             {"role": "assistant", "content": "Yes"}]}) + "\n")
    spec = StreamSpec(files=[str(path)])
    r0, r1 = (within(lambda s=s: steps(s, n=3)) for s in ranks(spec, 2, 1))  # endless: one epoch per record
    src = [f"{path}:1"]
    assert r0 == [(0, 0, 2, src), (1, 2, 4, src), (2, 4, 6, src)]
    assert r1 == [(0, 1, 2, src), (1, 3, 4, src), (2, 5, 6, src)]
    out = take(BatchStream(replace(spec, rank=1, world_size=2), proc), 2)
    assert [(x["index"], x["epoch"], x["position"], x["samples"]) for x in out] == [(0, 1, 2, 1), (1, 3, 4, 1)]
    # one pass: rank 1 gets nothing
    assert [steps(s) for s in ranks(replace(spec, epochs=1), 2, 1)] == [[(0, 0, 1, src)], []]


def test_empty_file_ends_the_stream(tmp_path, proc):
    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"
    empty.write_text("")
    blank.write_text("\n\n")
    for files in ([str(empty)], [str(empty), str(blank)]):
        spec = StreamSpec(files=files)  # endless training stream: must still end
        assert within(lambda: list(global_records(spec))) == []
        for s in ranks(spec, 2, 3):
            assert within(lambda: steps(s)) == [] and within(lambda: steps(s, start=5)) == []
            assert within(lambda: list(BatchStream(s, proc))) == []


# --- workers ---------------------------------------------------------------------------------------


def test_workers_keep_batch_order(train_file, proc):
    spec = StreamSpec(files=[train_file], batch_size=6, shuffle_buffer=8, seed=1)
    start = 19  # not a multiple of the batch size
    single = take(make_loader(spec, proc, start_record=start, num_workers=0), 9)
    it = iter(make_loader(spec, proc, start_record=start, num_workers=2))
    multi = take(it, 9)
    del it  # shuts the workers down
    assert [x["index"] for x in single] == list(range(9))
    assert [x["position"] for x in single] == [start + 6 * (k + 1) for k in range(9)]
    assert [x["epoch"] for x in single] == [0] * 8 + [1]  # batch 7 holds records 61..66: across the epoch end
    assert_same_batches(multi, single)
    # and both are the plain stream's batches
    assert_same_batches(single, take(BatchStream(spec, proc, start_record=start), 9))


def test_workers_finite_stream(train_file, proc):
    spec = StreamSpec(files=[train_file], batch_size=6, epochs=1, rank=1, world_size=2)
    out = list(make_loader(spec, proc, num_workers=2))  # 64 = 5 x 12 + 4: rank 1 gets nothing of batch 5
    assert [x["index"] for x in out] == list(range(5))
    assert [x["position"] for x in out] == [12, 24, 36, 48, 60]
    assert sum(x["samples"] for x in out) == 30


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

    def with_user(user):
        return json.dumps({"messages": [user, {"role": "assistant", "content": "a"}]})

    rows = [
        good("circle"),                                                                   # 1
        '{"messages": [{"role": "user", "content": "broken"',                             # 2 bad JSON
        good("square"),                                                                   # 3
        with_user({"role": "user", "content": "q", "image": str(tmp_path / "missing.png")}),  # 4 no image
        good("triangle"),                                                                 # 5
        with_user({"role": "robot", "content": "q"}),                                     # 6 wrong role
        with_user({"role": "user", "content": "q", "image": str(corrupt)}),               # 7 corrupt image
        good("red"),                                                                      # 8
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n")
    reasons = {2: "invalid JSON", 4: "image not found", 6: "unknown role 'robot'", 7: "cannot read image"}
    return str(path), reasons


def test_bad_samples_skipped_once(bad_file, proc):
    path, reasons = bad_file
    spec = StreamSpec(files=[path], batch_size=3, on_bad_sample="skip", epochs=1)
    out = list(BatchStream(spec, proc))
    assert [x["index"] for x in out] == [0, 1, 2] and [x["position"] for x in out] == [3, 6, 8]
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


@pytest.mark.parametrize("world", [2, 3])
def test_bad_samples_reported_by_one_rank_only(bad_file, proc, world):
    path, reasons = bad_file
    seen, good = [], 0
    for spec in ranks(StreamSpec(files=[path], on_bad_sample="skip", epochs=1, shuffle_buffer=3), world, 2):
        for x in BatchStream(spec, proc):
            seen += [s for s, _ in x["skipped"]]
            good += x["samples"]
    assert sorted(seen) == sorted(f"{path}:{n}" for n in reasons)  # each exactly once
    assert good == 4


def test_all_bad_batch_is_none(bad_file, proc):
    path, _ = bad_file
    spec = StreamSpec(files=[path], batch_size=8, on_bad_sample="skip", epochs=1, max_length=10)  # image cut
    (out,) = list(BatchStream(spec, proc))
    assert out["batch"] is None and out["samples"] == 0 and out["tokens"] == 0 and out["position"] == 8
    assert len(out["skipped"]) == 8
    assert "data.max_length=10" in out["skipped"][0][1]


def test_bad_sample_error_stops(bad_file, proc):
    path, reasons = bad_file
    spec = StreamSpec(files=[path], batch_size=1, on_bad_sample="error")  # endless: only the error stops it
    out = list(BatchStream(spec, proc))
    assert [x["index"] for x in out] == [0, 1]
    assert out[0]["error"] is None and out[0]["samples"] == 1
    err = out[1]["error"]
    assert isinstance(err, tuple) and len(err) == 2
    assert err[0] == f"{path}:2" and reasons[2] in err[1]
    assert out[1]["batch"] is None
    # with bigger batches the first bad item still stops the stream at its batch
    (only,) = list(BatchStream(replace(spec, batch_size=3), proc))
    assert only["index"] == 0 and only["error"][0] == f"{path}:2"
    # resumed past the first bad line, the next one is reported
    resumed = list(BatchStream(spec, proc, start_record=2))
    assert [(x["index"], x["position"]) for x in resumed] == [(0, 3), (1, 4)]
    assert resumed[0]["error"] is None and resumed[1]["error"][0] == f"{path}:4"
    assert reasons[4] in resumed[1]["error"][1]
    # ranks: the bad line's owner stops at it (rank 1 owns line 2; rank 0 owns 1, 3, 5, 7)
    r0, r1 = (list(BatchStream(s, proc)) for s in ranks(spec, 2, 1))
    assert [x["error"] and x["error"][0] for x in r1] == [f"{path}:2"]
    assert [x["error"] and x["error"][0] for x in r0] == [None, None, None, f"{path}:7"]


def test_bad_sample_error_through_the_loader(bad_file, proc):
    path, _ = bad_file
    spec = StreamSpec(files=[path], batch_size=3, on_bad_sample="error", epochs=1)
    (only,) = list(make_loader(spec, proc))
    assert tuple(only["error"])[0] == f"{path}:2"


def test_bad_records_are_reported_once_however_often_the_stream_cycles(bad_file, proc):
    """The training stream repeats epochs: a bad line is reported in the first epoch only, counted later."""
    path, reasons = bad_file
    spec = StreamSpec(files=[path], batch_size=3, on_bad_sample="skip")  # endless
    out = take(BatchStream(spec, proc), 8)  # 24 records = 3 epochs of 8
    skipped = [s for x in out for s, _ in x["skipped"]]
    assert skipped == [f"{path}:{n}" for n in sorted(reasons)]
    assert sum(x["skipped_again"] for x in out) == 2 * len(reasons)
    assert sum(x["samples"] for x in out) == 3 * 4
    # resumed in the second epoch: nothing is reported again (the run before the resume reported it)
    resumed = take(BatchStream(spec, proc, start_record=9), 3)  # records 9..17: lines 2..8, then 1, 2
    assert [s for x in resumed for s in x["skipped"]] == [] and sum(x["skipped_again"] for x in resumed) == 5


def test_check_start(bad_file, proc, tmp_path):
    path, reasons = bad_file
    spec = StreamSpec(files=[path], on_bad_sample="skip")
    batch = check_start(spec, proc, 8, 0.5)  # 4 of 8 bad: at the limit, not over it
    assert proc.decode([v for v in batch["labels"][0].tolist() if v != -100]) == "circle"  # the first good record
    with pytest.raises(SampleError) as e:
        check_start(spec, proc, 8, 0.49)
    assert str(e.value).startswith(f"{path}: 4 of the first 8 records are bad samples, over "
                                   f"data.max_bad_fraction=0.49 (first: {path}:2: invalid JSON")
    assert str(e.value).endswith("or raise data.max_bad_fraction")
    check_start(spec, proc, 2, 0.5)  # the first 2 records: 1 bad
    with pytest.raises(SampleError, match=f"^{path}:2: invalid JSON"):
        check_start(replace(spec, on_bad_sample="error"), proc, 8, 1.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(Path(path).read_text().splitlines()[1:2] * 5) + "\n")
    with pytest.raises(SampleError, match=f"^{bad}: all 5 records read are bad samples \\(first: {bad}:1: invalid"):
        check_start(StreamSpec(files=[str(bad)], on_bad_sample="skip"), proc, 100, 1.0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(SampleError, match=f"^{empty}: the file holds no records"):
        check_start(StreamSpec(files=[str(empty)]), proc, 100, 0.5)
