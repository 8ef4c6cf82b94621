"""Streaming batches: rank/worker sharding, deterministic shuffle, exact resume.

Nothing reads the dataset before step 1: records are read line by line, shuffled through a bounded
buffer, and grouped into batches of `batch_size` *records*. Batch `b` of a rank is a pure function of
(files, seed, rank, world size, b), so:
  - resume is exact: the checkpoint stores how many batches were consumed; on resume the record
    stream is replayed as text (no image decoding) up to that batch;
  - DataLoader workers split batches round-robin relative to the resume point, which is also the
    order in which the DataLoader returns them, so the batch order does not depend on the number of
    workers;
  - images are decoded and tokenised inside the workers, only for the worker's own batches.
A bad record (bad JSON, wrong fields, missing/corrupt image, too long) is either an error or dropped
from its batch and reported in the batch's `skipped` list, by the record's owner only, so that the
training loop counts every bad sample exactly once. The stream repeats epochs until the trainer stops;
an evaluation stream (`epochs=1`) ends after one pass.
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
    batch_size: int = 1
    shuffle_buffer: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    epochs: int | None = None  # None = repeat forever (training)


def image_base(data_file: str | Path, image_dir: str | None) -> Path:
    return Path(image_dir).resolve() if image_dir else Path(data_file).resolve().parent


def rank_records(spec: StreamSpec, epoch: int) -> Iterator[tuple[str, dict | SampleError, Path]]:
    """This rank's records for one epoch, shuffled through a bounded buffer seeded by (seed, epoch)."""
    def raw():
        n = 0
        for f in spec.files:
            base = image_base(f, spec.image_dir)
            for source, record in iter_records(f):
                if n % spec.world_size == spec.rank:
                    yield source, record, base
                n += 1

    if spec.shuffle_buffer <= 1:
        yield from raw()
        return
    rng = random.Random(f"{spec.seed}:{epoch}:{spec.rank}")
    buffer = []
    for item in raw():
        if len(buffer) < spec.shuffle_buffer:
            buffer.append(item)
            continue
        j = rng.randrange(len(buffer))
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def record_batches(spec: StreamSpec) -> Iterator[tuple[int, int, list]]:
    """(batch index, epoch, records) for this rank; batch indices count across epochs."""
    b = 0
    for epoch in itertools.count() if spec.epochs is None else range(spec.epochs):
        chunk = []
        empty = True
        for rec in rank_records(spec, epoch):
            empty = False
            chunk.append(rec)
            if len(chunk) == spec.batch_size:
                yield b, epoch, chunk
                b += 1
                chunk = []
        if chunk:
            yield b, epoch, chunk
            b += 1
        if empty:
            return  # no data for this rank at all: stop instead of looping forever


def load_sample(source: str, record, base: Path, fmt: str) -> tuple[Sample, list]:
    if isinstance(record, SampleError):
        raise record
    sample = parse_record(record, source, base, fmt)
    return sample, [load_image(p, source) for p in sample.images]


class BatchStream(IterableDataset):
    """Yields dicts: {"index", "epoch", "batch" (collated, or None if every record was bad),
    "samples", "tokens", "truncated", "skipped": [(source, reason)], "error": (source, reason) | None}."""

    def __init__(self, spec: StreamSpec, processor, start_batch: int = 0):
        self.spec, self.processor, self.start_batch = spec, processor, start_batch

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for b, epoch, records in record_batches(self.spec):
            if b < self.start_batch or (b - self.start_batch) % n_workers != worker:
                continue
            out = self._encode_batch(b, epoch, records)
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


def make_loader(spec: StreamSpec, processor, start_batch: int = 0, num_workers: int = 0):
    """A DataLoader over whole batches (the dataset collates; the loader only moves them)."""
    return torch.utils.data.DataLoader(
        BatchStream(spec, processor, start_batch), batch_size=None, num_workers=num_workers,
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
    )
