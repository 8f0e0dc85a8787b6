"""The one training loop: teacher training and distillation differ only in the loss function given.

    python -m python3_distillation teacher train.max_steps=100     # uses this loop
    accelerate launch --multi_gpu --num_processes 8 -m python3_distillation distill --config v2   # 8 processes

Built on ``accelerate`` (devices, autocast, gradient accumulation, multi-process launch). Under DDP each
process reads its slice of the global batch and only the main one writes. Checkpoints and resume are
explained in README.md, "Precision, resume and reproducibility".
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from python3_distillation import checkpoint as ckpt_io
from python3_distillation.config import CONFIG_FILE, ConfigError, RunConfig, TrainConfig
from python3_distillation.data import Blocks, batch_indices
from python3_distillation.device_plan import Precision, compile_blocks, decide_for_run, pick_device, plan as device_plan
from python3_distillation.errors import DiskFullError
from python3_distillation.fsio import atomic_write_text, reporting_disk_full
from python3_distillation.lineage import differences, stage_fingerprint
from python3_distillation.losses import lm_loss
from python3_distillation.resumable import WorkFolder, append_jsonl, jsonl_rows

log = logging.getLogger(__name__)

# loss_fn(model, batch) → (loss, {name: value} to log); batch: "input_ids", "attention_mask", "labels" on
# the device, plus "block_index" (CPU LongTensor) for losses that look rows up by block (teacher_cache.py).
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    step: int
    tokens: int
    seconds: float
    val_loss: float | None = None
    val_ppl: float | None = None
    history: list[dict] = field(default_factory=list)
    main: bool = True  # False but in a launch's main process: only it saves the model and prints
    precision: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)


def lm_loss_fn(model, batch) -> tuple[torch.Tensor, dict]:
    """Plain causal-LM training (the teacher stage)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = lm_loss(logits, batch["labels"])
    return loss, {"ce": loss.detach()}


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine to ``min_lr_ratio`` at ``max_steps``."""
    # Not transformers' cosine-with-min-lr schedule: its warmup is step/warmup, 0.02 lower per step in configs/.

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Decay matrices only (GPT-2/nanoGPT convention): biases and LayerNorm gains keep their scale.
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    try:  # fused AdamW is ~3× faster than the for-each one on CPU (torch ≥ 2.4) and on CUDA
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def make_batch(blocks: Blocks, idx: torch.Tensor, device, pin: bool = False) -> dict:
    """The rows ``idx`` of ``blocks`` on ``device``; ``pin`` (CUDA): via pinned host memory, the only kind
    from which ``non_blocking=True`` is an asynchronous copy."""
    ids = blocks.ids[idx]
    ids = ids.pin_memory().to(device, non_blocking=True) if pin else ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "block_index": idx}


class BatchPrefetcher:
    """Micro-batch ``k`` (rows ``indices(k)``). With ``prefetch`` (CUDA) handing out batch k also gathers
    batch k+1 into pinned memory and queues its copy, so the host never waits on a copy."""

    def __init__(self, blocks: Blocks, indices: Callable[[int], torch.Tensor], device, prefetch: bool, end: int):
        self.blocks, self.indices, self.device, self.prefetch, self.end = blocks, indices, device, prefetch, end
        self._ahead: tuple[int, dict] | None = None

    def get(self, k: int) -> dict:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == k:
            batch = ahead[1]
        else:
            batch = make_batch(self.blocks, self.indices(k), self.device, pin=self.prefetch)
        if self.prefetch and k + 1 < self.end:
            self._ahead = (k + 1, make_batch(self.blocks, self.indices(k + 1), self.device, pin=True))
        return batch


@torch.no_grad()
def evaluate_loss(model, blocks: Blocks, batch_size: int, max_blocks: int, accelerator) -> float:
    """Mean next-token cross-entropy (nats/token) over the first ``max_blocks`` validation blocks.

    Under several processes each evaluates every ``world``-th batch and the sums are added up, so
    the answer is the one-process answer (up to float rounding) in 1/world of the time.
    """
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    # The bare model: ranks run different numbers of batches, and a wrapper (DDP) must not be
    # left waiting for a collective that the other ranks never join.
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    n = len(blocks) if not max_blocks else min(max_blocks, len(blocks))
    # Summed on the device in fp64 (the arithmetic of Python floats) and read back once, not per batch.
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    with accelerator.autocast():
        for start in range(rank * batch_size, n, batch_size * world):
            batch = make_batch(blocks, torch.arange(start, min(n, start + batch_size)), device)
            logits = model(input_ids=batch["input_ids"]).logits
            tokens = batch["labels"][:, 1:].numel()
            total += lm_loss(logits, batch["labels"]).double() * tokens
            count += tokens
    model.train(was_training)
    if world > 1:
        count = torch.tensor(float(count), dtype=torch.float64, device=device)
        total, count = accelerator.reduce(torch.stack([total, count]), reduction="sum").tolist()
    return float(total) / max(1, count)


def _read_back(logged: dict[str, torch.Tensor], reduce: Callable | None = None) -> dict[str, float]:
    """The step's accumulated terms as floats, first averaged over the processes by ``reduce`` when
    given (in sorted order, the same on every rank): the one host sync of a logged step."""
    names = sorted(logged) if reduce else list(logged)
    values = torch.stack([logged[k] for k in names])  # never empty: "loss" is always logged
    return dict(zip(names, (reduce(values) if reduce else values).tolist()))


def training_log_text(run_dir: Path, up_to: float = math.inf) -> str:
    """The run's metrics log (its rows up to step ``up_to``) as saved beside the finished model."""
    return "".join(json.dumps(r) + "\n" for r in jsonl_rows(Path(run_dir) / METRICS_FILE) if r.get("step", 0) <= up_to)


