"""Faults of the process: `glmtune train` killed with SIGKILL mid-step and mid-save, stopped by SIGTERM and SIGINT.

One chain of interrupted runs in one output folder, each resuming with `train.resume=auto`, must end with the
adapter of an uninterrupted run, tensor for tensor (torch.equal); a kill leaves no process of the run behind
(DataLoader workers, their fork server, multiprocessing's resource tracker); a signal finishes the step, saves
a checkpoint and says how to resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "glm4" / "lora.yaml"
MAX_STEPS, SAVE_EVERY = 20, 3  # room after the kill legs for the SIGTERM and SIGINT legs to stop early
GONE_WITHIN_S = 10.0  # measured here: every process of the run gone 0.5-3 s after SIGKILL (3 s with 8x load)

# Run in the child instead of `-m glmtune` when a test needs a hook: PAUSE_AT_WRITE, an audit hook that pauses the
# N-th file opened for writing inside a `*.tmp` folder (a checkpoint being written) and tells the test, which kills
# the process there: mid-save; SLOW_STEP_S, a sleep before each micro-batch's loss (results unchanged), so that a
# signal sent after step N surely arrives before the tiny model's last step (at full speed it can finish all
# MAX_STEPS between the test seeing step N and the signal arriving).
HOOKED_CHILD = """
import os, sys, time
from pathlib import Path
if "PAUSE_AT_WRITE" in os.environ:
    n, marker, seen = int(os.environ["PAUSE_AT_WRITE"]), os.environ["PAUSE_MARKER"], []
    def pause(event, args):
        if event == "open" and isinstance(args[0], str) and isinstance(args[1], str) and "w" in args[1] \
                and Path(args[0]).parent.suffix == ".tmp":
            seen.append(args[0])
            if len(seen) == n:
                Path(marker).write_text(str(args[0]))
                time.sleep(600)
    sys.addaudithook(pause)
if "SLOW_STEP_S" in os.environ:
    import glmtune.train
    real = glmtune.train.token_loss_sum
    def slow(*args):
        time.sleep(float(os.environ["SLOW_STEP_S"]))
        return real(*args)
    glmtune.train.token_loss_sum = slow
from glmtune.cli import main
sys.exit(main())
"""


def overrides(model: Path, data: Path, out: Path) -> list[str]:
    return [f"model.path={model}", f"data.train={data / 'train.jsonl'}", f"train.output_dir={out}",
            f"train.max_steps={MAX_STEPS}", f"train.save_every={SAVE_EVERY}", "train.keep_last=2", "train.lr=1e-2",
            "train.batch_size=2", "train.grad_accum=2", "data.shuffle_buffer=16", "data.num_workers=2",
            "data.max_length=64", "log.progress_bar=false", "log.report_to=[jsonl]", "train.resume=auto"]


def start(args: list[str], out_log: Path, env: dict | None = None, hooked: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-c", HOOKED_CHILD] if hooked else [sys.executable, "-m", "glmtune"]
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # as the reference run in this process
    with open(out_log.with_suffix(".out"), "w") as stdout, open(out_log.with_suffix(".err"), "w") as stderr:
        # own session: the test can signal the whole process group, as a terminal's Ctrl-C or a scheduler does
        return subprocess.Popen([*cmd, "train", str(RECIPE), *args], cwd=ROOT, stdout=stdout, stderr=stderr,
                                env={**os.environ, **threads, **(env or {})}, start_new_session=True)


def stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) from /proc, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below `root` (children, their children, ...)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (s := stat(int(entry.name))) is not None and s[0] not in "ZX":
            parent[int(entry.name)] = s
    found, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for pid, (_, ppid, started) in parent.items():
            if ppid == p and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


def alive(procs: dict[int, int]) -> list[int]:
    """Those of `procs` still running (a zombie has ended; a reused pid has another start time)."""
    return [pid for pid, started in procs.items()
            if (s := stat(pid)) is not None and s[0] not in "ZX" and s[2] == started]


def wait_gone(procs: dict[int, int]) -> float:
    """Seconds until every one of `procs` has ended; fails after GONE_WITHIN_S."""
    since = time.time()
    while alive(procs) and time.time() - since < GONE_WITHIN_S:
        time.sleep(0.05)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in alive(procs)}
    assert not left, f"{len(left)} processes of the run still alive {GONE_WITHIN_S} s after it ended: {left}"
    return time.time() - since


def end(proc: subprocess.Popen, procs: dict[int, int]):
    """Whatever happened in the test: nothing it started outlives it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in alive(procs):
        os.kill(pid, signal.SIGKILL)


def train_rows(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if row["split"] == "train":
            steps.append(row["step"])
    return steps


def wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 600.0):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n"
                        f"{log.with_suffix('.err').read_text()[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


