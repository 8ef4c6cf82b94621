"""Attention over packed rows: each sample (segment) of a row attends only to itself.

A packed batch marks its segments by sequence positions that restart at 0 (glmtune.data.batching.collate_packed).
The masked-out blocks between samples are never computed: on CPU each segment is one SDPA call on its own slice
(cost sum(n_i^2) instead of width^2 per row); on CUDA with flash-attn installed, one flash-attn varlen call over
the row's cu_seqlens. A dense block-diagonal mask gives the same numbers and is what the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def segment_spans(seq_positions: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(start, end) of each segment per row, from (rows, width) sequence positions (0 = a segment's first token)."""
    width = seq_positions.shape[-1]
    spans = []
    for row in seq_positions.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        spans.append(list(zip(starts, starts[1:] + [width])))
    return spans


def block_diagonal_mask(seq_positions: torch.Tensor) -> torch.Tensor:
    """(rows, 1, width, width) bool mask, True = may attend: causal inside each segment. The dense reference."""
    rows, width = seq_positions.shape
    mask = torch.zeros(rows, 1, width, width, dtype=torch.bool)
    for r, spans in enumerate(segment_spans(seq_positions)):
        for s, e in spans:
            mask[r, 0, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    return mask


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@dataclass
class PackedRows:
    """The segments of a packed batch, computed once per forward: `spans[r]` the (start, end) of row r's samples;
    `masks[r][j]` an optional attention mask of segment j alone (None = causal), for prefix-LM models."""

    spans: list[list[tuple[int, int]]]
    masks: list[list[torch.Tensor | None]] | None = None


def varlen_attention(segment_attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedRows,
                     scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Attention per segment. q: (rows, heads, width, dim), k/v: (rows, kv_heads, width, dim) ->
    (rows, width, heads, dim). `segment_attention(q, k, v, mask)` computes one segment ((1, heads, n, dim) slices;
    mask None = causal) and returns (1, n, heads, dim): it is the model's own attention, so a segment gets
    exactly what it would alone. On CUDA with flash-attn and causal segments: one flash-attn varlen call."""
    spans = packed.spans
    flash = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None and packed.masks is None:
        lengths = [e - s for row in spans for s, e in row]
        cu = torch.tensor([0] + lengths, device=q.device).cumsum(0, dtype=torch.int32)
        flat = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[-1]) for t in (q, k, v)]
        out = flash(*flat, cu, cu, max(lengths), max(lengths), dropout_p=dropout, softmax_scale=scale, causal=True)
        return out.view(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    rows = []
    for r, row in enumerate(spans):
        masks = packed.masks[r] if packed.masks is not None else [None] * len(row)
        rows.append(torch.cat([segment_attention(q[r:r + 1, :, s:e], k[r:r + 1, :, s:e], v[r:r + 1, :, s:e], m)
                               for (s, e), m in zip(row, masks)], dim=1))
    return torch.cat(rows)
