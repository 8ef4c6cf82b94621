"""Data-parallel training with real processes (torchrun, gloo on this CPU machine), through launch.sh,
under DDP and DeepSpeed ZeRO-2.

Two processes with batch B give the same loss curve as one process with batch 2B (the data stream splits
records by rank; the loss is normalised over the global batch), the saved adapter loads in one process and
gives the same logits, a 2-process resume reproduces the uninterrupted 2-process run, and two launcher
invocations form a 2-node job on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data.train={data / 'train.jsonl'}", f"data.val={data / 'val.jsonl'}",
            "data.max_eval_samples=16", "model.dtype=float32", "train.mixed_precision=no",
            "model.gradient_checkpointing=false", "train.max_steps=6", "train.lr=1e-2", "adapter.dropout=0.0",
            "train.resume=never", "log.progress_bar=false", "data.max_length=128", "data.shuffle_buffer=0",
            "data.num_workers=1", "train.grad_accum=2", "train.save_every=3", f"train.output_dir={out}", *extra]


def env() -> dict:
    # one thread per process: two processes on two cores, and no oversubscription
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def launch(nproc: int, args: list[str], *launcher: str) -> subprocess.CompletedProcess:
    cmd = ["bash", str(ROOT / "launch.sh"), str(nproc), str(ROOT / "recipes/glm4v/lora.yaml"), *launcher, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def losses(out: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def val13(shapes_data, tmp_path_factory) -> Path:
    """13 validation records: 7 for rank 0, 6 for rank 1, so the ranks have different numbers of eval batches
    (4 and 3 at batch size 2), which ZeRO-3 must survive."""
    lines = (shapes_data / "val.jsonl").read_text().splitlines()[:13]
    path = tmp_path_factory.mktemp("val13") / "val.jsonl"
    path.write_text("\n".join(x.replace('"images/', f'"{shapes_data}/images/') for x in lines) + "\n")
    return path


# ZeRO-3 (and its offload variant) matched these curves in manual runs, but one CI run hung in the ZeRO-3
# resume; until that is understood they are not claimed as tested (see README), so they are not run here.
@pytest.fixture(scope="module", params=["ddp", "zero2"])
def ddp_run(request, tiny_glm4v, shapes_data, val13, tmp_path_factory):
    """A 2-process run under DDP and under DeepSpeed ZeRO-2 (configs/deepspeed/zero2.json)."""
    out = tmp_path_factory.mktemp(request.param)
    port = free_port()
    r = launch(2, overrides(tiny_glm4v, shapes_data, out, "train.batch_size=2", f"train.distributed={request.param}",
                            f"data.val={val13}"), "--master", f"127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r, request.param


def test_two_processes_equal_one_process_with_the_global_batch(ddp_run, tiny_glm4v, shapes_data, val13, tmp_path):
    from glmtune.config import load_recipe
    from glmtune.train import train

    out, r, _ = ddp_run
    assert "+ torchrun --nnodes 1 --node_rank 0 --nproc_per_node 2" in r.stdout  # launch.sh shows its command
    assert r.stdout.count("train: 6 steps") == 1  # only the main process reports
    single = tmp_path / "single"
    train(load_recipe(ROOT / "recipes/glm4v/lora.yaml",
                      overrides(tiny_glm4v, shapes_data, single, "train.batch_size=4", f"data.val={val13}")))
    a, b = losses(single), losses(out)
    assert [(s, k) for s, k, _ in a] == [(s, k) for s, k, _ in b]
    for (_, _, x), (_, _, y) in zip(a, b):
        assert abs(x - y) <= 1e-4, (a, b)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_seen"] == 6 * 2 * 4  # steps x micro-batches x global batch: nothing lost or repeated

    # the adapter saved by the 2-process job loads in one process and gives the single run's logits
    from glmtune.chat import load_for_inference
    from glmtune.data.sample import Turn

    _, ddp_model, proc = load_for_inference(out / "checkpoint-final")
    _, single_model, _ = load_for_inference(single / "checkpoint-final")
    batch = proc.collate([proc.encode([Turn("user", "What colour is the shape?"), Turn("assistant", "red")], [])])
    batch.pop("labels")
    with torch.no_grad():
        assert (ddp_model(**batch).logits - single_model(**batch).logits).abs().max() <= 1e-4


def test_two_process_resume_reproduces_the_uninterrupted_run(ddp_run, tiny_glm4v, shapes_data, val13, tmp_path):
    out, _, mode = ddp_run
    shutil.copytree(out / "checkpoint-3", tmp_path / "checkpoint-3")
    if mode != "ddp":  # the optimizer state is DeepSpeed's, one partition per rank
        assert not (out / "checkpoint-3" / "optimizer.pt").exists()
        assert list((out / "checkpoint-3" / "deepspeed").rglob("*optim_states.pt"))
    port = free_port()
    r = launch(2, overrides(tiny_glm4v, shapes_data, tmp_path, "train.batch_size=2", "train.resume=auto",
                            f"train.distributed={mode}", f"data.val={val13}"), "--master", f"127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(out / "checkpoint-final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "checkpoint-final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_two_nodes_on_loopback(tiny_glm4v, shapes_data, tmp_path):
    port = free_port()
    args = overrides(tiny_glm4v, shapes_data, tmp_path / "run", "train.batch_size=2", "train.max_steps=2",
                     "train.save_every=0")
    nodes = [subprocess.Popen(["bash", str(ROOT / "launch.sh"), "1", str(ROOT / "recipes/glm4v/lora.yaml"),
                               "--nnodes", "2", "--node-rank", str(rank), "--master", f"127.0.0.1:{port}", *args],
                              cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert (tmp_path / "run" / "checkpoint-final" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["samples_seen"] == 2 * 2 * 4


def test_zero3_with_text_only_and_image_batches_on_different_ranks_is_a_clear_error(tiny_glm4v, shapes_data,
                                                                                     tmp_path):
    """Rank 0 gets only image samples, rank 1 only text. ZeRO-3 gathers the vision tower's weights collectively,
    so that would hang (a known failure of other tools); glmtune stops every rank with a clear error instead.
    (Running the tower on a blank image for text-only ranks is not implemented yet.)"""
    images = (shapes_data / "train.jsonl").read_text().splitlines()[:8]
    text = [json.dumps({"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]})
            for w in ("red", "blue", "green", "yellow") * 2]
    mixed = tmp_path / "mixed.jsonl"
    lines = [line.replace('"images/', f'"{shapes_data}/images/') for line in images]
    mixed.write_text("\n".join(x for pair in zip(lines, text) for x in pair) + "\n")  # record i -> rank i % 2
    port = free_port()
    args = overrides(tiny_glm4v, shapes_data, tmp_path / "run", "train.batch_size=1", "train.grad_accum=1",
                     "train.max_steps=4", "train.save_every=0", "train.distributed=zero3", f"data.train={mixed}",
                     "data.val=null")
    r = launch(2, args, "--master", f"127.0.0.1:{port}")
    assert r.returncode != 0
    # every rank stops with the CLI's one-line error (torchrun then reports the failed children)
    assert r.stderr.count("glmtune train: error: train.distributed=zero3: in this step some processes have image") == 2


def test_launch_errors_are_clear():
    r = subprocess.run(["bash", str(ROOT / "launch.sh"), "2", "nope.yaml"], capture_output=True, text=True)
    assert r.returncode == 2 and "recipe file not found: nope.yaml" in r.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