def kill_and_check_nothing_survives(proc: subprocess.Popen) -> float:
    """SIGKILL the trainer; every process it had started must be gone within GONE_WITHIN_S; returns the time."""
    procs = descendants(proc.pid)
    # the fork server, its two DataLoader workers and the resource tracker
    assert len(procs) >= 4, f"expected the run's helper processes, found {procs}"
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return wait_gone(procs)
    finally:
        end(proc, procs)


def stop_with(sig: signal.Signals, proc: subprocess.Popen, log: Path, out: Path) -> int:
    """Send `sig` to the run's whole process group; it must finish its step, save, say how to resume, exit
    128+sig, and leave no process behind. Returns the step it stopped after."""
    procs = descendants(proc.pid)
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=600)
        err = log.with_suffix(".err").read_text()
        assert proc.returncode == 128 + sig, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        found = re.search(rf"stopped by {sig.name} after step (\d+) of {MAX_STEPS}; saved (\S+); to resume, run: "
                          rf"glmtune train {re.escape(str(RECIPE))} .* train\.resume=auto$", err, re.M)
        assert found, err[-3000:]
        step, ckpt = int(found[1]), Path(found[2])
        assert ckpt == out / f"checkpoint-{step}"
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
        assert max(train_rows(out)) == step  # the step it was in when the signal came was finished, no more
        wait_gone(procs)
        return step
    finally:
        end(proc, procs)


def adapter(ckpt: Path) -> dict:
    return load_file(str(ckpt / "adapter_model.safetensors"))


