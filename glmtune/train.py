"""The one training loop: setup() -> train() under accelerate.

The loss is normalised by the number of target tokens in the whole optimizer step (all micro-batches
of the gradient accumulation window, all processes), so the update does not depend on how a global
batch is split into micro-batches or ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from glmtune.adapters import attach
from glmtune.checkpoint import (
    check_adapter_fits,
    disk_full_is_clear,
    find_resume,
    load_resume_state,
    save_checkpoint,
    saved_world_size,
)
from glmtune.config import CheckpointError, NonFiniteError, Recipe, RecipeError, to_dict
from glmtune.data.sample import SampleError
from glmtune.data.stream import StreamSpec, check_start, make_loader, shutdown_workers, start_worker_server
from glmtune.distributed import (
    all_gather,
    all_reduce_sum,
    deepspeed_resume_dir,
    gathered_trainable_state,
    make_accelerator,
    memory_per_rank,
    peak_rss_bytes,
    run_vision_on_every_batch,
    unwrap,
    uses_deepspeed,
)
from glmtune.models import get_family

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DataStats:
    """What the data stream did, for the progress bar and summary.json."""
    samples: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped: list = field(default_factory=list)  # [source, reason]

    def totals(self, prior: dict) -> dict:
        """This job's counters over all processes, plus those of the run it resumed (`prior`)."""
        samples, tokens, truncated = all_reduce_sum([self.samples, self.tokens, self.truncated])
        skipped = all_gather(self.skipped)
        return {"samples": prior["samples"] + int(samples), "tokens": prior["tokens"] + int(tokens),
                "truncated": prior["truncated"] + int(truncated),
                "skipped": list(prior["skipped"]) + [s for rank in skipped for s in rank]}

    def add(self, item: dict):
        if item["error"]:
            raise SampleError(*item["error"])
        self.samples += item["samples"]
        self.tokens += item["tokens"]
        self.truncated += item["truncated"]
        self.skipped.extend([list(s) for s in item["skipped"]])


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is a target in some row of the batch: the only positions whose
    logits the loss reads (prompts and image tokens are most of a VLM sequence)."""
    return (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()


def token_loss_sum(model, batch: dict, keep_logits: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross entropy over target tokens, and their count.

    With `keep_logits` (models whose forward takes transformers' tensor `logits_to_keep`), the LM head runs
    only at target positions: the same loss, without the (batch, length, vocab) logits of every prompt token.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if keep_logits:
        positions = target_positions(labels)
        logits = model(**inputs, logits_to_keep=positions).logits  # (B, len(positions), V)
        targets = labels[:, positions + 1].to(logits.device)
    else:
        logits = model(**inputs).logits[:, :-1]
        targets = labels[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def takes_logits_to_keep(model) -> bool:
    """Whether the (unwrapped, PEFT-free) model's forward accepts `logits_to_keep` (transformers 5 models)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def lr_schedule(name: str, warmup: int, total: int):
    """LR factor per step, as transformers' get_scheduler computes it (cosine with half a cycle; "constant"
    ignores warmup there too); ours so that training does not import transformers.optimization (seconds)."""
    def factor(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        if name == "linear":
            return max(0.0, float(total - step) / float(max(1, total - warmup)))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


def make_scheduler(optimizer, name: str, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(name, warmup, total))


def stream_spec(recipe: Recipe, files: list[str], rank: int, world: int, train: bool) -> StreamSpec:
    d = recipe.data
    return StreamSpec(files=files, format=d.format, image_dir=d.image_dir, max_length=d.max_length,
                      on_bad_sample=d.on_bad_sample, max_image_pixels=d.max_image_pixels,
                      packing=d.packing, batch_tokens=d.batch_tokens,
                      batch_size=recipe.train.batch_size, shuffle_buffer=d.shuffle_buffer if train else 0,
                      seed=recipe.train.seed, rank=rank, world_size=world, epochs=None if train else 1,
                      max_records=None if train else d.max_eval_samples)


@torch.no_grad()
def eval_loss(model, processor, spec: StreamSpec, fallback: dict | None = None) -> dict:
    """Token-weighted mean loss over one pass of `spec`'s data (its first `max_records` records): the same
    records, hence the same value, under any number of processes.

    Every process runs the same number of forward passes (one with nothing left to read repeats its last
    batch and discards it): ZeRO-3 gathers weights collectively in every forward, so a rank with one batch
    more than the others would wait forever. `fallback` (check_start's batch) is that batch before any was read.
    """
    was_training = model.training
    model.eval()
    total, count, stats, last = 0.0, 0, DataStats(), None
    batches = iter(make_loader(spec, processor))
    while True:
        item = next(batches, None)
        if item is not None:
            stats.add(item)
        if all_reduce_sum([float(item is not None)])[0] == 0:
            break
        if item is None or item["batch"] is None:
            if last is None:  # nothing read yet (fewer records than processes): borrow the data's first good one
                last = _to(fallback if fallback is not None else check_start(spec, processor, 1000, 1.0), model)
            token_loss_sum(model, last)  # keeps this rank in step; result discarded
            continue
        last = _to(item["batch"], model)
        loss, n = token_loss_sum(model, last)
        total, count = total + loss.item(), count + n
    total, count, samples, skipped = all_reduce_sum([total, count, stats.samples, len(stats.skipped)])
    model.train(was_training)
    return {"loss": total / max(count, 1), "tokens": int(count), "samples": int(samples), "skipped": int(skipped)}


def _to(batch: dict, model) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def setup(recipe: Recipe, processor=None):
    """Everything the loop needs, resumed from a checkpoint when one applies."""
    from accelerate.utils import set_seed

    resume_from = find_resume(recipe)
    saved_world = saved_world_size(resume_from) if resume_from is not None else None
    world = int(os.environ.get("WORLD_SIZE", 1))
    accelerator = make_accelerator(recipe, load_universal=saved_world not in (None, world))
    if recipe.adapter.method == "qlora" and uses_deepspeed(accelerator) and \
            accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise RecipeError("adapter.method=qlora under DeepSpeed ZeRO-3: the 4-bit base weights cannot be partitioned "
                          "(DeepSpeed fails on them once they are large); use train.distributed=zero2 or ddp, the "
                          "4-bit base is what makes the model fit")
    if resume_from is not None and (resume_from / "deepspeed").is_dir() != uses_deepspeed(accelerator):
        written = "under DeepSpeed" if (resume_from / "deepspeed").is_dir() else "without DeepSpeed"
        engine = (f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}" if uses_deepspeed(accelerator)
                  else "DDP / one process")
        raise CheckpointError(f"{resume_from} was written {written}, so its optimizer state does not fit this run "
                              f"({engine}); resume it with the engine it was written with, or start a new "
                              f"train.output_dir")
    set_seed(recipe.train.seed)
    family = get_family(recipe.model.family)
    processor = processor or family.load_processor(recipe.model.path)  # train() passes the one it checked with
    if recipe.data.num_workers:  # the workers' fork server does its imports while the model loads
        start_worker_server(processor)
    model = family.load_model(recipe.model.path, DTYPES[recipe.model.dtype])
    if recipe.model.gradient_checkpointing:
        # transformers 5 renamed it; native models keep the classic name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()
    if recipe.data.packing and family.provides("enable_packing"):
        family.enable_packing(model)  # attention that keeps packed samples apart
    model = attach(model, family, recipe.adapter)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    t = recipe.train
    scheduler = make_scheduler(optimizer, t.lr_scheduler, math.ceil(t.warmup_ratio * t.max_steps), t.max_steps)
    state = {"step": 0, "records": 0, "samples": 0, "tokens": 0, "truncated": 0, "skipped": [],
             "steps_without_targets": 0}
    if resume_from is not None:  # find_resume verified its files; now: does it fit this model?
        check_adapter_fits(resume_from, recipe.model.family, recipe.model.path, model, verify=False)
        state.update(load_resume_state(resume_from, model, optimizer, scheduler, recipe.adapter.method))
    model, optimizer = accelerator.prepare(model, optimizer)
    if uses_deepspeed(accelerator):
        zero_stage = accelerator.state.deepspeed_plugin.zero_stage
        run_vision_on_every_batch(unwrap(accelerator, model), family, zero_stage)
    if resume_from is not None and uses_deepspeed(accelerator):
        model.load_checkpoint(str(deepspeed_resume_dir(resume_from, accelerator, saved_world)), tag="state",
                              load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False)
    return accelerator, family, model, processor, optimizer, scheduler, state, resume_from


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (what schedulers send before they kill) and SIGINT (Ctrl-C) ask the loop to stop: it finishes the
    current step, saves a checkpoint and returns. A second signal does what it would without glmtune (Ctrl-C
    twice stops at once). Yields the list of names of the signals received."""
    received = []
    if threading.current_thread() is not threading.main_thread():  # Python sets handlers only there
        yield received
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def on_signal(signum, frame):
        if received:
            restore()
            signal.raise_signal(signum)
            return
        received.append(signal.Signals(signum).name)
        if os.environ.get("RANK", "0") == "0":  # os.write: print() could re-enter a write the signal interrupted
            os.write(2, f"\nglmtune train: {received[0]}: finishing this step, then saving a checkpoint (send "
                        f"{received[0]} again to stop at once)\n".encode())

    for s in STOP_SIGNALS:
        signal.signal(s, on_signal)
    try:
        yield received
    finally:
        restore()


def stop_requested(received: list, world: int) -> bool:
    """Whether a stop signal reached any process: all stop after the same step, so with several processes this
    is a collective, every step."""
    if world == 1:
        return bool(received)
    return all_reduce_sum([float(bool(received))])[0] > 0


def train(recipe: Recipe) -> dict:
    """The summary of the run; {"stopped_by", "steps", "checkpoint", ...} if a signal stopped it early."""
    with stop_signals() as received, contextlib.ExitStack() as cleanup:
        return _train(recipe, received, cleanup)


def _train(recipe: Recipe, received: list, cleanup: contextlib.ExitStack) -> dict:
    from tqdm.auto import tqdm

    from glmtune.logging import MetricsLogger, write_summary

    # Empty, all-bad or mostly bad data stops here, before the model loads (one line naming the file); the first
    # good records are the weightless passes of a rank whose own micro-batch is all bad.
    d, probe = recipe.data, get_family(recipe.model.family).load_processor(recipe.model.path)
    fallback = check_start(stream_spec(recipe, [d.train], 0, 1, True), probe, d.check_first, d.max_bad_fraction)
    val_fallback = d.val and check_start(stream_spec(recipe, [d.val], 0, 1, False), probe, d.check_first,
                                         d.max_bad_fraction)
    accelerator, family, model, processor, optimizer, scheduler, state, resume_from = setup(recipe, probe)
    peak_after_setup = peak_rss_bytes()
    t, out = recipe.train, Path(recipe.train.output_dir)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    deepspeed = uses_deepspeed(accelerator)
    zero3 = deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
    spec = stream_spec(recipe, [recipe.data.train], rank, world, train=True)
    val_spec = stream_spec(recipe, [recipe.data.val], rank, world, train=False) if recipe.data.val else None
    loader = make_loader(spec, processor, start_record=state["records"], num_workers=recipe.data.num_workers)
    batches = iter(loader)
    cleanup.callback(shutdown_workers, batches)  # also on errors: a traceback would keep the workers alive
    # this process's counters; checkpoints and the summary hold the totals over processes and resumed runs
    stats, prior = DataStats(), {k: state[k] for k in ("samples", "tokens", "truncated", "skipped")}
    logger = MetricsLogger(out, recipe.log.report_to, recipe.log.run_name or out.name, to_dict(recipe), enabled=main,
                           start_step=state["step"])
    # In a log file (no TTY) redraw rarely, so the bar does not flood it.
    bar = tqdm(total=t.max_steps, initial=state["step"], disable=not (main and recipe.log.progress_bar),
               desc="train", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    started, last_eval, history = time.time(), None, []
    if deepspeed and t.on_nonfinite == "skip_step":  # e.g. a DeepSpeed launcher under train.distributed=auto
        raise RecipeError("train.on_nonfinite=skip_step: DeepSpeed applies the update inside backward, before the "
                          "loss is known, so it cannot be dropped; use train.on_nonfinite=error under DeepSpeed")
    nonfinite_steps = list(state.get("nonfinite_steps", []))  # skipped updates (skip_step), resumed runs' too
    last_checkpoint = resume_from

    def checkpoint(name: str, keep):
        nonlocal last_checkpoint
        totals = stats.totals(prior)  # a collective: every process takes part
        tmp = out / f"{name}.tmp"
        if main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        if deepspeed:  # ZeRO partitions the optimizer: every rank writes its part (frozen base left out)
            with disk_full_is_clear(out / name):
                model.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
            accelerator.wait_for_everyone()
        # ZeRO-3 partitions the weights too: gather them (a collective) for the adapter / full-weight files
        full_state = gathered_trainable_state(unwrap(accelerator, model), main) if zero3 else None
        if main:
            position = {"step": step, "records": state["records"], "world_size": world,
                        "steps_without_targets": state["steps_without_targets"],
                        "nonfinite_steps": nonfinite_steps}
            save_checkpoint(out / name, unwrap(accelerator, model), None if deepspeed else optimizer,
                            scheduler, recipe, {**position, **totals}, keep, state_dict=full_state)
        accelerator.wait_for_everyone()
        last_checkpoint = out / name

    step, last_good = state["step"], None
    device = accelerator.device
    fallback = {k: v.to(device) for k, v in fallback.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]  # walked once, not in every step
    keep_logits = takes_logits_to_keep(unwrap(accelerator, model))
    while step < t.max_steps:
        tic = time.time()
        # Dropout draws from a generator seeded by (seed, step, rank): a resumed run draws exactly what the
        # uninterrupted one did, whatever else consumed randomness before (loaders, evals), with no saved state.
        torch.manual_seed(t.seed + 1_000_003 * (step + 1) + 7_919 * rank)
        micro = []  # (batch, weight): every rank runs grad_accum backward passes, or DDP would wait forever
        n_local = tokens_local = 0  # counted on the host copy: no device sync
        data_wait = 0.0  # seconds this step waited for its batches (should be ~0: the workers keep ahead)
        for _ in range(t.grad_accum):
            waited = time.perf_counter()
            item = next(batches)
            data_wait += time.perf_counter() - waited
            stats.add(item)
            state["records"] = item["position"]
            if item["batch"] is not None:
                n_local += int((item["batch"]["labels"][:, 1:] != -100).sum())
                tokens_local += item["tokens"]
                last_good = {k: v.to(device, non_blocking=True) for k, v in item["batch"].items()}
                micro.append((last_good, 1.0))
            else:  # every record of this batch was bad: a weightless pass keeps ranks in step
                micro.append((last_good if last_good is not None else fallback, 0.0))
        n_total = int(all_reduce_sum([n_local])[0]) if world > 1 else n_local
        if n_total == 0:  # no target token on any process: nothing to learn, so not a training step; read on
            state["steps_without_targets"] += 1
            continue
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        for b, weight in micro:
            # accelerate synchronises gradients (DDP) and steps DeepSpeed only on the last micro-batch of a step
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss_sum, _ = token_loss_sum(model, b, keep_logits)
                # DDP and DeepSpeed average gradients over ranks and divide the loss by grad_accum; undo both,
                # since the loss is already normalised by the target tokens of the whole global step
                accelerator.backward(loss_sum * (weight * world * t.grad_accum / max(n_total, 1)))
            loss_total += weight * loss_sum.detach()
        if deepspeed:  # DeepSpeed clips by its config (gradient_clipping) inside its step, run by backward
            grad_norm = model.get_global_grad_norm()
        else:  # max_grad_norm 0: the norm is still measured (an infinite bound never clips) for the check below
            grad_norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm or math.inf)
        # the one host sync of a step (and, with several processes, the one collective): whether to apply it
        loss_total = all_reduce_sum([loss_total.item()])[0] if world > 1 else loss_total.item()
        loss = loss_total / max(n_total, 1)
        # the same decision on every rank: the loss is summed over ranks, the gradient norm is global. Under fp16
        # loss scaling (GPU) an inf gradient is the scaler's signal: it skips that step and lowers its scale itself.
        grad_norm = None if grad_norm is None else float(grad_norm)
        scaled = accelerator.scaler is not None or (deepspeed and t.mixed_precision == "fp16")
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm) or scaled)
        if not finite and t.on_nonfinite == "error":
            raise NonFiniteError(
                f"step {step + 1}: non-finite loss {loss} / gradient norm {grad_norm}: stopped before anything of "
                f"this step was saved; the last good checkpoint is "
                f"{last_checkpoint or 'none (none was written yet)'}; lower train.lr, check the data, or set "
                f"train.on_nonfinite=skip_step to drop such updates")
        if finite:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if not finite:  # skip_step: the update is dropped, the step (its data, its lr) counts
            nonfinite_steps.append(step)
            if main:
                print(f"glmtune train: step {step}: non-finite loss {loss} / gradient norm {grad_norm}: update "
                      f"dropped (train.on_nonfinite=skip_step)", file=sys.stderr, flush=True)
        else:
            history.append(loss)
        if step % recipe.log.log_every == 0 or step == t.max_steps:
            tokens_per_s = tokens_local * world / max(time.time() - tic, 1e-9)
            metrics = {"loss": loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s,
                       "target_tokens": n_total, "data_wait_s": data_wait, "skipped": len(stats.skipped)}
            if nonfinite_steps:
                metrics["dropped_updates"] = len(nonfinite_steps)
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            logger.log(step, metrics)
            # refresh=False: the bar redraws on its own clock (mininterval), not on every logged step
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", skipped=len(stats.skipped),
                            refresh=False)
        bar.update(1)
        if recipe.data.val and t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            last_eval = eval_loss(model, processor, val_spec, val_fallback)
            logger.log(step, {"loss": last_eval["loss"]}, split="eval")
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            checkpoint(f"checkpoint-{step}", t.keep_last)
        if step < t.max_steps and stop_requested(received, world):
            if not (t.save_every and step % t.save_every == 0):
                checkpoint(f"checkpoint-{step}", t.keep_last)
            bar.close()
            logger.close()
            return {"stopped_by": received[0] if received else "another process's signal", "steps": step,
                    "max_steps": t.max_steps, "checkpoint": str(out / f"checkpoint-{step}"), "output_dir": str(out)}
    bar.close()
    if recipe.data.val:
        last_eval = eval_loss(model, processor, val_spec, val_fallback)
        logger.log(step, {"loss": last_eval["loss"]}, split="eval")
    checkpoint("checkpoint-final", None)
    memory = memory_per_rank(model, optimizer, peak_after_setup)
    logger.close()
    totals = stats.totals(prior)
    summary = {
        "steps": step, "resumed_from": str(resume_from) if resume_from else None,
        "final_train_loss": history[-1] if history else None,
        "first_train_loss": history[0] if history else None,
        "eval": last_eval, "samples_seen": totals["samples"], "tokens_seen": totals["tokens"],
        "truncated_samples": totals["truncated"], "skipped_samples": len(totals["skipped"]),
        "steps_without_targets": state["steps_without_targets"],
        "nonfinite_skipped_steps": len(nonfinite_steps), "nonfinite_steps": nonfinite_steps,
        "skipped": [{"source": s, "reason": r} for s, r in totals["skipped"][:1000]],
        "wall_time_s": round(time.time() - started, 2), "memory_per_rank": memory,
        "checkpoint": str(out / "checkpoint-final"), "output_dir": str(out),
    }
    if main:
        write_summary(out, summary)
    return summary
