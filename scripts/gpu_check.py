"""The CUDA path, proved on one GPU in a few minutes: ``pytest -m cuda``, then DistilGPT2's real shapes.

    make gpu-check                    # = python scripts/gpu_check.py, on a machine with a CUDA GPU
    make gpu-check DRY_RUN=1          # the same script on CPU with tiny shapes: the same JSON keys
    python scripts/gpu_check.py --out reports/gpu_check

Writes ``gpu_check.json`` and ``gpu_check.log`` under ``--out`` (default ``reports/gpu_check/``):
1. ``pytest -m cuda`` (tests/test_cuda.py): greedy tokens CPU fp32 == CUDA fp32, bf16 within its
   tolerance, ``kd_loss`` on CUDA against the CPU reference, kill-and-resume on CUDA, int8 folders on
   CUDA against fp32, the server on CUDA answering the ``openai`` client, nccl when ≥ 2 GPUs.
2. A real-shape distillation through the project's own loop (``train.train``: the device plan's
   precision, compile, TF32 and batch prefetch): a GPT-2-small-shaped teacher (12 × 768, 124M,
   random weights: speed does not depend on them) into its blocks 0, 2, 4, 7, 9, 11 (6 × 768, 82M),
   ``configs/distilgpt2.yaml``'s loss (5·KL·T² + 2·CE + 1·cos), 50 steps of 8 × 1,024 tokens.
   Printed: tokens/s (median of the logged windows after the first, which holds compilation), MFU
   against the device's dense bf16 peak from ``PEAK_TFLOPS`` (null for a GPU not in the table), peak
   memory.
3. Decode tokens/s of the student at batch 1 and 32, greedy, 128 new tokens: the project's generator
   against transformers' ``generate`` on the same GPU in the same run, in the serving dtype; batch 1
   also against the HBM bound (weights' bytes read once per token: bandwidth ÷ bytes).
Setup comes from the project's own files: ``make gpu-check`` runs ``make setup`` (the lock) first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere without installing the package
    sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peaks, TFLOP/s, no sparsity (vendor data sheets; T4 has no bf16: its fp16
# peak). Matched as a whole word of torch.cuda.get_device_name, first match wins.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
               ("T4", 65.0)]
# HBM bandwidth, TB/s (data sheets): the batch-1 decode bound is bandwidth ÷ weight bytes.
HBM_TBPS = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100", 2.0), ("L4", 0.3), ("T4", 0.32)]
FULL = {"teacher": (12, 768, 12), "student_layers": [0, 2, 4, 7, 9, 11], "steps": 50, "batch": 8, "seq": 1024,
        "vocab": 50257, "decode_batches": (1, 32), "new_tokens": 128, "log_every": 10}
DRY = {"teacher": (2, 64, 2), "student_layers": [0], "steps": 4, "batch": 2, "seq": 32, "vocab": 50257,
       "decode_batches": (1, 4), "new_tokens": 4, "log_every": 2}
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def lookup(table: list[tuple[str, float]], name: str) -> float | None:
    for key, value in table:
        if re.search(rf"\b{re.escape(key)}\b", name):
            return value
    return None


def run_cuda_tests(log) -> dict:
    """``pytest -m cuda`` in a subprocess (its own CUDA context, deterministic cuBLAS workspace)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_cuda.py")], cwd=REPO, env=env, capture_output=True, text=True)
    log(proc.stdout + proc.stderr)
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail):
        counts["errors" if word.startswith("error") else word] = int(n)
    return {"returncode": proc.returncode, **counts, "seconds": round(time.perf_counter() - t0, 1)}


