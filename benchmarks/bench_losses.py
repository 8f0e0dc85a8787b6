"""Chunked analytic-gradient ``kd_loss`` against the naive ``F.kl_div`` graph: time and peak memory.

    HF_HUB_OFFLINE=1 python benchmarks/bench_losses.py [--quick]

Both do forward + backward of ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` on 8×128×50257 logits
(one GPT-2 batch; 206 MB per fp32 tensor), ``--quick`` on 2×32×50257. Repeats are interleaved
(naive, chunked, naive, ...) so drift from other load hits both alike; the median is reported.
Peak memory is the growth of the max RSS of a fresh, warmed-up subprocess across one forward +
backward, which sees torch's allocations (tracemalloc would not).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere without installing the package
    sys.path.insert(0, str(REPO))

from python3_distillation.losses import kd_loss  # noqa: E402

TEMPERATURE = 2.0
FULL_SHAPE = (8, 128, 50257)
QUICK_SHAPE = (2, 32, 50257)
SPEEDUP_TARGET = 1.5  # ×; the chunked analytic gradient must clearly beat the autograd graph


def naive_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The reference definition, as an autograd graph over the full (N, V) tensors."""
    v = student.shape[-1]
    s, t = student.reshape(-1, v).float(), teacher.reshape(-1, v).float()
    return F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean") * temperature**2


IMPLS = {
    "naive": naive_kd,
    "chunked": lambda s, t: kd_loss(s, t, temperature=TEMPERATURE),
}


def _inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn(shape, generator=g) * 3).to(dtype)
    return student, teacher


def _step(name: str, student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Seconds for one forward + backward."""
    student.grad = None
    t0 = time.perf_counter()
    IMPLS[name](student, teacher).backward()
    return time.perf_counter() - t0


def time_interleaved(shape: tuple[int, ...], dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Median seconds per implementation, after one untimed warm-up of each."""
    student, teacher = _inputs(shape, dtype)
    times: dict[str, list[float]] = {name: [] for name in IMPLS}
    for name in IMPLS:
        _step(name, student, teacher)
    for _ in range(repeats):
        for name in IMPLS:
            times[name].append(_step(name, student, teacher))
    return {name: statistics.median(v) for name, v in times.items()}


def _rss_kb(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process in KB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_child(name: str, shape: tuple[int, ...]) -> float:
    """In a fresh process: MiB the peak RSS rises above the RSS before one forward + backward.

    Writing 5 to /proc/self/clear_refs resets the high-water mark (Linux ≥ 4.0), so importing torch
    does not hide a smaller peak; without it, ``ru_maxrss`` (KB) is the fallback.
    """
    # Warm up on 2 rows first, so one-time costs (torch's lazy init, kd_loss's worker threads and
    # their malloc arenas, ~70 MB) are not charged to a training step's peak.
    _step(name, *_inputs((2, shape[-1]), torch.float32))
    student, teacher = _inputs(shape, torch.float32)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kb("VmRSS")
        _step(name, student, teacher)
        return (_rss_kb("VmHWM") - before) / 1024
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _step(name, student, teacher)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def peak_mb(name: str, shape: tuple[int, ...]) -> float | None:
    """Peak extra memory of ``name`` in a subprocess; None when the subprocess fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak", name, "--shape", ",".join(map(str, shape))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def _row(metric: str, value: float, unit: str, note: str, target: str | None = None, met: bool | None = None) -> dict:
    return {"metric": metric, "value": round(value, 4), "unit": unit, "target": target, "met": met, "note": note}


def run(quick: bool = False) -> dict:
    """Benchmark section for the report: fp32 and bf16 times, speed-up, peak memory."""
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    repeats = 3 if quick else 5
    dims = "×".join(map(str, shape))
    rows = []
    fp32 = time_interleaved(shape, torch.float32, repeats)
    speedup = fp32["naive"] / fp32["chunked"]
    rows += [
        _row("naive F.kl_div fwd+bwd (fp32)", fp32["naive"] * 1e3, "ms", f"{dims} logits, T={TEMPERATURE}, median of {repeats}"),
        _row("kd_loss fwd+bwd (fp32)", fp32["chunked"] * 1e3, "ms", f"chunked, analytic gradient, {dims}"),
        _row(
            "kd_loss speed-up vs naive (fp32)",
            speedup,
            "×",
            f"interleaved repeats, ratio of medians; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
            target=f">= {SPEEDUP_TARGET}",
            met=speedup >= SPEEDUP_TARGET,
        ),
    ]
    bf16 = time_interleaved(shape, torch.bfloat16, repeats)
    rows += [
        _row("naive F.kl_div fwd+bwd (bf16 logits)", bf16["naive"] * 1e3, "ms", "upcast to fp32 first, as under autocast"),
        _row("kd_loss fwd+bwd (bf16 logits)", bf16["chunked"] * 1e3, "ms", "fp32 math per chunk, bf16 gradient"),
        _row("kd_loss speed-up vs naive (bf16 logits)", bf16["naive"] / bf16["chunked"], "×", "ratio of medians"),
    ]
    tensor_mb = torch.Size(shape).numel() * 4 / 2**20
    for name, label in (("naive", "naive F.kl_div"), ("chunked", "kd_loss")):
        mb = peak_mb(name, shape)
        if mb is not None:
            rows.append(
                _row(
                    f"{label} peak extra memory (fp32)",
                    mb,
                    "MiB",
                    f"peak-RSS growth over one fwd+bwd after a 2-row warm-up; includes the {tensor_mb:.0f} MiB gradient",
                )
            )
    return {"section": "KD loss", "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{'×'.join(map(str, QUICK_SHAPE))} logits, 3 repeats")
    ap.add_argument("--peak", choices=sorted(IMPLS), help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak:
        print(_peak_child(args.peak, tuple(int(x) for x in args.shape.split(","))))
        return
    print(json.dumps(run(quick=args.quick), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
