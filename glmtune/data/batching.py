"""Pieces every family template shares: truncation that never cuts an image, and padding into a batch."""

from __future__ import annotations

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
