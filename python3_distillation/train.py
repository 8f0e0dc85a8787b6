"""The one training loop: teacher training and distillation differ only in the loss function given.

    python -m python3_distillation teacher train.max_steps=100     # uses this loop
    accelerate launch -m python3_distillation distill --config v2   # same loop, several GPUs

Built on Hugging Face ``accelerate`` (device placement, bf16/fp16 autocast on CPU and CUDA,
gradient accumulation, ``save_state``/``load_state``, multi-process launch). Checkpoints every
``save_every`` steps are written to a temp folder and renamed, so a kill never leaves a half
checkpoint; ``resume=True`` continues from the newest one and reaches the same weights as an
uninterrupted run (data order is a pure function of the step, RNG state is restored).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from python3_distillation.config import CONFIG_FILE, RunConfig, TrainConfig
from python3_distillation.data import Blocks, batch_indices

log = logging.getLogger(__name__)

# loss_fn(model, batch) → (loss to minimise, {name: value} to log). batch = {"input_ids",
# "attention_mask", "labels"} on the right device, inside autocast.
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
STATE_FILE = "trainer_state.json"


@dataclass
class TrainResult:
    step: int
    tokens: int
    seconds: float
    val_loss: float | None = None
    val_ppl: float | None = None
    history: list[dict] = field(default_factory=list)


class StopTraining(Exception):
    """Raised by a step callback to stop (used by tests to simulate a kill)."""


def lm_loss_fn(model, batch) -> tuple[torch.Tensor, dict]:
    """Plain causal-LM training (the teacher stage)."""
    from python3_distillation.losses import lm_loss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = lm_loss(logits, batch["labels"])
    return loss, {"ce": loss.detach()}


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine to ``min_lr_ratio`` at ``max_steps``."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Decay matrices only (GPT-2/nanoGPT convention): biases and LayerNorm gains keep their scale.
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    try:  # fused AdamW is ~3× faster than the for-each one on CPU (torch ≥ 2.4) and on CUDA
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def make_batch(blocks: Blocks, idx: torch.Tensor, device) -> dict:
    ids = blocks.ids[idx].to(device, non_blocking=True)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@torch.no_grad()
def evaluate_loss(model, blocks: Blocks, batch_size: int, max_blocks: int, accelerator=None, device=None) -> float:
    """Mean next-token cross-entropy (nats/token) over the first ``max_blocks`` validation blocks."""
    from python3_distillation.losses import lm_loss

    was_training = model.training
    model.eval()
    n = len(blocks) if not max_blocks else min(max_blocks, len(blocks))
    device = device or (accelerator.device if accelerator else next(model.parameters()).device)
    total, count = 0.0, 0
    ctx = accelerator.autocast() if accelerator else torch.autocast(device_type=torch.device(device).type, enabled=False)
    with ctx:
        for start in range(0, n, batch_size):
            batch = make_batch(blocks, torch.arange(start, min(n, start + batch_size)), device)
            logits = model(input_ids=batch["input_ids"]).logits
            tokens = batch["labels"][:, 1:].numel()
            total += lm_loss(logits, batch["labels"]).item() * tokens
            count += tokens
    model.train(was_training)
    return total / max(1, count)


def _checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = _checkpoints(Path(run_dir))
    return found[-1] if found else None


def _write_jsonl(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop rows logged past the checkpoint so the log reads as one run."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


def train(model: torch.nn.Module, loss_fn: LossFn, blocks: dict[str, Blocks], cfg: RunConfig,
          resume: bool = False, extra_modules: list[torch.nn.Module] = (),
          on_step: Callable[[int], None] | None = None) -> tuple[torch.nn.Module, TrainResult]:
    """Train ``model`` with ``loss_fn`` for ``cfg.train.max_steps``; returns the unwrapped model.

    ``extra_modules`` (the teacher) are moved to the device but never optimised or saved.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tc = cfg.train
    run_dir = cfg.run_dir
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                              cpu=tc.cpu)
    set_seed(tc.seed)
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
    for m in extra_modules:
        m.to(accelerator.device)

    optimizer = make_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
    # once per process), and registered so save_state/load_state still carry it.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    step, tokens, elapsed = 0, 0, 0.0
    metrics_path = run_dir / "metrics.jsonl"
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / STATE_FILE).read_text())
        step, tokens, elapsed = state["step"], state["tokens"], state["seconds"]
        if main:
            _truncate_metrics(metrics_path, step)
        accelerator.print(f"resumed from {ckpt} at step {step}")
    elif main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    if step >= tc.max_steps:
        accelerator.print(f"{run_dir}: already trained to step {step} (train.max_steps={tc.max_steps})")

    train_blocks, val_blocks = blocks["train"], blocks["validation"]
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = tc.batch_size * world
    result = TrainResult(step=step, tokens=tokens, seconds=elapsed)

    def run_eval(at_step: int) -> None:
        loss = evaluate_loss(model, val_blocks, tc.batch_size, cfg.data.max_eval_blocks, accelerator)
        loss = accelerator.reduce(torch.tensor(loss, device=accelerator.device), reduction="mean").item()
        result.val_loss, result.val_ppl = loss, math.exp(min(loss, 50.0))
        row = {"step": at_step, "val_loss": round(loss, 5), "val_ppl": round(result.val_ppl, 3)}
        result.history.append(row)
        if main:
            _write_jsonl(metrics_path, row)
        bar.write(f"step {at_step}: validation loss {loss:.4f}, perplexity {result.val_ppl:.2f}")

    def save_checkpoint(at_step: int) -> None:
        target = run_dir / f"checkpoint-{at_step}"
        tmp = run_dir / f".tmp-checkpoint-{at_step}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if main:
            (tmp / STATE_FILE).write_text(json.dumps({"step": at_step, "tokens": tokens, "seconds": elapsed}))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)  # atomic: a checkpoint folder either is complete or does not exist
            for old in _checkpoints(run_dir)[:-tc.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    model.train()
    bar = tqdm(total=tc.max_steps, initial=step, desc=cfg.name, disable=not main, dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    try:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            logged: dict[str, float] = {}
            for micro in range(tc.grad_accum):
                idx = batch_indices(len(train_blocks), global_batch, step * tc.grad_accum + micro, tc.seed)
                idx = idx[rank * tc.batch_size:(rank + 1) * tc.batch_size]
                batch = make_batch(train_blocks, idx, accelerator.device)
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
                    logged[k] = logged.get(k, 0.0) + float(v) / tc.grad_accum
                n_tok = batch["input_ids"].numel() * world
                tokens += n_tok
                window_tokens += n_tok
            step += 1
            elapsed += time.perf_counter() - t0
            if on_step is not None:
                on_step(step)
            if step % tc.log_every == 0 or step == tc.max_steps:
                now = time.perf_counter()
                tps = window_tokens / max(1e-9, now - window_start)
                window_tokens, window_start = 0, now
                row = {"step": step, **{k: round(v, 5) for k, v in logged.items()},
                       "lr": scheduler.get_last_lr()[0], "tokens": tokens, "tok_per_s": round(tps, 1),
                       "seconds": round(elapsed, 2)}
                result.history.append(row)
                if main:
                    _write_jsonl(metrics_path, row)
                bar.set_postfix(loss=f"{logged['loss']:.3f}", tok_s=f"{tps:,.0f}")
            bar.update(1)
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                run_eval(step)
            if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
                save_checkpoint(step)
        run_eval(step)
        save_checkpoint(step)
    finally:
        bar.close()
    result.step, result.tokens, result.seconds = step, tokens, elapsed
    return accelerator.unwrap_model(model), result
