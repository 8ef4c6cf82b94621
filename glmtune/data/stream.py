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
batch and reported in the batch's `skipped` list by the one rank that owns it, so the training loop counts
every bad sample exactly once. The training stream repeats epochs until the trainer stops; an evaluation
stream (`epochs=1`) ends after one pass, its last global batch possibly short (a rank may get nothing).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from glmtune.data.formats import iter_records, parse_record
from glmtune.data.images import load_image
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


def image_base(data_file: str | Path, image_dir: str | None) -> Path:
    return Path(image_dir).resolve() if image_dir else Path(data_file).resolve().parent


def epoch_records(spec: StreamSpec, epoch: int) -> Iterator[tuple[str, dict | SampleError, Path]]:
    """All records of one epoch in their (shuffled) order: the same on every rank."""
    def raw():
        for f in spec.files:
            base = image_base(f, spec.image_dir)
            for source, record in iter_records(f):
                yield source, record, base

    records = raw() if spec.max_records is None else itertools.islice(raw(), spec.max_records)
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


def record_batches(spec: StreamSpec, start_record: int = 0) -> Iterator[tuple[int, int, int, list]]:
    """(k, epoch, position, this rank's records) for global micro-batch k counted from `start_record`;
    `position` is the number of records consumed once this global batch is done (the resume point)."""
    size = spec.batch_size * spec.world_size
    mine = slice(spec.rank * spec.batch_size, (spec.rank + 1) * spec.batch_size)
    stream = itertools.islice(global_records(spec), start_record, None)
    for k in itertools.count():
        chunk = list(itertools.islice(stream, size))
        if not chunk:
            return
        records = chunk[mine]
        if records:  # the short last batch of a finite stream may leave nothing for this rank
            yield k, records[0][0], start_record + k * size + len(chunk), [r for _, r in records]


def load_sample(source: str, record, base: Path, fmt: str) -> tuple[Sample, list]:
    if isinstance(record, SampleError):
        raise record
    sample = parse_record(record, source, base, fmt)
    return sample, [load_image(p, source) for p in sample.images]


class BatchStream(IterableDataset):
    """Yields dicts: {"index" (global micro-batch since start_record), "epoch", "position" (records consumed
    after it, over all ranks), "batch" (collated, or None if every record was bad), "samples", "tokens",
    "truncated", "skipped": [(source, reason)], "error": (source, reason) | None}."""

    def __init__(self, spec: StreamSpec, processor, start_record: int = 0):
        self.spec, self.processor, self.start_record = spec, processor, start_record

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for k, epoch, position, records in record_batches(self.spec, self.start_record):
            if k % n_workers != worker:
                continue
            out = self._encode_batch(k, epoch, records)
            out["position"] = position
            yield out
            if out["error"]:
                return

    def _encode_batch(self, b: int, epoch: int, records: list) -> dict:
        items, skipped, truncated = [], [], 0
        for source, record, base in records:
            try:
                sample, images = load_sample(source, record, base, self.spec.format)
                item = self.processor.encode(sample.turns, images, source, self.spec.max_length)
            except SampleError as e:
                if self.spec.on_bad_sample == "error":
                    return {"index": b, "epoch": epoch, "batch": None, "skipped": [], "error": (e.source, e.reason)}
                skipped.append((e.source, e.reason))
                continue
            truncated += int(item.pop("truncated", False))
            items.append(item)
        batch = self.processor.collate(items) if items else None
        tokens = int(batch["attention_mask"].sum()) if batch is not None else 0
        return {"index": b, "epoch": epoch, "batch": batch, "samples": len(items), "tokens": tokens,
                "truncated": truncated, "skipped": skipped, "error": None}


def make_loader(spec: StreamSpec, processor, start_record: int = 0, num_workers: int = 0):
    """A DataLoader over whole batches (the dataset collates; the loader only moves them).

    Workers start from a fork server, not by forking the trainer: a fork copies one thread of a process whose
    other threads (gloo, DeepSpeed, OpenMP) may hold locks, and a worker forked at such a moment hung before its
    first line (seen under ZeRO-3: the rank waited for its batch forever). The stream pickles (spec + processor).
    """
    return torch.utils.data.DataLoader(
        BatchStream(spec, processor, start_record), batch_size=None, num_workers=num_workers,
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
        multiprocessing_context=start_worker_server(processor) if num_workers else None,
    )


def start_worker_server(processor):
    """The fork server's context, the server started now (the trainer calls this before loading the model, so
    the server's imports overlap with it). It preloads this module and the modules of the processor's parts
    (tokenizer, image processor: transformers' take seconds), which every worker would otherwise import anew
    when it unpickles the stream. The preload list counts only before the server first starts."""
    import multiprocessing
    import multiprocessing.forkserver

    parts = [processor, *vars(processor).values()]
    preload = ["glmtune.data.stream", *sorted({type(x).__module__ for x in parts} - {"builtins"})]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    multiprocessing.forkserver.ensure_running()
    return context
