"""Packing (data.packing): several samples share a row, each seeing only itself.

The proof is numeric: every packed segment's logits equal the same sample run alone (the model numbering its
positions itself), per-token losses equal, the step's loss is unchanged, with images; the fast per-segment
attention equals the dense block-diagonal reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from glmtune.data.batching import IGNORE, pack_rows
from glmtune.data.sample import Turn
from glmtune.models import get_family


def U(text):
    return Turn("user", text)


def A(text):
    return Turn("assistant", text)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross entropy of one sequence (0 where the label is ignored), as train.py computes."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE, reduction="none")


def segments_of(batch: dict, lengths: list[int]):
    """(row, start, n) of each item in a packed batch, found through its tokens' place (items are distinct)."""
    from glmtune.models.packed_attention import segment_spans

    seq = batch["position_ids"][0] if batch["position_ids"].ndim == 3 else batch["position_ids"]
    spans = [(r, s, e - s) for r, row in enumerate(segment_spans(seq)) for s, e in row]
    return spans


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert pack_rows([9, 1], 8) == [[0, 1]] or pack_rows([9, 1], 8) == [[0], [1]]
    assert sorted(i for row in pack_rows([7, 7, 1, 1, 6, 2], 8) for i in row) == list(range(6))
    assert all(sum([7, 7, 1, 1, 6, 2][i] for i in row) <= 8 for row in pack_rows([7, 7, 1, 1, 6, 2], 8))


def _glm41v_items(proc):
    square = Image.new("RGB", (112, 112), (255, 255, 255))  # grid (1, 8, 8): 16 image tokens
    wide = Image.new("RGB", (200, 100), (20, 50, 220))  # grid (1, 4, 10): 10 image tokens
    convs = [
        ([U("<image>What colour is it?"), A("white, a plain square")], [square]),
        ([U("Say hi."), A("hi"), U("Again?"), A("hi there")], []),
        ([U("<image>And this one?<image>Both?"), A("blue and white")], [wide, square]),
        ([U("<image>Describe."), A("a wide blue picture")], [wide]),
    ]
    return [proc.encode(turns, images, f"x:{i}") for i, (turns, images) in enumerate(convs)]


def test_glm41v_packed_segments_equal_samples_alone(tiny_glm41v):
    family = get_family("glm41v")
    model, proc = family.load_model(tiny_glm41v), family.load_processor(tiny_glm41v)
    items = _glm41v_items(proc)
    lengths = [x["input_ids"].shape[-1] for x in items]
    max_length = sum(lengths[:3])  # room for three: two rows, one of them padded
    with torch.no_grad():
        alone = [model(**{k: v for k, v in proc.collate([x]).items() if k != "labels"}).logits[0] for x in items]
        batch = proc.collate_packed(items, max_length)
        assert batch["input_ids"].shape[0] == 2 and "attention_mask" not in batch
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        dense = model(**inputs, attention_mask=block_diagonal_4d(batch)).logits  # the dense reference
        family.enable_packing(model)
        packed = model(**inputs).logits
    # each item's tokens sit in exactly one segment: match them by token ids
    seen = 0
    for r, s, n in segments_of(batch, lengths):
        i = next((i for i, x in enumerate(items) if lengths[i] <= n and torch.equal(
            batch["input_ids"][r, s:s + lengths[i]], x["input_ids"])), None)
        if i is None:
            continue
        seen += 1
        got = packed[r, s:s + lengths[i]]
        # measured max |diff| 1.5e-7 (1 and 2 threads, AVX-512 and AVX2): the same SDPA on the same slice;
        # bound 1e-5 leaves headroom for summation-order differences of the batched matmuls
        assert (got - alone[i]).abs().max() < 1e-5
        assert (dense[r, s:s + lengths[i]] - alone[i]).abs().max() < 1e-5
        labels = batch["labels"][r, s:s + lengths[i]]
        assert torch.equal(labels[1:], items[i]["labels"][1:]) and labels[0] == IGNORE
        assert (token_losses(got, labels) - token_losses(alone[i], items[i]["labels"])).abs().max() < 1e-5
    assert seen == len(items)
    # the step's loss (target tokens of the batch, normalised the same) does not change
    packed_sum = F.cross_entropy(packed[:, :-1].reshape(-1, packed.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                 ignore_index=IGNORE, reduction="sum")
    alone_sum = sum(token_losses(lg, x["labels"]).sum() for lg, x in zip(alone, items))
    assert int((batch["labels"] != IGNORE).sum()) == sum(int((x["labels"] != IGNORE).sum()) for x in items)
    assert abs(packed_sum.item() - alone_sum.item()) < 1e-4


def block_diagonal_4d(batch: dict) -> torch.Tensor:
    from glmtune.models.packed_attention import block_diagonal_mask

    return block_diagonal_mask(batch["position_ids"][0])
