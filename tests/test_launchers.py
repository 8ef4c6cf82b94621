"""The launchers: launch.sh --launcher torchrun|accelerate|deepspeed, and `accelerate launch` / `torchrun` run by
hand, each with 2 real CPU processes.

Every launch must form ONE job over gloo: one "train:" report, samples_seen = steps x grad_accum x batch x 2, and
both ranks in a world of 2 on the gloo backend (seen by a sitecustomize probe that records what
torch.distributed.init_process_group set up in each process). The engine an accelerate config announces
(configs/accelerate/zero2.yaml) is taken by a recipe with train.distributed=auto; a recipe naming another engine
is a RecipeError.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/glm4v/lora.yaml"
pytestmark = pytest.mark.distributed

STEPS, GRAD_ACCUM, BATCH = 2, 2, 2
PROBE = '''import os
if os.environ.get("GLMTUNE_TEST_PROBE"):
    import torch.distributed as dist

    _init = dist.init_process_group

    def init_process_group(*args, **kwargs):
        out = _init(*args, **kwargs)
        path = os.path.join(os.environ["GLMTUNE_TEST_PROBE"], f"rank{dist.get_rank()}")
        with open(path, "w") as f:
            f.write(f"{dist.get_backend()} {dist.get_world_size()}")
        return out

    dist.init_process_group = init_process_group
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data.train={data / 'train.jsonl'}", f"data.val={data / 'val.jsonl'}",
            "data.max_eval_samples=4", "model.dtype=float32", "train.mixed_precision=no",
            "model.gradient_checkpointing=false", f"train.max_steps={STEPS}", f"train.grad_accum={GRAD_ACCUM}",
            f"train.batch_size={BATCH}", "train.save_every=0", "train.resume=never", "log.progress_bar=false",
            "log.report_to=[jsonl]", "data.max_length=128", "data.num_workers=1", f"train.output_dir={out}", *extra]


@pytest.fixture
def probe(tmp_path) -> Path:
    """A folder where every process of the job writes `BACKEND WORLD_SIZE` to rank<R>."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(PROBE)
    (tmp_path / "ranks").mkdir()
    return tmp_path


def env(probe: Path) -> dict:
    # one thread per process: two processes on two cores, and no oversubscription
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{probe / 'site'}{os.pathsep}{ROOT}",
                GLMTUNE_TEST_PROBE=str(probe / "ranks"))


