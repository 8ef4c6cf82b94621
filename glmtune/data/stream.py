"""Streaming batches: one global record order, split by rank, exact resume under any process count.

Nothing reads the dataset before step 1: records are read line by line and shuffled through a bounded
buffer seeded by (seed, epoch) only, so every process computes the same global record order; epochs follow
each other without a break. Global micro-batch k holds records [start + k*G, start + (k+1)*G) of that order,
G = batch_size x world_size, and rank r takes the r-th slice of batch_size records. Hence:
  - the data position is one number, the records consumed (`position` of each batch); resume starts there
    and is exact, and it is exact under a different process count too: a 2-process run and a 1-process run
    with twice the batch size read the same records in every step, nothing lost or repeated;
  - DataLoader workers split batches round-robin relative to the resume point, which is also the order in
    which the DataLoader returns them, so the batch order does not depend on the number of workers;
  - images are decoded and tokenised inside the workers, only for the worker's own batches.
A bad record (bad JSON, wrong fields, missing/corrupt image, too long) is either an error or dropped from its
batch and reported in the batch's `skipped` list by the one rank that owns it, in the first epoch only (later
epochs read the same records again: `skipped_again` counts those), so the training loop counts every bad
record exactly once, however often the stream cycles. `check_start` reads the first records before step 1: an
empty file, or one whose start is all or mostly bad, stops the run there instead of training on nothing. The
training stream repeats epochs until the trainer stops; an evaluation stream (`epochs=1`) ends after one pass,
its last global batch possibly short (a rank may get nothing).

Token budgets (`batch_tokens`): instead of batch_size records, a rank's micro-batch is a run of consecutive
records whose token counts sum to at most batch_tokens (at least one record); global micro-batch k is the next
world_size runs, rank r takes run r. The counts come from each record's text and image headers (no pixels
decoded), computed by every rank and worker for every record, so all of them cut the same runs; the position
is still the records consumed, and a run never spans two global batches, so resume stays exact.
Packing (`packing`) only changes how one micro-batch's samples are laid out (processor.collate_packed), never
which records it holds.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import select
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from glmtune.data.formats import iter_records, parse_record
from glmtune.data.images import DEFAULT_MAX_PIXELS, image_size, load_image
from glmtune.data.sample import Sample, SampleError


@dataclass
class StreamSpec:
    files: list[str]
    format: str = "auto"
    image_dir: str | None = None  # relative image paths resolve here; None = next to each data file
    max_length: int = 1024
    on_bad_sample: str = "error"  # error | skip
    batch_size: int = 1  # records per rank and micro-batch
    shuffle_buffer: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    epochs: int | None = None  # None = repeat forever (training)
    max_records: int | None = None  # only the first N records of each epoch (evaluation subsets)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # larger images (width x height from the header) are bad samples
    packing: bool = False  # each batch's samples packed into rows of <= max_length tokens (processor.collate_packed)
    # > 0: a rank's micro-batch is a run of records of at most this many tokens (batch_size unused)
    batch_tokens: int = 0


def image_base(data_file: str | Path, image_dir: str | None) -> Path:
    return Path(image_dir).resolve() if image_dir else Path(data_file).resolve().parent


def file_records(spec: StreamSpec) -> Iterator[tuple[str, dict | SampleError, Path]]:
    """(source, record, image base folder) of every file, in file order."""
    for f in spec.files:
        base = image_base(f, spec.image_dir)
        for source, record in iter_records(f):
            yield source, record, base


def epoch_records(spec: StreamSpec, epoch: int) -> Iterator[tuple[str, dict | SampleError, Path]]:
    """All records of one epoch in their (shuffled) order: the same on every rank."""
    raw = file_records(spec)
    records = raw if spec.max_records is None else itertools.islice(raw, spec.max_records)
    if spec.shuffle_buffer <= 1:
        yield from records
        return
    rng = random.Random(f"{spec.seed}:{epoch}")
    buffer = []
    for item in records:
        if len(buffer) < spec.shuffle_buffer:
            buffer.append(item)
            continue
        j = rng.randrange(len(buffer))
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def global_records(spec: StreamSpec) -> Iterator[tuple[int, tuple]]:
    """(epoch, record) over all epochs, back to back."""
    for epoch in itertools.count() if spec.epochs is None else range(spec.epochs):
        empty = True
        for record in epoch_records(spec, epoch):
            empty = False
            yield epoch, record
        if empty:
            return  # no data at all: stop instead of looping forever


def record_batches(spec: StreamSpec, start_record: int = 0, length_of=None) -> Iterator[tuple[int, int, int, list]]:
    """(k, epoch, position, this rank's records) for global micro-batch k counted from `start_record`;
    `position` is the number of records consumed once this global batch is done (the resume point); each
    record is (source, record, base, its epoch).
    With `spec.batch_tokens`, `length_of(record)` gives a record's tokens (see `token_budget_batches`)."""
    if spec.batch_tokens:
        yield from token_budget_batches(spec, start_record, length_of)
        return
    size = spec.batch_size * spec.world_size
    mine = slice(spec.rank * spec.batch_size, (spec.rank + 1) * spec.batch_size)
    stream = itertools.islice(global_records(spec), start_record, None)
    for k in itertools.count():
        chunk = list(itertools.islice(stream, size))
        if not chunk:
            return
        records = chunk[mine]
        if records:  # the short last batch of a finite stream may leave nothing for this rank
            yield k, records[0][0], start_record + k * size + len(chunk), [(*r, e) for e, r in records]


def token_budget_batches(spec: StreamSpec, start_record: int, length_of) -> Iterator[tuple[int, int, int, list]]:
    """Global micro-batch k = `world_size` consecutive runs of the global order; each run is the longest that
    keeps the sum of `length_of(record)` within `batch_tokens` (at least one record); rank r takes run r.

    Every rank and worker computes the lengths of all records (text tokens plus image tokens from image headers,
    no pixels decoded), so all of them cut the same runs; the resume point stays "records consumed", and a run
    starts right after it exactly as in the uninterrupted stream (a run never spans two global batches)."""
    stream = itertools.islice(global_records(spec), start_record, None)
    position, carry = start_record, None
    for k in itertools.count():
        runs = []
        for _ in range(spec.world_size):
            run, tokens = [], 0
            while True:
                item, carry = (carry, None) if carry is not None else (next(stream, None), None)
                if item is None:
                    break
                n = length_of(item[1])
                if run and tokens + n > spec.batch_tokens:
                    carry = item  # starts the next run
                    break
                run.append(item)
                tokens += n
            if not run:
                break
            runs.append(run)
        if not runs:
            return
        position += sum(len(r) for r in runs)
        if spec.rank < len(runs):
            yield k, runs[spec.rank][0][0], position, [(*r, e) for e, r in runs[spec.rank]]


def record_tokens(record: tuple, spec: StreamSpec, processor) -> int:
    """Tokens of one record for token budgets, cheaply: parsed and tokenised, image sizes read from the image
    headers; capped at max_length (what truncation leaves). A bad record counts 0 (its batch drops or stops on
    it later, by data.on_bad_sample)."""
    source, raw, base = record
    try:
        if isinstance(raw, SampleError):
            return 0
        sample = parse_record(raw, source, base, spec.format)
        n = processor.token_count(sample.turns, [image_size(p, source) for p in sample.images])
    except SampleError:
        return 0
    return min(n, spec.max_length)


def load_sample(source: str, record, base: Path, fmt: str,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Sample, list]:
    if isinstance(record, SampleError):
        raise record
    sample = parse_record(record, source, base, fmt)
    return sample, [load_image(p, source, max_pixels) for p in sample.images]


def start_verdict(read: int, bad: list[tuple[str, str]], max_bad_fraction: float) -> str | None:
    """Why training must not start on data whose first `read` records hold `bad` ((source, reason)), or None.
    Shared by `check_start` (train) and `glmtune check`, so that both say the same."""
    if read == 0:
        return ("the file holds no records (empty, or only blank lines); point data.train / data.val at a .jsonl "
                "(one JSON object per line) or .json (an array of objects) file with samples")
    if len(bad) < read and len(bad) <= max_bad_fraction * read:
        return None
    source, reason = bad[0]
    hint = ("; relative image paths resolve against the data file's folder (data.image_dir=. resolves them "
            "against the working directory, as the upstream scripts do)" if reason.startswith("image not found")
            else "")
    head = f"all {read} records read are bad samples" if len(bad) == read else \
        f"{len(bad)} of the first {read} records are bad samples, over data.max_bad_fraction={max_bad_fraction}"
    return (f"{head} (first: {source}: {reason}){hint}; fix the data (glmtune check lists every bad "
            f"sample){'' if len(bad) == read else ' or raise data.max_bad_fraction'}")


def check_start(spec: StreamSpec, processor, first: int, max_bad_fraction: float) -> dict:
    """Read and encode the first `first` records (file order) before training; raise SampleError if the data
    is empty, all bad, or more than `max_bad_fraction` bad (with on_bad_sample=error: at the first bad one).
    Returns the first good record as a batch: the weightless pass of a rank whose micro-batch is all bad
    (every rank computes the same one)."""
    read, bad, fallback = 0, [], None
    for source, record, base in itertools.islice(file_records(spec), first):
        read += 1
        try:
            sample, images = load_sample(source, record, base, spec.format, spec.max_image_pixels)
            item = processor.encode(sample.turns, images, source, spec.max_length)
        except SampleError as e:
            if spec.on_bad_sample == "error":
                raise
            bad.append((e.source, e.reason))
            continue
        if fallback is None:
            item.pop("truncated", None)
            fallback = processor.collate([item])
    verdict = start_verdict(read, bad, max_bad_fraction)
    if verdict:
        raise SampleError(", ".join(spec.files), verdict)
    return fallback


class BatchStream(IterableDataset):
    """Yields dicts: {"index" (global micro-batch since start_record), "epoch", "position" (records consumed
    after it, over all ranks), "batch" (collated, or None if every record was bad), "samples", "tokens",
    "truncated", "skipped": [(source, reason)] (bad records of the first epoch), "skipped_again" (bad records of
    later epochs, already reported), "error": (source, reason) | None}."""

    def __init__(self, spec: StreamSpec, processor, start_record: int = 0):
        self.spec, self.processor, self.start_record = spec, processor, start_record

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        length_of = partial(record_tokens, spec=self.spec, processor=self.processor)
        for k, epoch, position, records in record_batches(self.spec, self.start_record, length_of):
            if k % n_workers != worker:
                continue
            out = self._encode_batch(k, epoch, records)
            out["position"] = position
            yield out
            if out["error"]:
                return

    def _encode_batch(self, b: int, epoch: int, records: list) -> dict:
        items, skipped, skipped_again, truncated = [], [], 0, 0
        for source, record, base, record_epoch in records:
            try:
                sample, images = load_sample(source, record, base, self.spec.format, self.spec.max_image_pixels)
                item = self.processor.encode(sample.turns, images, source, self.spec.max_length)
            except SampleError as e:
                if self.spec.on_bad_sample == "error":
                    return {"index": b, "epoch": epoch, "batch": None, "skipped": [], "skipped_again": 0,
                            "error": (e.source, e.reason)}
                if record_epoch == 0:
                    skipped.append((e.source, e.reason))
                else:
                    skipped_again += 1
                continue
            truncated += int(item.pop("truncated", False))
            items.append(item)
        if not items:
            batch = None
        elif self.spec.packing:
            batch = self.processor.collate_packed(items, self.spec.max_length)
        else:
            batch = self.processor.collate(items)
        tokens = sum(x["input_ids"].shape[-1] for x in items)  # real tokens (a packed batch has no attention mask)
        return {"index": b, "epoch": epoch, "batch": batch, "samples": len(items), "tokens": tokens,
                "truncated": truncated, "skipped": skipped, "skipped_again": skipped_again, "error": None}


def make_loader(spec: StreamSpec, processor, start_record: int = 0, num_workers: int = 0):
    """A DataLoader over whole batches (the dataset collates; the loader only moves them).

    Workers start from a fork server, not by forking the trainer: a fork copies one thread of a process whose
    other threads (gloo, DeepSpeed, OpenMP) may hold locks, and a worker forked at such a moment hung before its
    first line (seen under ZeRO-3: the rank waited for its batch forever). The stream pickles (spec + processor).
    Each worker ends when the trainer does, killed or not (`_worker_init`).
    """
    return torch.utils.data.DataLoader(
        BatchStream(spec, processor, start_record), batch_size=None, num_workers=num_workers,
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
        multiprocessing_context=start_worker_server(processor) if num_workers else None,
        worker_init_fn=functools.partial(_worker_init, os.getpid()) if num_workers else None,
    )


def start_worker_server(processor):
    """The fork server's context, the server started now (the trainer calls this before loading the model, so
    the server's imports overlap with it). It preloads this module and the modules of the processor's parts
    (tokenizer, image processor: transformers' take seconds), which every worker would otherwise import anew
    when it unpickles the stream. The preload list counts only before the server first starts."""
    import multiprocessing
    import multiprocessing.forkserver

    parts = [processor, *vars(processor).values()]
    # forkserver_preload first: the server ignores SIGTERM from then on (read it)
    preload = ["glmtune.data.forkserver_preload", "glmtune.data.stream",
               *sorted({type(x).__module__ for x in parts} - {"builtins"})]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    multiprocessing.forkserver.ensure_running()
    return context


def _worker_init(trainer_pid: int, worker_id: int):
    """First thing in every DataLoader worker: end with the trainer, and leave stopping to it.

    A worker is a child of the fork server, not of the trainer, so PyTorch's own watchdog (is my parent alive?)
    never sees the trainer die; and the fork server only exits once every process holding its "alive" pipe is
    gone, which includes the workers. So after a SIGKILL of the trainer, workers and fork server (and
    multiprocessing's resource tracker) lived on forever. Here a thread waits for the trainer's end and ends
    the worker; the fork server and the resource tracker then lose their last client and exit by themselves.
    SIGINT (Ctrl-C reaches the whole process group) and SIGTERM (schedulers signal every process of a job) are
    the trainer's: it finishes its step (for which it may need more batches), saves a checkpoint and shuts the
    workers down. (The fork server ignores both too: glmtune.data.forkserver_preload.)
    A SIGTERM is not ignored for good, though: multiprocessing's exit handler in the trainer terminates (SIGTERM)
    and then joins the workers of a loader that was never shut down, which would wait forever on a worker that
    ignores it. So a worker serves on for SIGTERM_GRACE_S seconds after a SIGTERM (the trainer's step), then ends.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(
        target=_exit_with, args=(trainer_pid, SIGTERM_GRACE_S), daemon=True).start())
    threading.Thread(target=_exit_with, args=(trainer_pid,), name="glmtune-exit-with-trainer", daemon=True).start()


SIGTERM_GRACE_S = 10.0  # how long a worker serves on after a SIGTERM, unless the trainer ends first


def _exit_with(pid: int, timeout: float | None = None):
    """Block until process `pid` has ended (or `timeout` seconds have passed), then end this process at once."""
    try:
        fd = os.pidfd_open(pid)  # Linux 5.3+: readable once the process has ended, whoever its parent is
    except ProcessLookupError:
        os._exit(1)  # the trainer died before this worker got here
    except (AttributeError, OSError):  # no pidfd (macOS, old kernels, some sandboxes): poll
        deadline = None if timeout is None else time.monotonic() + timeout
        while _alive(pid) and (deadline is None or time.monotonic() < deadline):
            time.sleep(min(1.0, timeout or 1.0))
        os._exit(1)
    select.select([fd], [], [], timeout)
    os._exit(1)


def shutdown_workers(batches) -> None:
    """End a loader iterator's workers now (the trainer's last step, and on errors), instead of whenever the
    iterator is garbage-collected: at interpreter exit that can be after multiprocessing's exit handler, which
    terminates and joins them. `_shutdown_workers` is PyTorch's own (private) shutdown of a worker iterator."""
    stop = getattr(batches, "_shutdown_workers", None)
    if stop is not None:
        stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or its pid now another user's process
        return False
    return True
