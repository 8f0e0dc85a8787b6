"""Generation speed: batching, and batch-1 decoding against the memory-bandwidth bound and transformers.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python benchmarks/bench_generate.py [--quick]

Batch-1 decoding reads every weight once per token, so its ceiling is memory bandwidth ÷ weight
bytes (parameters counted once: tied embeddings are one tensor). Rows report tokens/s of this
project's decoder, of its plain loop over the HF forward, and of ``model.generate``, each also as a
fraction of that ceiling. Uses the trained v2 student when ``model_dir("v2")`` holds one, else a
randomly initialised 6-layer d256 GPT-2 of the same shape (the note says which). Timings are the
best of a few repeats, which is what a busy machine can still measure.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from python3_distillation.generation import Generator, SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPTS, student_folder  # noqa: E402

BATCH_TARGET = 3.0  # batched throughput over one-at-a-time


def load(quick: bool) -> tuple[Generator, str]:
    """The trained v2 student on CPU, else a random 6-layer d256 GPT-2 (and a note saying which)."""
    folder, note = student_folder(tempfile.mkdtemp(prefix="bench-generate-"))
    return Generator.from_pretrained(folder, device="cpu"), note


def weight_bytes(model: torch.nn.Module) -> int:
    # parameters() yields a shared (tied) tensor once.
    return sum(p.numel() * p.element_size() for p in model.parameters())


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measured_bandwidth() -> float:
    x = torch.ones(64 * 2**20)  # 256 MiB, far past the caches
    return x.numel() * 4 / best_of(x.sum, 5)


def row(metric: str, value: float, unit: str, target: str, met: bool | None, note: str) -> dict[str, Any]:
    return {"metric": metric, "value": round(value, 3), "unit": unit, "target": target, "met": met, "note": note}


def batch_rows(gen: Generator, quick: bool) -> list[dict[str, Any]]:
    n_prompts, new = (8, 8) if quick else (32, 32)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_prompts)]
    params = SamplingParams(max_new_tokens=new, temperature=0)
    gen.generate(prompts[:2], params)  # warm-up
    tokens = {}

    def batched():
        tokens["batched"] = sum(c.completion_tokens for c in gen.generate(prompts, params))

    def one_by_one():
        tokens["single"] = sum(gen.generate([p], params)[0].completion_tokens for p in prompts)

    t_batch = best_of(batched, 1 if quick else 2)
    t_single = best_of(one_by_one, 1)
    tps_b, tps_s = tokens["batched"] / t_batch, tokens["single"] / t_single
    speedup = tps_b / tps_s
    return [row(f"batched generation, {n_prompts} prompts, vs one at a time", speedup, "×", f"≥ {BATCH_TARGET:g}",
                speedup >= BATCH_TARGET,
                f"{tps_b:.0f} vs {tps_s:.0f} tokens/s ({n_prompts} prompts × {new} new tokens, greedy)")]


def decode_speeds(gen: Generator, new: int, repeats: int) -> dict[str, float]:
    """Batch-1 greedy tokens/s: this decoder, its loop over the HF forward, and ``model.generate``."""
    prompt = PROMPTS[1]
    params = SamplingParams(max_new_tokens=new, temperature=0)

    def ours(g: Generator) -> float:
        g.generate([prompt], SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
        best = 0.0
        for _ in range(repeats):
            c = g.generate([prompt], params)[0]
            best = max(best, c.completion_tokens / c.seconds)
        return best

    enc = gen.tokenizer(prompt, return_tensors="pt").to(gen.device)

    def hf_generate():
        with torch.inference_mode():
            gen.model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=gen.eos_token_id)

    hf_generate()
    return {"fast": ours(gen), "hf_loop": ours(Generator(gen.model, gen.tokenizer, name=gen.name, backend="hf")),
            "generate": new / best_of(hf_generate, repeats)}


def decode_rows(gen: Generator, quick: bool, note: str, bandwidth: float) -> tuple[list[dict[str, Any]], int]:
    """Batch-1 rows, and the thread count they were best at; ``bandwidth`` (bytes/s, measured) sets the bound."""
    new, repeats = (16, 1) if quick else (128, 3)
    nbytes = weight_bytes(gen.model)
    bound = bandwidth / nbytes
    default_threads = torch.get_num_threads()
    # Thread hand-offs dominate when other processes share the cores, so 1 thread is measured too;
    # the headline is the faster setting, with every decoder measured at that same setting.
    speeds = {}
    try:
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            speeds[threads] = decode_speeds(gen, new, repeats)
    finally:
        torch.set_num_threads(default_threads)
    threads = max(speeds, key=lambda t: speeds[t]["fast"])
    fast, hf_loop, hf = (speeds[threads][k] for k in ("fast", "hf_loop", "generate"))
    others = "; ".join(f"{t} thread(s): {v['fast']:.0f} vs generate {v['generate']:.0f} tokens/s"
                       for t, v in speeds.items() if t != threads)
    where = (f"{note}; {nbytes / 1e6:.1f} MB of weights, bound {bound:.0f} tokens/s at the measured "
             f"{bandwidth / 1e9:.0f} GB/s; {threads} thread(s); {new} new tokens, greedy, best of {repeats}"
             + (f"; {others}" if others else ""))
    return [
        row("batch-1 decode, this generator", fast / bound, "of bandwidth bound", "> transformers generate",
            fast > hf, f"{fast:.0f} tokens/s; {where}"),
        row("batch-1 decode, own loop over the HF forward (backend='hf')", hf_loop / bound, "of bandwidth bound",
            "", None, f"{hf_loop:.0f} tokens/s"),
        row("batch-1 decode, transformers model.generate", hf / bound, "of bandwidth bound", "", None,
            f"{hf:.0f} tokens/s"),
        row("batch-1 decode speed-up over transformers generate", fast / hf, "×", "> 1", fast > hf,
            f"{fast:.0f} vs {hf:.0f} tokens/s"),
    ], threads


def head_rows(gen: Generator, quick: bool) -> list[dict[str, Any]]:
    """Why the decoder keeps a transposed copy of the lm-head on CPU: the batch-1 product both ways."""
    w = gen.model.get_output_embeddings().weight.detach()
    w_t = w.t().contiguous()
    x = torch.randn(1, w.shape[1], dtype=w.dtype)
    reps = 5 if quick else 30
    with torch.inference_mode():
        t_linear = best_of(lambda: torch.nn.functional.linear(x, w), reps)
        t_copy = best_of(lambda: torch.mm(x, w_t), reps)
    gbs = w.numel() * w.element_size() / 1e9
    return [row("lm-head product at batch 1, x @ Wᵀ (contiguous copy) vs F.linear(x, W)", t_linear / t_copy, "×",
                "> 1", t_copy < t_linear,
                f"{gbs / t_copy:.1f} vs {gbs / t_linear:.1f} GB/s ({tuple(w.shape)} weight, best of {reps})")]


def run(quick: bool = False) -> dict[str, Any]:
    gen, note = load(quick)
    bw = measured_bandwidth()  # before the decoding runs, so the bound is this machine's, now
    decode, threads = decode_rows(gen, quick, note, bw)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = batch_rows(gen, quick)
    finally:
        torch.set_num_threads(default_threads)
    batch[0]["note"] += f"; {threads} thread(s); {note}"
    rows = batch + decode + head_rows(gen, quick)
    rows.append(row("memory read bandwidth, measured", bw / 1e9, "GB/s", "", None,
                    "sum over a 256 MiB tensor, best of 5; the bandwidth bound of the batch-1 rows above"))
    return {"section": "Generation", "rows": rows}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2, ensure_ascii=False))