def run(cmd: list[str], probe: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env(probe), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def launch_sh(nproc: int, *args, probe: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return run(["bash", ROOT / "launch.sh", str(nproc), RECIPE, *args], probe, cwd)


def assert_one_job(out: Path, stdout: str, probe: Path, deepspeed: bool):
    """Two processes formed one gloo job that trained STEPS steps on the global batch and saved the adapter."""
    assert stdout.count(f"train: {STEPS} steps") == 1, stdout  # only the main process of the one job reports
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_seen"] == STEPS * GRAD_ACCUM * BATCH * 2  # both ranks' samples, nothing repeated
    final = out / "checkpoint-final"
    assert (final / "adapter_model.safetensors").is_file()
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (probe / "ranks").iterdir()) == ["rank0", "rank1"]
    assert {p.read_text() for p in (probe / "ranks").iterdir()} == {"gloo 2"}  # no GPU here: gloo
    # the engine: DeepSpeed writes each rank's optimizer partition, DDP one optimizer.pt
    assert (final / "deepspeed").is_dir() == deepspeed
    assert (final / "optimizer.pt").is_file() == (not deepspeed)


def test_launch_sh_accelerate_takes_the_deepspeed_config_of_the_accelerate_config(tiny_glm4v, shapes_data, probe):
    """launch.sh --launcher accelerate with configs/accelerate/zero2.yaml and a recipe left at
    train.distributed=auto: ZeRO-2 from the launcher's environment. Run from another folder, so the yaml's
    relative configs/deepspeed/zero2.json is found in the repository."""
    out, port = probe / "run", free_port()
    config = ROOT / "configs/accelerate/zero2.yaml"
    r = launch_sh(2, "--launcher", "accelerate", "--accelerate-config", config, "--master", f"127.0.0.1:{port}",
                  *overrides(tiny_glm4v, shapes_data, out), probe=probe, cwd=probe)
    assert r.stdout.startswith(f"+ accelerate launch --config_file {config} --num_processes 2 --num_machines 1 "
                               f"--machine_rank 0 --main_process_ip 127.0.0.1 --main_process_port {port} "
                               f"-m glmtune train {RECIPE} model.path=")
    assert_one_job(out, r.stdout, probe, deepspeed=True)


def test_launch_sh_deepspeed_with_a_localhost_hostfile(tiny_glm4v, shapes_data, probe):
    out, port = probe / "run", free_port()
    hostfile = probe / "hostfile"
    hostfile.write_text("# DeepSpeed hostfile\nlocalhost slots=2\n")
    r = launch_sh(2, "--launcher", "deepspeed", "--hostfile", hostfile, "--master", f"127.0.0.1:{port}",
                  *overrides(tiny_glm4v, shapes_data, out, "train.distributed=zero2"), probe=probe)
    assert r.stdout.startswith(f"+ deepspeed --hostfile {hostfile} --no_ssh --node_rank 0 --num_gpus 2 "
                               f"--master_addr 127.0.0.1 --master_port {port} --no_local_rank --module glmtune "
                               f"train {RECIPE} model.path=")
    assert_one_job(out, r.stdout, probe, deepspeed=True)


def test_launch_sh_deepspeed_two_nodes_from_a_hostfile_on_loopback(tiny_glm4v, shapes_data, probe):
    """Two hosts in the hostfile, one process each; launch.sh runs once per node with its --node-rank (no ssh)."""
    out, port = probe / "run", free_port()
    hostfile = probe / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    args = ["--launcher", "deepspeed", "--hostfile", hostfile, "--master", f"127.0.0.1:{port}",
            *overrides(tiny_glm4v, shapes_data, out)]
    nodes = [subprocess.Popen(["bash", ROOT / "launch.sh", "1", RECIPE, "--node-rank", str(rank), *args], cwd=ROOT,
                              env=env(probe), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    for rank, (stdout, _) in enumerate(results):
        assert stdout.startswith(f"+ deepspeed --hostfile {hostfile} --no_ssh --node_rank {rank} --num_gpus 1 ")
    assert_one_job(out, results[0][0] + results[1][0], probe, deepspeed=False)


def test_accelerate_launch_by_hand_with_the_ddp_config(tiny_glm4v, shapes_data, probe):
    out, port = probe / "run", free_port()
    r = run(["accelerate", "launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2",
             "--main_process_port", str(port), "-m", "glmtune", "train", RECIPE,
             *overrides(tiny_glm4v, shapes_data, out)], probe)
    assert_one_job(out, r.stdout, probe, deepspeed=False)


def test_torchrun_by_hand(tiny_glm4v, shapes_data, probe):
    out, port = probe / "run", free_port()
    r = run(["torchrun", "--nproc_per_node", "2", "--master_port", str(port), "-m", "glmtune", "train", RECIPE,
             *overrides(tiny_glm4v, shapes_data, out)], probe)
    assert_one_job(out, r.stdout, probe, deepspeed=False)


@pytest.mark.parametrize("args, message", [
    (["--launcher", "mpirun"], "--launcher must be torchrun, accelerate or deepspeed, got 'mpirun'"),
    (["--hostfile", "hosts"], "--hostfile is for --launcher deepspeed; with torchrun run launch.sh on every node"),
    (["--launcher", "accelerate", "--hostfile", "hosts"], "--hostfile is for --launcher deepspeed; with accelerate"),
    (["--launcher", "deepspeed", "--nnodes", "2"], "--launcher deepspeed with --nnodes 2 needs --hostfile FILE"),
    (["--launcher", "deepspeed", "--hostfile", "bad_hosts"], "bad_hosts: bad line 'localhost 2'"),
    (["--launcher", "deepspeed", "--hostfile", "hosts", "--nnodes", "2"], "--nnodes 2, but hosts lists 1 hosts"),
    (["--accelerate-config", "configs/accelerate/zero2.yaml"], "--accelerate-config is for --launcher accelerate"),
    (["--launcher"], "--launcher needs a value"),
])
def test_launch_sh_errors_are_clear(args, message, tmp_path):
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    (tmp_path / "bad_hosts").write_text("localhost 2\n")
    r = subprocess.run(["bash", str(ROOT / "launch.sh"), "2", str(RECIPE), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr  # stopped before printing or running a command
    assert f"launch.sh: {message}" in r.stderr


# --- the engine accelerate launch announces (no processes: its environment variables set by hand) ---

LAUNCH_VARS = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
               "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
               "ACCELERATE_CONFIG_DS_FIELDS")


def recipe(*extra: str):
    from glmtune.config import load_recipe

    return load_recipe(RECIPE, ["train.batch_size=3", "train.grad_accum=4", "train.max_grad_norm=0.5",
                                "train.mixed_precision=bf16", *extra], check_files=False)


@pytest.fixture
def announce(monkeypatch, tmp_path):
    """Set the environment `accelerate launch` gives its processes; run from a folder outside the repository."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)

    def set_env(**values):
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        for name, value in values.items():
            monkeypatch.setenv(f"ACCELERATE_{name}", value)
    return set_env


def test_an_auto_recipe_takes_the_announced_deepspeed_config_with_autos_filled(announce):
    from glmtune.distributed import deepspeed_config

    expected = deepspeed_config(recipe("train.distributed=zero2"))  # before the launcher's variables are set
    assert deepspeed_config(recipe()) is None  # auto = DDP without a launcher announcement
    announce(DEEPSPEED_CONFIG_FILE="configs/deepspeed/zero2.json",
             CONFIG_DS_FIELDS="deepspeed_config_file,deepspeed_multinode_launcher")
    cfg = deepspeed_config(recipe())
    assert cfg == expected
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["gradient_clipping"],
            cfg["bf16"]["enabled"], cfg["fp16"]["enabled"], cfg["zero_optimization"]["stage"]) == (3, 4, 0.5, True,
                                                                                                   False, 2)
    assert deepspeed_config(recipe("train.distributed=zero2")) == expected  # the same engine named twice: fine


def test_a_zero_stage_alone_maps_to_the_shipped_configs(announce):
    from glmtune.config import RecipeError
    from glmtune.distributed import deepspeed_config

    announce(DEEPSPEED_ZERO_STAGE="3", DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu", DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu")
    assert deepspeed_config(recipe()) == deepspeed_config(recipe("train.distributed=zero3_offload"))
    assert deepspeed_config(recipe())["zero_optimization"]["offload_param"]["device"] == "cpu"
    announce(DEEPSPEED_ZERO_STAGE="1", DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="none", DEEPSPEED_OFFLOAD_PARAM_DEVICE="none")
    with pytest.raises(RecipeError, match="ACCELERATE_DEEPSPEED_ZERO_STAGE=1.*deepspeed_config_file"):
        deepspeed_config(recipe())


def test_the_flag_accelerator_leaves_in_its_own_process_is_no_announcement(announce, monkeypatch):
    from glmtune.distributed import deepspeed_config

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what Accelerator(deepspeed_plugin=...) sets
    assert deepspeed_config(recipe()) is None


@pytest.mark.parametrize("asked, fix", [
    ("train.distributed=ddp", "configs/accelerate/ddp.yaml"),
    ("train.distributed=zero3", "configs/accelerate/zero3.yaml"),
])
def test_a_recipe_naming_another_engine_than_the_launcher_is_a_recipe_error(announce, asked, fix):
    from glmtune.config import RecipeError
    from glmtune.distributed import deepspeed_config

    announce(DEEPSPEED_CONFIG_FILE="configs/deepspeed/zero2.json", CONFIG_DS_FIELDS="deepspeed_config_file")
    with pytest.raises(RecipeError) as e:
        deepspeed_config(recipe(asked))
    message = str(e.value)
    assert message.startswith(f"{asked}, but the launcher runs DeepSpeed zero2 (accelerate launch set "
                              f"ACCELERATE_DEEPSPEED_CONFIG_FILE=configs/deepspeed/zero2.json)")
    assert "leave train.distributed=auto" in message and fix in message


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
