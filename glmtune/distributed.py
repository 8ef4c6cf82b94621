"""Several processes: the accelerate / DeepSpeed setup of a recipe, and the few collectives the loop needs.

`train.distributed` (or `train.deepspeed=PATH`) picks the engine; DeepSpeed configs live in configs/deepspeed/
with "auto" values that are filled from the recipe here, so one recipe runs unchanged on 1..N processes.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from glmtune.config import Recipe, RecipeError

IMAGE_KEYS = ("pixel_values", "images")  # model inputs that carry images, per family
# glmtune/configs (the repository's configs/ links here), so that an installed wheel carries them too
DEEPSPEED_CONFIGS = Path(__file__).resolve().parent / "configs" / "deepspeed"


def launcher_deepspeed(recipe: Recipe) -> Path | None:
    """The DeepSpeed config file that `accelerate launch` announced to this process, or None.

    accelerate's DeepSpeed launch (`distributed_type: DEEPSPEED`, `--use_deepspeed`) tells every process through
    its environment: ACCELERATE_USE_DEEPSPEED=true with ACCELERATE_DEEPSPEED_CONFIG_FILE, or only a ZeRO stage
    (ACCELERATE_DEEPSPEED_ZERO_STAGE, ACCELERATE_DEEPSPEED_OFFLOAD_*_DEVICE), which maps to configs/deepspeed/.
    A recipe with train.distributed=auto and no train.deepspeed takes that config; a recipe naming another engine
    is a RecipeError naming both. (Accelerator sets ACCELERATE_USE_DEEPSPEED in its own process too, so that flag
    without any of the launcher's other variables is no announcement.)
    """
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    file = None if file.lower() in ("", "none") else file
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if file is None and stage is None and "ACCELERATE_CONFIG_DS_FIELDS" not in env:
        return None
    package = DEEPSPEED_CONFIGS.parent.parent  # holds configs/, as the repository does
    if file is not None:
        said = f"ACCELERATE_DEEPSPEED_CONFIG_FILE={file}"
        path = Path(file)
        if not path.is_absolute() and not path.exists():  # accelerate configs name configs/deepspeed/*.json
            path = package / file
        if not path.is_file():
            raise RecipeError(f"accelerate launch set {said}: file not found (relative paths are read from the "
                              f"current folder, then from {package})")
    else:
        keys = [f"ACCELERATE_DEEPSPEED_{x}" for x in ("ZERO_STAGE", "OFFLOAD_OPTIMIZER_DEVICE", "OFFLOAD_PARAM_DEVICE")]
        said = ", ".join(f"{k}={env[k]}" for k in keys if k in env) or "ACCELERATE_USE_DEEPSPEED=true"
        devices = {env.get(k, "none").lower() for k in keys[1:]}
        offload = devices.pop() if len(devices) == 1 else "mixed"
        name = {("2", "none"): "zero2", ("3", "none"): "zero3", ("3", "cpu"): "zero3_offload"}.get(
            (stage or "2", offload))  # stage 2 is accelerate's default
        if name is None:
            raise RecipeError(f"accelerate launch set {said}: glmtune has configs for ZeRO-2, ZeRO-3 and ZeRO-3 "
                              f"with CPU offload of optimizer and weights; for another setup give accelerate a "
                              f"deepspeed_config_file (see configs/accelerate/zero2.yaml)")
        path = DEEPSPEED_CONFIGS / f"{name}.json"
    t = recipe.train
    if t.deepspeed is None and t.distributed == "auto":
        return path
    if t.deepspeed is not None:
        wanted = Path(t.deepspeed)
    else:
        wanted = None if t.distributed == "ddp" else DEEPSPEED_CONFIGS / f"{t.distributed}.json"
    if wanted is not None and wanted.resolve() == path.resolve():
        return path
    ours = path.resolve().parent == DEEPSPEED_CONFIGS
    engine = f"DeepSpeed {path.stem}" if ours else f"DeepSpeed with {path}"
    asked = f"train.deepspeed={t.deepspeed}" if t.deepspeed is not None else f"train.distributed={t.distributed}"
    fix = (f"configs/accelerate/{t.distributed}.yaml" if t.deepspeed is None
           else f"an accelerate config whose deepspeed_config_file is {t.deepspeed}")
    raise RecipeError(f"{asked}, but the launcher runs {engine} (accelerate launch set {said}); one job runs one "
                      f"engine: leave train.distributed=auto and train.deepspeed unset to take the launcher's, or "
                      f"launch with {fix}")


def deepspeed_config(recipe: Recipe) -> dict | None:
    """The DeepSpeed config of the recipe with its "auto" values filled from the recipe; None for DDP. With
    train.distributed=auto, the config `accelerate launch` announced (launcher_deepspeed), if any."""
    t = recipe.train
    announced = launcher_deepspeed(recipe)
    if announced is None and t.deepspeed is None and t.distributed in ("auto", "ddp"):
        return None
    path = announced or (Path(t.deepspeed) if t.deepspeed else DEEPSPEED_CONFIGS / f"{t.distributed}.json")
    cfg = json.loads(path.read_text())
    fills = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
             "gradient_clipping": t.max_grad_norm}
    for key, value in fills.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    for key, enabled in (("bf16", t.mixed_precision == "bf16"), ("fp16", t.mixed_precision == "fp16")):
        if cfg.get(key, {}).get("enabled") == "auto":
            cfg[key]["enabled"] = enabled
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the process count
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_accelerator(recipe: Recipe, load_universal: bool = False):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

    # accelerate keeps one state per process and refuses another precision once it is set; train() may run
    # again in the same process (a notebook, the tests) with another recipe. The process group (PartialState)
    # stays as it is.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    ds = deepspeed_config(recipe)
    if ds is not None and load_universal:  # resuming a ZeRO checkpoint under a new process count
        ds["checkpoint"] = {"load_universal": True}
    if ds is not None and "RANK" not in os.environ:
        # a plain `glmtune train` (no launcher) under DeepSpeed, e.g. ZeRO-offload on one GPU: a one-process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    if ds is not None:  # DeepSpeed picks its own accelerator; CPU processes talk over gloo
        handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
        return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds), kwargs_handlers=handlers,
                           mixed_precision=recipe.train.mixed_precision,
                           gradient_accumulation_steps=recipe.train.grad_accum)
    # Without a GPU, accelerate only treats a torchrun/accelerate-launched job as multi-process (DDP over
    # gloo) when told `cpu=True`; otherwise every process would silently train alone.
    cpu = not torch.cuda.is_available()
    # a text-only micro-batch leaves the vision tower's trainable parameters without gradients
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    return Accelerator(cpu=cpu, mixed_precision=recipe.train.mixed_precision, kwargs_handlers=handlers,
                       gradient_accumulation_steps=recipe.train.grad_accum)


def all_gather(obj) -> list:
    """Every process's `obj`, in rank order ([obj] in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum across processes (a no-op in one process). torch.distributed directly: accelerate's `reduce`
    leaves CPU (gloo) tensors unreduced."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def unwrap(accelerator, model):
    """accelerator.unwrap_model(model), without the import of DeepSpeed (seconds) that it does whenever
    DeepSpeed is installed: in one process without DeepSpeed, accelerate does not wrap the model."""
    if accelerator.num_processes == 1 and not uses_deepspeed(accelerator):
        return model
    return accelerator.unwrap_model(model)


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_resume_dir(ckpt: Path, accelerator, saved_world: int) -> Path:
    """The DeepSpeed state to resume from. ZeRO partitions the optimizer state by process, so after a change of
    process count DeepSpeed needs its "universal" form (one file per parameter); the main process converts the
    checkpoint at every such resume, with DeepSpeed's own converter, into CKPT/deepspeed_universal: rebuilt from
    the deepspeed/ files that the manifest verified, never reused (DeepSpeed unpickles what it loads)."""
    if saved_world == accelerator.num_processes:
        return ckpt / "deepspeed"
    universal = ckpt / "deepspeed_universal"
    if accelerator.is_main_process:
        import argparse
        import contextlib
        import io
        import shutil

        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        tmp = universal.with_name(universal.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(ckpt / "deepspeed" / "state"), output_folder=str(tmp / "state"),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # glmtune saves no Megatron-style layout info
        with contextlib.redirect_stdout(io.StringIO()):
            to_universal(args)
        shutil.rmtree(universal, ignore_errors=True)
        os.replace(tmp, universal)
    accelerator.wait_for_everyone()
    return universal


def run_vision_on_every_batch(model, family, zero_stage: int) -> bool:
    """Make a text-only batch run the vision tower too (on one blank image, adding exactly 0 to the token
    embeddings), right where an image batch runs it: after the word embeddings. DeepSpeed needs every process
    to run the same modules in the same order: ZeRO-3 gathers each module's weights collectively in forward
    and backward, and ZeRO-2 reduces the gradients of trainable tower weights in buckets, so a process with a
    text-only batch beside one with images would wait forever (a known failure of other tools).
    Needed under ZeRO-3, and under ZeRO-2 when the tower has trainable weights; returns whether it applies."""
    if not family.has("vision"):  # text-only families have no tower
        return False
    blank = family.blank_image_features
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tower = base.get_submodule(family.components["vision"][0])
    if zero_stage < 3 and not any(p.requires_grad for p in tower.parameters()):
        return False
    has_images = [True]

    def note_images(module, args, kwargs):
        has_images[0] = any(kwargs.get(k) is not None for k in IMAGE_KEYS)

    def add_blank_image(module, args, output):
        if not has_images[0]:
            return output + blank(base).sum().to(output.dtype) * 0

    # The blank image's features join the embeddings at the module where image features are written in, so
    # that forward and backward visit the modules in the same order as for an image batch (ZeRO-3 checks).
    model.register_forward_pre_hook(note_images, with_kwargs=True)  # the outermost module: PEFT calls the
    base.get_submodule(family.token_embedding).register_forward_hook(add_blank_image)  # base's forward() directly
    return True


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_per_rank(model, optimizer, peak_after_setup: int) -> list[dict]:
    """What each process holds for training, gathered from all ranks (a collective): bytes of its parameters
    (under ZeRO-3 its partition), of its optimizer state (Adam moments, plus DeepSpeed's fp32 master copy of
    its partition), its peak resident memory once the model was loaded and prepared, and at the end. It
    measures the partitioning instead of assuming it."""
    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    held = [getattr(p, "ds_tensor", p) for p in model.parameters()]  # ZeRO-3: this rank's partition
    params = sum(nbytes(t) for t in held)
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch's AdamW
        inner = inner.optimizer
    moments = sum(nbytes(t) for s in inner.state.values() for t in s.values() if torch.is_tensor(t))
    # the tensors AdamW steps, if they are not the weights themselves: DeepSpeed's fp32 master partitions (ZeRO-3
    # swaps them into param_groups only during its step; the state is keyed by them)
    weights = {t.untyped_storage().data_ptr() for t in held}
    stepped = {id(p): p for p in [*inner.state, *(p for g in inner.param_groups for p in g["params"])]}
    masters = sum(nbytes(p) for p in stepped.values() if p.untyped_storage().data_ptr() not in weights)
    mine = {"param_bytes": params, "optimizer_bytes": moments + masters,
            "peak_rss_after_setup_bytes": peak_after_setup, "peak_rss_bytes": peak_rss_bytes()}
    return [dict(rank=r, **m) for r, m in enumerate(all_gather(mine))]


def gathered_trainable_state(model, main: bool) -> dict | None:
    """Under ZeRO-3: the trainable weights, gathered from their partitions (a collective), as a copy keyed like
    model.state_dict() on the main process (None elsewhere). Only what a checkpoint saves: gathering the whole
    model (accelerate's get_state_dict) would put the frozen base in one process's memory at every save."""
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone() for n, p in named} if main else None