def _resume_point(run_dir: Path, fingerprint: dict, world: int, max_steps: int,
                  say: Callable[[str], None] = print) -> tuple[Path | None, dict | None]:
    """The checkpoint to continue from, or (None, None) to start afresh; raises ConfigError on a changed config."""
    ckpt, state = ckpt_io.newest_valid(run_dir, warn=say)
    if ckpt is None:
        if ckpt_io.list_checkpoints(run_dir):
            say(f"{run_dir}: no checkpoint verifies; starting this stage afresh")
        return None, None
    old = state.get("fingerprint") or {}
    if changed_inputs := differences(old.get("inputs", {}), fingerprint["inputs"]):
        say(f"{run_dir}: what this stage is built from changed since {ckpt.name} "
              f"({'; '.join(changed_inputs)}); starting it afresh")
        return None, None
    if changed := differences(old.get("config", {}), fingerprint["config"]):
        raise ConfigError(f"cannot resume {run_dir}: the config differs from the run being resumed "
                          f"({'; '.join(changed)}); restore it, or run without --resume to start afresh")
    if state.get("world_size", 1) != world:
        raise ConfigError(f"cannot resume {run_dir}: it ran on {state.get('world_size', 1)} process(es), this "
                          f"launch has {world}; relaunch with the same number")
    if state["step"] > max_steps:
        raise ConfigError(f"cannot resume {run_dir}: {ckpt.name} is past train.max_steps={max_steps} "
                          "(the step budget may grow, not shrink); run without --resume to start afresh")
    return ckpt, state


def _clear_run(run_dir: Path, say: Callable[[str], None] = print) -> None:
    """A fresh start: old checkpoints and the old log go, so nothing of another run is resumed later."""
    old = ckpt_io.list_checkpoints(run_dir) + list(run_dir.glob(".checkpoint-*.partial"))
    if old:
        say(f"{run_dir}: starting afresh, removing {len(old)} old checkpoint folder(s)")
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)


