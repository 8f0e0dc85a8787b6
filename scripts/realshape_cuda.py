"""DistilGPT2's step at its real shapes on a GPU, measured: tokens/s, MFU and peak memory, then generation.

    python scripts/realshape_cuda.py                  # on a CUDA GPU; without one: a one-line error, status 2
    python scripts/realshape_cuda.py --cpu-smoke      # the same shapes on CPU for 2 steps (the test-suite runs it)
    python scripts/realshape_cuda.py --estimate       # DistilGPT2's compute and time per GPU kind (no GPU needed)

Teacher: a GPT-2-small-shaped model (12 layers, d768, 12 heads, 1,024 positions, 124M parameters)
with random weights (no hub needed; the speed does not depend on the weights); student: its blocks
0, 2, 4, 7, 9, 11 with embeddings and final norm, as DistilGPT2 (82M); batches of 1,024-token blocks.
The step is the one ``train()`` runs with ``configs/distilgpt2.yaml``: accelerate autocast at the
precision ``auto`` picks for the device, the distillation loss with its weights (5·KL·T² + 2·CE +
1·(1 − cos), T = 2, the KL chunked), backward, gradient clipping at 5, fused AdamW at its lr.

MFU = model FLOPs of the step ÷ time ÷ the device's peak: 3× the student's forward (forward +
backward) plus the teacher's forward, each ``evaluation.measure.forward_flops_per_token`` (LM head
included) at the mean causal context; the peak is dense bf16 (fp16 where the GPU has no bf16) from
the table below by device name, else measured with a large matmul (always measured on CPU).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere without installing the package
    sys.path.insert(0, str(REPO))

EXIT_NO_DEVICE = 2
# Dense tensor-core peaks in TFLOP/s (bf16, or fp16 where the GPU has no bf16), no sparsity, from
# the vendor's data sheets; matched as a whole word of torch.cuda.get_device_name ("A10" is not
# "A100" or "A10G"), first match wins.
PEAK_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("RTX 4090", 165.2), ("A10", 125.0), ("V100", 125.0), ("T4", 65.0),
]
OPENWEBTEXT_TOKENS = 9_035_582_198  # GPT-2 tokens in OpenWebText's train split (nanoGPT's prepare.py)
ASSUMED_MFU = 0.25  # for --estimate: an eager (uncompiled) step with a 50k-token KL; measure yours
LABELS = {"H100": "H100 SXM"}  # how --estimate names a table entry
VOCAB, BLOCK = 50257, 1024


def step_flops_per_token(block: int = BLOCK) -> dict[str, float]:
    """Model FLOPs per trained token of a DistilGPT2 step: student forward ×3 (with backward) + teacher forward."""
    from python3_distillation.evaluation.measure import forward_flops_per_token

    ctx = (block + 1) / 2  # mean causal context over a block
    student = forward_flops_per_token(6, 768, VOCAB, ctx)
    teacher = forward_flops_per_token(12, 768, VOCAB, ctx)
    return {"student_forward": student, "teacher_forward": teacher, "step": 3 * student + teacher}


def estimate_table(mfu: float = ASSUMED_MFU, tokens: int = OPENWEBTEXT_TOKENS) -> str:
    """Markdown: GPU-hours for one pass of DistilGPT2 over OpenWebText, per GPU kind, at ``mfu``."""
    per_token = step_flops_per_token()["step"]
    total = per_token * tokens
    lines = [f"One pass over OpenWebText ({tokens / 1e9:.2f}B tokens) at {per_token / 1e9:.2f} GFLOP a token "
             f"= {total:.2e} FLOP; at {mfu:.0%} MFU:", "",
             "| GPU | dense peak (TFLOP/s) | GPU-hours | on 8 GPUs (h) |", "|---|---:|---:|---:|"]
    seen = set()
    for name, peak in PEAK_TFLOPS:
        if name in seen:
            continue
        seen.add(name)
        hours = total / (peak * 1e12 * mfu) / 3600
        label = LABELS.get(name, name) + (" (fp16)" if name in ("V100", "T4") else "")
        lines.append(f"| {label} | {peak:g} | {hours:,.0f} | {hours / 8:,.1f} |")
    return "\n".join(lines)


def peak_flops(device, dtype) -> tuple[float, str]:
    """The device's dense peak in FLOP/s and where the number comes from."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS:
            if re.search(rf"\b{re.escape(key)}\b", name):
                return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense (data sheet)"
        label = f"{name}: not in the table, measured"
    else:
        label = "CPU: measured"
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: picks the kernel
    times = []
    for _ in range(5 if device.type == "cuda" else 3):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3 / min(times)
    return flops, f"{label} {n}² {str(dtype).removeprefix('torch.')} matmul: {flops / 1e9:,.0f} GFLOP/s"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run(cpu_smoke: bool, steps: int, batch_size: int, new_tokens: int) -> None:
    import torch
    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel

    from python3_distillation.config import load_config
    from python3_distillation.distill import make_distill_loss
    from python3_distillation.models import build_student, count_parameters, seeded
    from python3_distillation.device_plan import decide
    from python3_distillation.train import make_optimizer

    cfg = load_config(["distilgpt2"])
    device = torch.device("cpu" if cpu_smoke else "cuda")
    precision = decide(cfg.train.mixed_precision, device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; {precision.line()}")
    with seeded(0):
        teacher = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=BLOCK, vocab_size=VOCAB,
                                             bos_token_id=50256, eos_token_id=50256)).eval()
    student, info = build_student(teacher, cfg.student.n_layer, "teacher", cfg.student.layers, seed=0)
    print(f"teacher {count_parameters(teacher) / 1e6:.1f}M parameters, student {count_parameters(student) / 1e6:.1f}M "
          f"(blocks {info['layers']}), batch {batch_size}×{cfg.data.block_size} tokens")

    acc = Accelerator(mixed_precision=precision.mode, cpu=cpu_smoke)
    teacher.to(acc.device)
    model, optimizer = acc.prepare(student.train(), make_optimizer(student, cfg.train))
    loss_fn = make_distill_loss(teacher, cfg.distill)
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (batch_size, cfg.data.block_size), generator=g).to(acc.device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        _sync(device)
        t0 = time.perf_counter()
        with acc.autocast():
            loss, terms = loss_fn(model, batch)
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        print(f"step {step + 1}/{steps}: {times[-1]:.2f} s, loss {losses[-1]:.3f} "
              f"({', '.join(f'{k} {float(v):.3f}' for k, v in terms.items())})", flush=True)
    if not all(torch.isfinite(torch.tensor(losses))):
        raise SystemExit(f"error: a loss was not finite: {losses}")
    step_s = statistics.median(times[1:] if len(times) > 1 else times)  # the first step holds one-time costs
    tokens = batch_size * cfg.data.block_size
    flops = step_flops_per_token(cfg.data.block_size)["step"] * tokens
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.mode, torch.float32)
    peak, peak_note = peak_flops(device, autocast_dtype)
    print(f"distillation: {tokens / step_s:,.0f} tokens/s (median step {step_s:.3f} s of {len(times)}, the first "
          f"excluded), {flops / step_s / 1e12:.3f} TFLOP/s of model FLOPs, MFU {flops / step_s / peak:.1%} ({peak_note})")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved (teacher, student, AdamW, activations)")
    else:
        print(f"peak memory: {_rss_peak_mib():,.0f} MiB RSS (the whole process)")

    # Generation: the student, greedy with the KV cache, every row exactly new_tokens long.
    net = acc.unwrap_model(model).eval()
    for rows in ([1] if cpu_smoke else [1, 8, 32]):
        prompt = torch.randint(0, VOCAB, (rows, 32), generator=g).to(acc.device)
        with torch.no_grad(), acc.autocast():
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)
            net.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            out = net.generate(prompt, **kwargs)
            _sync(device)
        seconds = time.perf_counter() - t0
        assert out.shape == (rows, 32 + new_tokens), out.shape
        print(f"generation, batch {rows}: {rows * new_tokens / seconds:,.1f} new tokens/s "
              f"({new_tokens} greedy tokens after a 32-token prompt)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run the same shapes on CPU, 2 steps of 1 block")
    ap.add_argument("--estimate", action="store_true", help="print the compute/time table for DistilGPT2 and exit")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 20 on CUDA, 2 with --cpu-smoke)")
    ap.add_argument("--batch-size", type=int, default=None, help="blocks per step (default 8 on CUDA, 1 on CPU)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default 128 on CUDA, 4 on CPU)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.estimate:
        print(estimate_table())
        return 0
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); this script measures a GPU. "
              "Run it on a GPU machine, or pass --cpu-smoke to run the same shapes on CPU for 2 steps", file=sys.stderr)
        return EXIT_NO_DEVICE
    for name in ("steps", "batch_size", "new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be ≥ 1", file=sys.stderr)
            return 2
    smoke = args.cpu_smoke
    run(smoke, args.steps or (2 if smoke else 20), args.batch_size or (1 if smoke else 8),
        args.new_tokens or (4 if smoke else 128))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
