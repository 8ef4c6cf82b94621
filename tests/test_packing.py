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


def segments_of(seq: torch.Tensor):
    """(row, start, n) of each segment of a packed batch from its (rows, width) sequence positions (a row's
    padding counts in its last segment)."""
    from glmtune.models.packed_attention import segment_spans

    return [(r, s, e - s) for r, row in enumerate(segment_spans(seq)) for s, e in row]


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


def check_packed_equals_alone(model, proc, items, max_length, seq_of, dense_mask=None, bound=1e-5):
    """Pack `items` into rows of `max_length`, run the model once packed and once per item alone; every
    segment's logits and per-token losses must match the item alone, and the batch's loss sum and target count
    must equal the sum over the items. `seq_of(position_ids)` gives the (rows, width) sequence positions.
    Returns the packed batch."""
    lengths = [x["input_ids"].shape[-1] for x in items]
    with torch.no_grad():
        alone = [model(**{k: v for k, v in proc.collate([x]).items() if k != "labels"}).logits[0] for x in items]
        batch = proc.collate_packed(items, max_length)
        assert "attention_mask" not in batch
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        packed = model(**inputs).logits
        dense = model(**inputs, attention_mask=dense_mask(batch)).logits if dense_mask else None
    seen = set()
    for r, s, n in segments_of(seq_of(batch["position_ids"])):
        # the item whose tokens fill this segment (the test's items are distinct)
        i = next(i for i, x in enumerate(items) if i not in seen and lengths[i] <= n and torch.equal(
            batch["input_ids"][r, s:s + lengths[i]], x["input_ids"]))
        seen.add(i)
        got, labels = packed[r, s:s + lengths[i]], batch["labels"][r, s:s + lengths[i]]
        assert (got - alone[i]).abs().max() < bound
        if dense is not None:
            assert (dense[r, s:s + lengths[i]] - alone[i]).abs().max() < bound
        assert torch.equal(labels[1:], items[i]["labels"][1:]) and labels[0] == IGNORE
        assert (token_losses(got, labels) - token_losses(alone[i], items[i]["labels"])).abs().max() < bound
    assert seen == set(range(len(items)))
    # the step's loss (target tokens of the batch, normalised the same) does not change
    packed_sum = F.cross_entropy(packed[:, :-1].reshape(-1, packed.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                 ignore_index=IGNORE, reduction="sum")
    alone_sum = sum(token_losses(lg, x["labels"]).sum() for lg, x in zip(alone, items))
    assert int((batch["labels"] != IGNORE).sum()) == sum(int((x["labels"] != IGNORE).sum()) for x in items)
    assert abs(packed_sum.item() - alone_sum.item()) < 10 * bound
    return batch


def test_glm41v_packed_segments_equal_samples_alone(tiny_glm41v):
    family = get_family("glm41v")
    model, proc = family.load_model(tiny_glm41v), family.load_processor(tiny_glm41v)
    family.enable_packing(model)
    items = _glm41v_items(proc)
    lengths = [x["input_ids"].shape[-1] for x in items]
    # room for the three longest in one row: two rows, the second padded. Measured max |logit diff| 2.9e-6,
    # per-token loss 1.9e-6 (1 and 2 threads, AVX-512 and AVX2; 0 for a row's first segment): the same SDPA on the
    # same slice, only the linear layers see a longer row; the dense mask 2.9e-6. Bound 1e-5 = 3x the worst seen.
    batch = check_packed_equals_alone(model, proc, items, sum(sorted(lengths)[1:]),
                                      seq_of=lambda p: p[0], dense_mask=block_diagonal_4d)
    assert batch["input_ids"].shape[0] == 2 and batch["position_ids"].shape[0] == 4


def test_glm4v_packed_segments_equal_samples_alone(tiny_glm4v):
    family = get_family("glm4v")
    model, proc = family.load_model(tiny_glm4v), family.load_processor(tiny_glm4v)
    dot = Image.new("RGB", (60, 40), (200, 30, 30))
    convs = [([U("<image>What is it?"), A("a red dot")], [dot]),
             ([U("hello"), A("hi"), U("more?"), A("yes, more")], []),
             ([U("<image>Colour?"), A("red")], [Image.new("RGB", (30, 30), (10, 200, 10))]),
             ([U("Count to three."), A("one two three")], [])]
    items = [proc.encode(turns, images, f"x:{i}") for i, (turns, images) in enumerate(convs)]
    lengths = [x["input_ids"].shape[-1] for x in items]
    # measured max |logit diff| 1.4e-6, per-token loss 9.5e-7 (1 and 2 threads, AVX-512 and AVX2); bound 1e-5
    batch = check_packed_equals_alone(model, proc, items, sum(sorted(lengths)[1:]), seq_of=lambda p: p)
    assert batch["input_ids"].shape[0] == 2 and batch["position_ids"].ndim == 2


def test_visualglm_packed_segments_equal_samples_alone(tiny_visualglm):
    family = get_family("visualglm")
    model, proc = family.load_model(tiny_visualglm), family.load_processor(tiny_visualglm)
    convs = [([U("<image>What is it?"), A("a red dot")], [Image.new("RGB", (60, 40), (200, 30, 30))]),
             ([U("hello"), A("hi"), U("more?"), A("yes, more")], []),
             ([U("<image>Colour?"), A("green")], [Image.new("RGB", (30, 30), (10, 200, 10))]),
             ([U("Count to three."), A("one two three")], [])]
    items = [proc.encode(turns, images, f"x:{i}") for i, (turns, images) in enumerate(convs)]
    lengths = [x["input_ids"].shape[-1] for x in items]
    # measured max |logit diff| 1.6e-6, per-token loss 4.8e-7 (1 and 2 threads, AVX-512 and AVX2); bound 1e-5
    batch = check_packed_equals_alone(model, proc, items, sum(sorted(lengths)[1:]), seq_of=lambda p: p[:, 0])
    assert batch["input_ids"].shape[0] == 2 and batch["position_ids"].shape[1] == 2


def block_diagonal_4d(batch: dict) -> torch.Tensor:
    from glmtune.models.packed_attention import block_diagonal_mask

    return block_diagonal_mask(batch["position_ids"][0])


def _recipe(model, data, out, *extra):
    from glmtune.config import load_recipe

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    return load_recipe(root / "recipes" / "glm41v" / "quickstart.yaml", [
        f"model.path={model}", f"data.train={data / 'train.jsonl'}", "data.val=null", f"train.output_dir={out}",
        "log.progress_bar=false", "log.report_to=[jsonl]", "train.batch_size=4", "data.shuffle_buffer=16",
        "data.num_workers=0", "train.resume=never", "adapter.dropout=0.0", "train.max_steps=3", "train.lr=5e-3",
        *extra])


def _losses(out):
    import json

    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def test_glm41v_packed_training_equals_unpacked_and_resumes_exactly(tiny_glm41v, shapes_data, tmp_path):
    """Same records, same losses packed or not; a packed run resumed from its checkpoint ends bit-identical."""
    import shutil

    from safetensors.torch import load_file

    from glmtune.train import train

    # dropout 0: dropout draws depend on the batch layout, so only without it can the two runs agree
    plain = train(_recipe(tiny_glm41v, shapes_data, tmp_path / "plain"))
    # max_length 256 fits two shapes samples (~90 tokens) per row: 4 samples -> 2 rows
    packing = ("data.packing=true", "data.max_length=256", "train.save_every=2")
    packed = train(_recipe(tiny_glm41v, shapes_data, tmp_path / "packed", *packing))
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "packed")
    # measured max |loss diff| 5.1e-7 over 4 steps (the logits differ by ~3e-6, see above); bound 1e-5
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert plain["tokens_seen"] == packed["tokens_seen"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "packed" / "checkpoint-2", resumed / "checkpoint-2")
    train(_recipe(tiny_glm41v, shapes_data, resumed, *packing, "train.resume=auto"))
    x, y = (load_file(str(d / "checkpoint-final" / "adapter_model.safetensors")) for d in (tmp_path / "packed", resumed))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
