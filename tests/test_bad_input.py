"""Bad input never crashes and never trains on nothing (issue #10, data side).

- a JSON array is read as one whatever the file's suffix (VisualGLM's fewshot data saved as .jsonl);
- an empty file, an all-bad one, or one whose first records are mostly bad stops before step 1 with one line
  naming the file, and `glmtune check` says the same;
- a bad record is counted once, however often the stream cycles; a step with no target token on any process is
  not a training step; a rank whose micro-batch is all bad still runs its (weightless) backward pass;
- extreme image shapes go through every vision family's processor; data.max_image_pixels reaches the loader.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from PIL import Image

from glmtune.check import check
from glmtune.config import RecipeError, load_recipe
from glmtune.data.sample import SampleError, Turn
from glmtune.models import FAMILIES, get_family

ROOT = Path(__file__).resolve().parent.parent
VISION_FAMILIES = [f for f in FAMILIES if get_family(f).has("vision")]
QA = '{{"messages": [{{"role": "user", "content": "Say {0}."}}, {{"role": "assistant", "content": "{0}"}}]}}'
BAD = '{"messages": [{"role": "user", "content": "broken"'


def glm4_args(model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data.train={train}", "model.dtype=float32", "train.mixed_precision=no",
            "model.gradient_checkpointing=false", "train.resume=never", "log.progress_bar=false",
            "data.shuffle_buffer=0", "data.num_workers=0", "train.grad_accum=1", "train.batch_size=1",
            "data.max_length=64", f"train.output_dir={out}", "train.lr=1e-3", *extra]


def glm4_recipe(*args: str):
    return load_recipe(ROOT / "recipes" / "glm4" / "lora.yaml", list(args))


def write_lines(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_data_keys_are_validated():
    quickstart = ROOT / "recipes" / "glm41v" / "quickstart.yaml"
    for override, message in [("data.max_bad_fraction=1.5", "`data.max_bad_fraction` is 1.5, must be in [0, 1]"),
                              ("data.check_first=0", "`data.check_first` is 0, must be >= 1"),
                              ("data.max_image_pixels=0", "`data.max_image_pixels` is 0, must be >= 1"),
                              ("data.train=train.csv", "`data.train` = train.csv: a data file must be .jsonl")]:
        with pytest.raises(RecipeError) as e:
            load_recipe(quickstart, [override], check_files=False)
        assert str(e.value).startswith(f"{quickstart} with overrides ['{override}']: {message}")


def test_visualglm_array_saved_as_jsonl_trains(tiny_visualglm, shapes_data, tmp_path):
    """The issue's run: recipes/visualglm/ptuning.yaml (on_bad_sample: skip) on VisualGLM fewshot data (a JSON
    array) saved as data.jsonl skipped every record and trained 30 steps at loss 0.0; now its records train."""
    from glmtune.train import train

    rows = [json.loads(x) for x in (shapes_data / "train.jsonl").read_text().splitlines()[:4]]
    images = tmp_path / "图片 é"  # non-ASCII image paths, relative to the data file
    images.mkdir()
    for r in rows:
        shutil.copy(shapes_data / r["messages"][0]["image"], images / f"猫 {Path(r['messages'][0]['image']).name}")
    array = [{"img": f"图片 é/猫 {Path(r['messages'][0]['image']).name}", "prompt": r["messages"][0]["content"],
              "label": r["messages"][1]["content"]} for r in rows]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(array, ensure_ascii=False, indent=1))
    recipe = load_recipe(ROOT / "recipes" / "visualglm" / "ptuning.yaml", [
        f"model.path={tiny_visualglm}", f"data.train={data}", "model.dtype=float32", "train.mixed_precision=no",
        "model.gradient_checkpointing=false", "train.grad_accum=1", "train.max_steps=2", "adapter.num_virtual_tokens=4",
        f"train.output_dir={tmp_path / 'run'}", "log.progress_bar=false", "data.num_workers=0", "train.resume=never"])
    report = check(recipe, print_fn=lambda *_: None)
    assert report["ok"] and report["files"][0]["samples"] == 4 and report["files"][0]["bad_samples"] == 0
    summary = train(recipe)
    assert summary["steps"] == 2 and summary["samples_seen"] == 2 and summary["skipped_samples"] == 0
    assert summary["final_train_loss"] > 0


def test_empty_all_bad_and_mostly_bad_data_stop_before_step_1(tiny_glm4, tmp_path):
    """Before the model loads: one line naming the file and why; `glmtune check` gives the same line."""
    from glmtune.train import train

    empty = write_lines(tmp_path / "empty.jsonl", [""])
    r = subprocess.run([sys.executable, "-m", "glmtune", "train", str(ROOT / "recipes" / "glm4" / "lora.yaml"),
                        *glm4_args(tiny_glm4, empty, tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"glmtune train: error: {empty}: the file holds no records (empty, or "
                                             f"only blank lines); point data.train / data.val at a .jsonl (one JSON "
                                             f"object per line) or .json (an array of objects) file with samples"]
    assert not (tmp_path / "run").exists()

    all_bad = write_lines(tmp_path / "all_bad.jsonl", [BAD, "[1, 2]"])
    mostly_bad = write_lines(tmp_path / "mostly_bad.jsonl", [QA.format("yes"), BAD, BAD, QA.format("no")] * 30)
    cases = [(all_bad, [], f"{all_bad}: all 2 records read are bad samples (first: {all_bad}:1: invalid JSON"),
             # 60 of 120 bad: at the default limit (0.5), not over it; the first 10 records: 5 of 10 bad
             (mostly_bad, ["data.max_bad_fraction=0.49", "data.check_first=10"],
              f"{mostly_bad}: 5 of the first 10 records are bad samples, over data.max_bad_fraction=0.49 (first: "
              f"{mostly_bad}:2: invalid JSON")]
    for data, extra, message in cases:
        recipe = glm4_recipe(*glm4_args(tiny_glm4, data, tmp_path / "run", *extra))
        with pytest.raises(SampleError) as e:
            train(recipe)
        assert str(e.value).startswith(message) and "glmtune check lists every bad sample" in str(e.value)
        printed = []
        report = check(recipe, print_fn=printed.append)
        assert not report["ok"] and printed[-1] == f"check: training would stop before step 1: {e.value}"
        assert not (tmp_path / "run").exists()
    recipe = glm4_recipe(*glm4_args(tiny_glm4, mostly_bad, tmp_path / "run", "data.check_first=10"))
    assert check(recipe, print_fn=lambda *_: None)["ok"]  # 0.5 is allowed


def test_max_image_pixels_reaches_the_image_loader(tiny_glm41v, shapes_data, tmp_path):
    """A limit under the images' 112x112 pixels makes each of them a bad sample (in check, and in training,
    where the all-bad start stops the run)."""
    from glmtune.train import train

    args = [f"model.path={tiny_glm41v}", f"data.train={shapes_data / 'train.jsonl'}", "data.val=null",
            f"train.output_dir={tmp_path / 'run'}", "data.check_first=4"]
    quickstart = ROOT / "recipes" / "glm41v" / "quickstart.yaml"
    assert check(load_recipe(quickstart, args), print_fn=lambda *_: None)["files"][0]["bad_samples"] == 0
    recipe = load_recipe(quickstart, [*args, "data.max_image_pixels=12000"])
    report = check(recipe, print_fn=lambda *_: None)
    assert not report["ok"] and report["files"][0]["samples"] == 0
    assert report["files"][0]["bad"][0]["reason"].endswith("= 12544 pixels is over the limit of 12000")
    with pytest.raises(SampleError, match="all 4 records read are bad samples .* over the limit of 12000"):
        train(recipe)


def test_a_step_without_target_tokens_is_not_a_step(tiny_glm4, tmp_path):
    """Batch 1, one process, line 2 bad: its micro-batch has no target token, so it is no training step (the
    loop reads on); the stream cycles 3 times over the file, the bad line is counted once."""
    from glmtune.train import train

    data = write_lines(tmp_path / "d.jsonl", [QA.format("yes"), BAD, QA.format("no"), QA.format("maybe")])
    out = tmp_path / "run"
    summary = train(glm4_recipe(*glm4_args(tiny_glm4, data, out, "train.max_steps=7")))
    # records read: 1 x 3 4 | 1 x 3 4 | 1 -> 7 steps on 7 good records, 2 reads of line 2 that were no step
    assert summary["steps"] == 7 and summary["samples_seen"] == 7 and summary["steps_without_targets"] == 2
    assert summary["skipped_samples"] == 1 and summary["skipped"][0]["source"] == f"{data}:2"
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 7 and min(losses) > 0
    state = json.loads((out / "checkpoint-final" / "trainer_state.json").read_text())
    assert state["records"] == 9 and state["steps_without_targets"] == 2


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_extreme_aspect_ratios_go_through_every_vision_processor(family, request):
    processor = get_family(family).load_processor(request.getfixturevalue(f"tiny_{family}"))
    turns = [Turn("user", "<image>What is it?"), Turn("assistant", "A line.")]
    for size in [(1, 2000), (2000, 1), (3, 700), (1, 1)]:
        item = processor.encode(turns, [Image.new("RGB", size, (200, 30, 30))], "d.jsonl:1", 4096)
        batch = processor.collate([item])
        assert (batch["labels"] != -100).any() and processor.image_token_count(item) > 0, size


@pytest.mark.distributed
def test_two_processes_with_an_all_bad_micro_batch_on_one_rank(tiny_glm4, tmp_path):
    """DDP, 2 processes, batch 1: rank 1's first micro-batch (line 2) is bad before it has read any good one, so
    it runs its weightless pass on the data's first good record (it used to skip it while rank 0 waited in the
    gradient all-reduce); global batch 2 (lines 3, 4) has no target anywhere: no step. Lines 2-4 bad: 3 of 6, at
    the 0.5 limit. Every bad line is counted once though line 2 is read again in the second epoch."""
    data = write_lines(tmp_path / "d.jsonl", [QA.format("yes"), BAD, BAD, "[]", QA.format("no"), QA.format("ok")])
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["bash", str(ROOT / "launch.sh"), "2", str(ROOT / "recipes" / "glm4" / "lora.yaml"), "--master",
           f"127.0.0.1:{port}", *glm4_args(tiny_glm4, data, out, "train.max_steps=3", "train.distributed=ddp")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        job.wait(timeout=300)  # the old loop hung here (rank 0 in the gradient all-reduce)
    finally:
        if job.poll() is None:  # torchrun starts each worker in a session of its own: kill them one by one
            for process in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            job.wait()
    assert job.returncode == 0, log.read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # steps: (1, 2) -> rank 0 learns line 1; (3, 4) -> nothing, no step; (5, 6); (1, 2) of the second epoch
    assert summary["steps"] == 3 and summary["steps_without_targets"] == 1 and summary["samples_seen"] == 4
    assert sorted(s["source"] for s in summary["skipped"]) == [f"{data}:{n}" for n in (2, 3, 4)]