def distill(shape: dict, device, out: Path, log) -> tuple[dict, object, object]:
    """The real-shape distillation through ``train.train``; returns (numbers, student, tokenizer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from python3_distillation.config import load_config
    from python3_distillation.data import Blocks
    from python3_distillation.distill import make_distill_loss
    from python3_distillation.evaluation.measure import forward_flops_per_token
    from python3_distillation.models import build_student, count_parameters, seeded
    from python3_distillation.tokenizer import load_tokenizer
    from python3_distillation.train import train

    n_layer, d, heads = shape["teacher"]
    seq, batch, vocab = shape["seq"], shape["batch"], shape["vocab"]
    cfg = load_config(["distilgpt2"], [
        f"train.max_steps={shape['steps']}", f"train.batch_size={batch}", "train.grad_accum=1",
        f"train.log_every={shape['log_every']}", "train.eval_every=0", "train.save_every=0",
        f"train.run_dir={out / 'run'}", f"train.cpu={device.type == 'cpu'}", f"data.block_size={seq}",
        "data.max_eval_blocks=2", f"student.n_layer={len(shape['student_layers'])}",
        f"student.layers={shape['student_layers']}"])
    with seeded(0):
        teacher = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, n_positions=max(seq, 64),
                                             vocab_size=vocab, bos_token_id=50256, eos_token_id=50256)).eval()
    student, _ = build_student(teacher, len(shape["student_layers"]), "teacher", shape["student_layers"], seed=0)
    g = torch.Generator().manual_seed(0)
    blocks = {"train": Blocks(torch.randint(0, vocab, (batch * 4, seq), generator=g)),
              "validation": Blocks(torch.randint(0, vocab, (2, seq), generator=g))}
    loss_fn = make_distill_loss(teacher, cfg.distill)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    student, result = train(student, loss_fn, blocks, cfg, extra_modules=[teacher])
    wall = time.perf_counter() - t0
    windows = [r["tok_per_s"] for r in result.history if "tok_per_s" in r]
    tps = statistics.median(windows[1:] if len(windows) > 1 else windows)  # the first window compiles
    ctx = (seq + 1) / 2
    step_flops_per_token = (3 * forward_flops_per_token(len(shape["student_layers"]), d, vocab, ctx)
                            + forward_flops_per_token(n_layer, d, vocab, ctx))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = lookup(PEAK_TFLOPS, name) if device.type == "cuda" else None
    achieved = tps * step_flops_per_token / 1e12
    losses = [r["loss"] for r in result.history if "loss" in r]
    numbers = {
        "teacher_params": count_parameters(teacher), "student_params": count_parameters(student),
        "steps": result.step, "batch": batch, "seq": seq, "tokens_per_s": round(tps, 1), "wall_s": round(wall, 1),
        "model_tflops_per_s": round(achieved, 4), "peak_bf16_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None, "precision": result.precision.get("label"),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
    }
    log(f"distillation: {numbers}")
    # An eager copy for decoding: the trained one's blocks may be compiled (train.compile), and
    # generate's growing lengths and the serving dtype would recompile them inside the timings.
    eager = GPT2LMHeadModel(student.config)
    eager.load_state_dict({k: v.detach().cpu() for k, v in student.state_dict().items()})
    del teacher, student
    return numbers, eager, load_tokenizer("gpt2")


def decode(student, tokenizer, shape: dict, device, log) -> dict:
    """Greedy decode tokens/s, the project's generator vs transformers' ``generate``, in the serving dtype."""
    import torch

    from python3_distillation.device_plan import serving_dtype
    from python3_distillation.evaluation.measure import interleaved
    from python3_distillation.generation import Generator, SamplingParams

    dtype, why = serving_dtype("auto", device)
    model = student.to(device=device, dtype=dtype).eval()
    gen = Generator(model, tokenizer, name="student")
    n = shape["new_tokens"]
    params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    out: dict = {"dtype": str(dtype).removeprefix("torch."), "dtype_reason": why, "new_tokens": n}
    for rows, key in zip(shape["decode_batches"], ("batch_1", "batch_large")):
        prompts = [PROMPT] * rows
        ids = torch.tensor(tokenizer(prompts)["input_ids"], device=device)
        counts = {}

        def project():
            counts["project"] = sum(c.completion_tokens for c in gen.generate(prompts, params))

        def transformers_generate():
            with torch.no_grad():
                o = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=50256)
            counts["transformers"] = (o.shape[1] - ids.shape[1]) * rows

        times = interleaved({"project": project, "transformers": transformers_generate}, rounds=3)
        out[key] = {"rows": rows, **{k: round(counts[k] / statistics.median(v), 1) for k, v in times.items()}}
        log(f"decode {key}: {out[key]}")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    tbps = lookup(HBM_TBPS, name) if device.type == "cuda" else None
    bound = tbps * 1e12 / weight_bytes if tbps else None
    out["hbm"] = {"bandwidth_tb_s": tbps, "weight_bytes": weight_bytes,
                  "bound_tokens_per_s_batch_1": round(bound, 1) if bound else None,
                  "project_fraction_of_bound": round(out["batch_1"]["project"] / bound, 4) if bound else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same steps and JSON keys")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "gpu_check", help="where the JSON and log go")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or with --dry-run (make gpu-check DRY_RUN=1) for the CPU rehearsal", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    shape = DRY if args.dry_run else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "gpu_check.log"
    log_file = log_path.open("w", encoding="utf-8")

    def log(text: str) -> None:
        print(text, flush=True)
        log_file.write(text.rstrip("\n") + "\n")
        log_file.flush()

    from python3_distillation.device_plan import plan

    t0 = time.perf_counter()
    dp = plan(device, mixed_precision="auto", compile="auto")
    for line in dp.lines():
        log(line)
    report = {"dry_run": args.dry_run, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "plan": dp.to_dict()}
    report["cuda_tests"] = run_cuda_tests(log)
    report["distillation"], student, tokenizer = distill(shape, device, args.out, log)
    report["decode"] = decode(student, tokenizer, shape, device, log)
    tests = report["cuda_tests"]
    # Without a GPU every cuda test skips: the rehearsal checks the plumbing, not the GPU.
    report["ok"] = tests["returncode"] in ((0, 5) if args.dry_run else (0,)) and tests["failed"] == tests["errors"] == 0
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(f"gpu check {'passed' if report['ok'] else 'FAILED'} in {report['seconds']} s → {args.out / 'gpu_check.json'}")
    log_file.close()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
