"""Pieces every family template shares: truncation that never cuts an image, and padding into a batch."""

from __future__ import annotations

import math

import torch

from glmtune.data.sample import SampleError

IGNORE = -100  # label of a position that is not a target


def cut_to_length(columns: dict[str, list], target: list[bool], image: list[bool], max_length: int | None,
                  source: str, generation: bool) -> tuple[dict[str, list], bool]:
    """Truncate parallel per-token columns to `max_length`.

    A sequence is cut only if the cut falls after its last image position and keeps at least one target;
    otherwise the sample is a SampleError (the caller's bad-sample policy decides). Returns (columns, truncated).
    """
    n = len(target)
    if max_length is None or n <= max_length:
        return columns, False
    last_image = max((i for i, f in enumerate(image) if f), default=-1)
    if generation or last_image + 2 > max_length or not any(target[:max_length]):
        raise SampleError(source, f"{n} tokens (incl. {sum(image)} image tokens) exceed data.max_length="
                                  f"{max_length} and cannot be cut without losing the image or every answer token; "
                                  f"raise data.max_length or shorten the sample")
    return {k: v[:max_length] for k, v in columns.items()}, True


def pad_stack(tensors: list[torch.Tensor], value, pad_left: bool) -> torch.Tensor:
    """Stack tensors whose last dimension differs, padding it with `value` (left or right)."""
    width = max(t.shape[-1] for t in tensors)
    out = []
    for t in tensors:
        fill = torch.full((*t.shape[:-1], width - t.shape[-1]), value, dtype=t.dtype)
        out.append(torch.cat([fill, t] if pad_left else [t, fill], dim=-1))
    return torch.stack(out)


def collate_columns(items: list[dict], fills: dict[str, object], pad_left: bool, extra: tuple[str, ...] = ()) -> dict:
    """Pad the per-token columns named in `fills` (those present) plus an attention mask; concatenate the
    `extra` tensors (image tensors) of the items that have them."""
    batch = {k: pad_stack([x[k] for x in items], fill, pad_left) for k, fill in fills.items() if k in items[0]}
    ones = [torch.ones(x["input_ids"].shape[-1], dtype=torch.long) for x in items]
    batch["attention_mask"] = pad_stack(ones, 0, pad_left)
    for key in extra:
        parts = [x[key] for x in items if key in x]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


# ---- packing: several samples share one row, each seeing only itself ------------------------------------------
# A packed batch has no `attention_mask`. It carries `position_ids` in which every sample's sequence position
# (the first row of multi-row positions) restarts at 0: a segment starts wherever that position is 0, which is how
# the model's attention isolates the samples (glmtune.models.packed_attention). A row's right padding is left in
# its last segment: causal attention keeps it invisible to the real tokens before it, and its labels are ignored.


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Sample indices per row, rows of at most `max_length` tokens, as few and as evenly filled as possible
    (the batch is padded to its longest row): start from ceil(total / max_length) rows, place samples longest
    first into the least-filled row, add a row whenever one does not fit. A sample longer than `max_length`
    (only a caller that did not truncate) gets a row of its own. Deterministic: ties go to the lowest row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep input order
    n = max(1, math.ceil(sum(lengths) / max_length))
    while True:
        rows, load = [[] for _ in range(n)], [0] * n
        for i in order:
            j = min(range(n), key=load.__getitem__)
            if load[j] and load[j] + lengths[i] > max_length:
                break
            rows[j].append(i)
            load[j] += lengths[i]
        else:
            return [row for row in rows if row]
        n += 1


def collate_packed(items: list[dict], positions: list[torch.Tensor], fills: dict[str, object], max_length: int,
                   extra: tuple[str, ...] = ()) -> dict:
    """Pack `encode` outputs into as few rows of at most `max_length` tokens as possible.

    `positions[i]` is item i's position ids as the model computes them for that sample alone, shape (P, n_i)
    with row 0 the sequence position (0 at the sample's first token). Returns the per-token columns named in
    `fills` as (rows, width), `position_ids` as (P, rows, width) (padding continues the last segment's sequence
    positions, so it never looks like a new segment), and the `extra` tensors (images) concatenated in the order
    their tokens appear in the packed rows. The first label of every segment is ignored: inside a row it would be
    predicted from the previous sample's last token.
    """
    rows = pack_rows([x["input_ids"].shape[-1] for x in items], max_length)
    width = max(sum(items[i]["input_ids"].shape[-1] for i in row) for row in rows)
    keys = [k for k in fills if k in items[0]]
    out = {k: torch.full((len(rows), width), fills[k], dtype=items[0][k].dtype) for k in keys}
    n_pos = positions[0].shape[0]
    pos = torch.zeros(n_pos, len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = items[i]["input_ids"].shape[-1]
            for k in keys:
                out[k][r, at:at + n] = items[i][k]
            if "labels" in out:
                out["labels"][r, at] = IGNORE
            pos[:, r, at:at + n] = positions[i]
            at += n
        last = pos[:, r, at - 1:at]
        pos[:, r, at:] = last + torch.arange(1, width - at + 1)  # padding: no 0, so no new segment
    out["position_ids"] = pos
    order = [i for row in rows for i in row]
    for key in extra:
        parts = [items[i][key] for i in order if key in items[i]]
        if parts:
            out[key] = torch.cat(parts)
    return out