def train(model: torch.nn.Module, loss_fn: LossFn, blocks: dict[str, Blocks], cfg: RunConfig, resume: bool = False,
          extra_modules: list[torch.nn.Module] = (), on_step: Callable[[int], None] | None = None,
          inputs: dict | None = None, precision: Precision | None = None,
          on_checkpoint_write: Callable[[Path], None] | None = None) -> tuple[torch.nn.Module, TrainResult]:
    """Train ``model`` with ``loss_fn`` for ``cfg.train.max_steps``; returns the unwrapped model.

    ``extra_modules`` (the teacher) go to the device, never optimised or saved; ``inputs``: hashes of
    what the stage is built from (lineage.py); ``on_checkpoint_write(temp folder)`` lets tests die mid-write.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import gather_object, set_seed

    tc, run_dir = cfg.train, cfg.run_dir
    # Without CUDA, accelerate forms a CPU process group (gloo) only when told cpu=True: a multi-process
    # launch would otherwise train N independent copies, every one of them writing the same files.
    cpu = pick_device(cpu=tc.cpu).type == "cpu"
    precision = precision or decide_for_run(tc.mixed_precision, cpu=cpu)
    # accelerate keeps one process-wide state and refuses a second Accelerator with another
    # precision; a process that runs two stages (teacher then students) resets it between them.
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision.mode:
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision.mode, gradient_accumulation_steps=tc.grad_accum, cpu=cpu)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    launched = int(os.environ.get("WORLD_SIZE", world))
    if launched != world:
        raise ConfigError(f"launched as {launched} processes, but they did not form one group (accelerate sees "
                          f"{world}): each would train alone and write the same files; launch with accelerate "
                          "launch or torchrun on the devices it expects (train.cpu=true for CPU processes)")
    fingerprint = stage_fingerprint(cfg, inputs or {})

    def say(message: str) -> None:  # one line on stderr, from the main process only
        if main:
            tqdm.write(message, file=sys.stderr)

    plan = device_plan(accelerator.device, precision, compile=tc.compile)
    plan.apply()
    for line in plan.lines(tc.log_every):
        say(f"{cfg.name}: {line}")
    if world > 1:  # accelerate's choice by device: nccl on CUDA, gloo for CPU processes
        say(f"{cfg.name}: processes: {world} over {torch.distributed.get_backend()}")

    ckpt, state = _resume_point(run_dir, fingerprint, world, tc.max_steps, say) if resume else (None, None)
    accelerator.wait_for_everyone()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            _clear_run(run_dir, say)
        atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml(precision.to_dict()))
    accelerator.wait_for_everyone()
    set_seed(tc.seed)
    for m in extra_modules:
        m.to(accelerator.device)

    step, tokens, elapsed = 0, 0, 0.0
    if ckpt is not None:
        ckpt_io.load_model_weights(accelerator.unwrap_model(model), ckpt)
    optimizer = make_optimizer(model, tc)
    if plan.compile:  # in place, before DDP wraps the model: names and checkpoints stay the eager ones
        for m in (accelerator.unwrap_model(model), *extra_modules):
            compile_blocks(m)
    model, optimizer = accelerator.prepare(model, optimizer)
    metrics_path = run_dir / METRICS_FILE
    if ckpt is not None:
        optimizer.load_state_dict(ckpt_io.load_optimizer_state(ckpt))
        if not ckpt_io.restore_rng(ckpt, rank):
            log.warning("%s: no RNG state for process %d; continuing from the seed", ckpt, rank)
        step, tokens, elapsed = state["step"], state["tokens"], state["seconds"]
        if main:
            atomic_write_text(metrics_path, training_log_text(run_dir, step))
        say(f"resumed from {ckpt} at step {step}")
    # The schedule is a function of the step: rebuilt, not stored (last_epoch = steps already taken − 1);
    # a resumed run's saved initial_lr is train.lr already (the config fingerprint includes it).
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", tc.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc), last_epoch=step - 1)
    if step >= tc.max_steps:
        say(f"{run_dir}: already trained to step {step} (train.max_steps={tc.max_steps})")

    train_blocks, val_blocks = blocks["train"], blocks["validation"]
    global_batch = tc.batch_size * world
    result = TrainResult(step=step, tokens=tokens, seconds=elapsed, precision=precision.to_dict(),
                         fingerprint=fingerprint, main=main)

    last_eval = -1

    def run_eval(at_step: int) -> None:
        loss = evaluate_loss(model, val_blocks, tc.batch_size, cfg.data.max_eval_blocks, accelerator)
        result.val_loss, result.val_ppl = loss, math.exp(min(loss, 50.0))
        nonlocal last_eval
        last_eval = at_step
        row = {"step": at_step, "val_loss": round(loss, 5), "val_ppl": round(result.val_ppl, 3)}
        result.history.append(row)
        if main:
            append_jsonl(metrics_path, [row])
            bar.write(f"step {at_step}: validation loss {loss:.4f}, perplexity {result.val_ppl:.2f}")

    def save_checkpoint(at_step: int) -> None:
        # A full disk: one line naming the checkpoint, its size and the last good one to resume from;
        # the half-written folder is removed at once (the space it took is what the user lacks).
        last = ckpt_io.list_checkpoints(run_dir)
        intact = (f"the last good checkpoint is {last[-1]} (--resume continues from it)" if last else
                  "no checkpoint of this run was written yet")
        need = sum(p.numel() * p.element_size() for p in accelerator.unwrap_model(model).parameters()) * 3
        folder = WorkFolder(run_dir / f"checkpoint-{at_step}")
        try:
            with reporting_disk_full(f"checkpoint-{at_step}", run_dir, need, intact):
                write_checkpoint(folder, at_step)
        except DiskFullError:
            folder.discard()
            raise

    def write_checkpoint(folder: WorkFolder, at_step: int) -> None:
        tmp = folder.path
        if main:
            folder.start()
        # Every process's RNG states, written by the main one: one writer per checkpoint folder (on
        # several machines a rank's own file would land on its own disk, not in the checkpoint).
        states = gather_object([(rank, *ckpt_io.capture_rng())]) if world > 1 else [(rank, *ckpt_io.capture_rng())]
        if main:
            for r, tensors, meta in states:
                ckpt_io.save_rng(tmp, r, (tensors, meta))
            ckpt_io.save_model_weights(accelerator.unwrap_model(model), tmp)
            if on_checkpoint_write is not None:
                on_checkpoint_write(tmp)
            ckpt_io.save_optimizer(optimizer, tmp)
        accelerator.wait_for_everyone()
        if main:
            val = {"step": at_step, "loss": result.val_loss} if last_eval == at_step else None
            state = {"step": at_step, "tokens": tokens, "seconds": elapsed, "world_size": world, "val": val,
                     "precision": precision.to_dict(), "fingerprint": fingerprint}
            folder.publish(ckpt_io.write_state(tmp, state))  # a checkpoint is complete or absent
            for old in ckpt_io.list_checkpoints(run_dir)[:-tc.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def rows_of(k: int) -> torch.Tensor:  # micro-batch k = step · grad_accum + micro: this process's rows
        return batch_indices(len(train_blocks), global_batch, k, tc.seed)[rank * tc.batch_size:(rank + 1) * tc.batch_size]

    batches = BatchPrefetcher(train_blocks, rows_of, accelerator.device, plan.prefetch, tc.max_steps * tc.grad_accum)
    model.train()
    bar = tqdm(total=tc.max_steps, initial=step, desc=cfg.name, disable=not main, dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    try:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            # Each term's mean over the micro-batches, on the device in fp64, read back only when logged.
            logged: dict[str, torch.Tensor] = {}
            for micro in range(tc.grad_accum):
                batch = batches.get(step * tc.grad_accum + micro)
                with accelerator.accumulate(model), accelerator.autocast():
                    loss, terms = loss_fn(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tc.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": loss.detach(), **terms}.items():
                    v = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
                    logged[k] = logged.get(k, 0.0) + v.to(accelerator.device, torch.float64) / tc.grad_accum
                n_tok = batch["input_ids"].numel() * world
                tokens += n_tok
                window_tokens += n_tok
            step += 1
            elapsed += time.perf_counter() - t0
            if on_step is not None:
                on_step(step)
            if step % tc.log_every == 0 or step == tc.max_steps:
                # Equal shares of the global batch: the mean of the processes' means is the batch's loss.
                mean = (lambda v: accelerator.reduce(v, reduction="mean")) if world > 1 else None
                logged = _read_back(logged, mean)
                now = time.perf_counter()
                tps = window_tokens / max(1e-9, now - window_start)
                window_tokens, window_start = 0, now
                row = {"step": step, **{k: round(v, 5) for k, v in logged.items()},
                       "lr": scheduler.get_last_lr()[0], "tokens": tokens, "tok_per_s": round(tps, 1),
                       "seconds": round(elapsed, 2)}
                result.history.append(row)
                if main:
                    append_jsonl(metrics_path, [row])
                bar.set_postfix(loss=f"{logged['loss']:.3f}", tok_s=f"{tps:,.0f}")
            bar.update(1)
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                run_eval(step)
            if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
                save_checkpoint(step)
        done = (state or {}).get("val") or {}
        if ckpt is not None and step == state["step"] and done.get("step") == step and done.get("loss") is not None:
            # A finished run resumed: nothing new to measure or save.
            result.val_loss, result.val_ppl = done["loss"], math.exp(min(done["loss"], 50.0))
        else:
            run_eval(step)
            save_checkpoint(step)
    finally:
        bar.close()
    result.step, result.tokens, result.seconds = step, tokens, elapsed
    return accelerator.unwrap_model(model), result