def test_a_second_signal_stops_at_once_and_handlers_are_restored():
    from glmtune.train import stop_signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with stop_signals() as received:
            signal.raise_signal(signal.SIGINT)
            assert received == ["SIGINT"]  # the first: a request, noted
            signal.raise_signal(signal.SIGINT)  # the second: Ctrl-C as without glmtune
            pytest.fail("the second SIGINT did not interrupt")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with stop_signals() as received:
        signal.raise_signal(signal.SIGTERM)
    assert received == ["SIGTERM"] and (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_workers_and_their_fork_server_leave_stop_signals_to_the_trainer(tiny_glm4, text_data):
    """Schedulers signal every process of a job, Ctrl-C the process group: the trainer may still need batches
    to finish its step, so DataLoader workers and fork server must not die of SIGTERM / SIGINT."""
    from glmtune.data.stream import StreamSpec, make_loader
    from glmtune.models import get_family

    processor = get_family("glm4").load_processor(tiny_glm4)
    spec = StreamSpec(files=[str(text_data / "train.jsonl")], format="glm4", max_length=64, batch_size=2, epochs=1)
    expected = [b["position"] for b in make_loader(spec, processor)]
    batches = iter(make_loader(spec, processor, num_workers=2))
    got = [next(batches)["position"], next(batches)["position"]]  # each worker past its start (batch k: worker k % 2)
    helpers = {pid: started for pid, started in descendants(os.getpid()).items()
               if b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()}
    assert len(helpers) >= 3, helpers  # the fork server and its two workers
    for pid in helpers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert alive(helpers) == list(helpers)
    got += [b["position"] for b in batches]  # (a dead worker: "DataLoader worker exited unexpectedly")
    assert got == expected


def test_killed_and_stopped_runs_resume_to_the_uninterrupted_adapter(tiny_glm4, text_data, tmp_path):
    rng = random.Random(10)  # the kill points: reproducible
    ref_out, out = tmp_path / "reference", tmp_path / "run"

    from glmtune.checkpoint import find_resume
    from glmtune.config import load_recipe
    from glmtune.train import train

    # uninterrupted, in this process and without workers (the batches do not depend on their number)
    train(load_recipe(RECIPE, [*overrides(tiny_glm4, text_data, ref_out), "data.num_workers=0"]))
    args = overrides(tiny_glm4, text_data, out)

    # 1. SIGKILL at a random moment after checkpoint-3, mid-step
    log = tmp_path / "kill-mid-step"
    proc = start(args, log, env={"SLOW_STEP_S": "0.1"}, hooked=True)
    kill_after = rng.choice([4, 5])
    wait_for(lambda: max(train_rows(out), default=0) >= kill_after, proc, log, f"step {kill_after}")
    time.sleep(rng.uniform(0.0, 0.3))
    gone_s = [kill_and_check_nothing_survives(proc)]
    assert (out / "checkpoint-3").is_dir() and not (out / "checkpoint-final").exists()

    latest = find_resume(load_recipe(RECIPE, args))
    assert latest in (out / "checkpoint-3", out / "checkpoint-6"), latest  # (6 if the run was quicker than the test)

    # 2. SIGKILL in the middle of writing the next checkpoint (part of its files written)
    log = tmp_path / "kill-mid-save"
    marker = tmp_path / "paused-in-save"
    proc = start(args, log, env={"PAUSE_AT_WRITE": str(rng.choice([1, 2, 3])), "PAUSE_MARKER": str(marker)},
                 hooked=True)
    wait_for(marker.exists, proc, log, "the pause in a checkpoint's save")
    saving_step = int(latest.name.split("-")[1]) + SAVE_EVERY
    saving = out / f"checkpoint-{saving_step}"
    assert Path(marker.read_text()).parent == saving.with_name(saving.name + ".tmp")
    gone_s.append(kill_and_check_nothing_survives(proc))
    assert not saving.exists()
    assert find_resume(load_recipe(RECIPE, args)) == latest  # the half-written one is ignored

    # 3. SIGTERM to every process of the run (as a scheduler does before it kills)
    log = tmp_path / "sigterm"
    proc = start(args, log, env={"SLOW_STEP_S": "0.2"}, hooked=True)
    wait_for(lambda: max(train_rows(out), default=0) >= saving_step + 1, proc, log, f"step {saving_step + 1}")
    stopped = stop_with(signal.SIGTERM, proc, log, out)

    # 4. Ctrl-C (SIGINT to the process group)
    log = tmp_path / "sigint"
    proc = start(args, log, env={"SLOW_STEP_S": "0.2"}, hooked=True)
    wait_for(lambda: max(train_rows(out), default=0) >= stopped + 1, proc, log, f"step {stopped + 1}")
    stopped = stop_with(signal.SIGINT, proc, log, out)
    assert stopped < MAX_STEPS

    # 5. to the end
    log = tmp_path / "last"
    proc = start(args, log)
    try:
        assert proc.wait(timeout=600) == 0, log.with_suffix(".err").read_text()[-3000:]
    finally:
        end(proc, {})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and summary["resumed_from"] == str(out / f"checkpoint-{stopped}")
    expected, got = adapter(ref_out / "checkpoint-final"), adapter(out / "checkpoint-final")
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    states = [json.loads((d / "checkpoint-final" / "trainer_state.json").read_text()) for d in (ref_out, out)]
    assert states[0]["records"] == states[1]["records"] and states[0]["samples"] == states[1]["samples"]
    assert train_rows(out) == list(range(1, MAX_STEPS + 1))  # every step once in the metrics
    print(f"processes gone {', '.join(f'{s:.2f}' for s in gone_s)} s after SIGKILL")


@pytest.mark.distributed
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(tiny_glm4, text_data, tmp_path):
    """Ranks get a signal at different moments (or only one gets it): they agree on the step to stop after, else
    one would enter the checkpoint's collectives while the other runs the next step's, and both would hang."""
    out, log = tmp_path / "run", tmp_path / "torchrun"
    args = [*overrides(tiny_glm4, text_data, out), "data.num_workers=0", "model.gradient_checkpointing=false"]
    port = str(random.Random(os.getpid()).randrange(20000, 40000))
    with open(log.with_suffix(".out"), "w") as stdout, open(log.with_suffix(".err"), "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", port, "-m", "glmtune", "train", str(RECIPE), *args], cwd=ROOT,
                                stdout=stdout, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                start_new_session=True)
    procs = {}
    try:
        wait_for(lambda: max(train_rows(out), default=0) >= 2, proc, log, "step 2")
        procs = descendants(proc.pid)
        rank1 = [pid for pid in procs if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
        assert len(rank1) == 1, procs
        os.kill(rank1[0], signal.SIGTERM)
        proc.wait(timeout=600)
        err = log.with_suffix(".err").read_text()
        found = re.search(r"stopped by another process's signal after step (\d+) of", err)
        assert found, err[-3000:]
        step = int(found[1])
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["step"] == step and state["world_size"] == 2 and max(train_rows(out)) == step < MAX_STEPS
        wait_gone(procs)
    finally:
        end(proc, procs)


def test_a_loader_left_open_at_exit_does_not_hang_the_process(tiny_glm4, text_data, tmp_path):
    """multiprocessing's exit handler terminates (SIGTERM) and joins the workers of a loader nobody shut down; a
    worker that ignored SIGTERM for good made that join wait forever (seen: a DDP rank done with training hung at
    exit). Workers now serve on for SIGTERM_GRACE_S after a SIGTERM, then end."""
    from glmtune.data.stream import SIGTERM_GRACE_S

    script = tmp_path / "leak.py"
    script.write_text(
        "from glmtune.data.stream import StreamSpec, make_loader\n"
        "from glmtune.models import get_family\n"
        "if __name__ == '__main__':  # the fork server's children import this module too\n"
        f"    processor = get_family('glm4').load_processor({str(tiny_glm4)!r})\n"
        f"    spec = StreamSpec(files=[{str(text_data / 'train.jsonl')!r}], format='glm4', max_length=64,"
        " batch_size=2)\n"
        "    LEAKED = iter(make_loader(spec, processor, num_workers=1))  # a module global: alive until exit\n"
        "    next(LEAKED)\n"
        "    print('read a batch', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        out, _ = proc.communicate(timeout=SIGTERM_GRACE_S + 60)  # start-up + the grace, with room for a busy CI
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the process hung at exit joining its DataLoader worker")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and b"read a batch" in out, out.decode()[-2000:]
