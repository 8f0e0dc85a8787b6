"""``scripts/realshape_cuda.py``: DistilGPT2's real shapes run (CPU smoke), refuse without CUDA, estimate.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_realshape.py -q
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "realshape_cuda.py"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cpu_smoke_runs_the_real_shapes():
    """124M teacher, 82M student from blocks 0,2,4,7,9,11, 1,024-token blocks: 2 steps + generation on CPU."""
    proc = _run("--cpu-smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "teacher 124.4M parameters, student 81.9M (blocks [0, 2, 4, 7, 9, 11]), batch 1×1024 tokens" in out
    steps = re.findall(r"step (\d)/2: [\d.]+ s, loss ([\d.]+) \(kd ([\d.]+), ce ([\d.]+), cos ([\d.]+)\)", out)
    assert [s[0] for s in steps] == ["1", "2"], out
    # A random 50,257-way model starts near ln(50257) = 10.8 nats of cross-entropy.
    assert all(10.0 < float(s[3]) < 11.5 for s in steps), steps
    tps = float(re.search(r"distillation: ([\d,.]+) tokens/s", out).group(1).replace(",", ""))
    mfu = float(re.search(r"MFU ([\d.]+)%", out).group(1))
    assert tps > 0 and 0 < mfu <= 100, out
    assert re.search(r"peak memory: [\d,]+ MiB RSS", out) and re.search(r"generation, batch 1: [\d,.]+ new tokens/s", out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would measure it")
def test_without_cuda_it_says_so_and_exits_2():
    proc = _run()
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA device") and "--cpu-smoke" in err[0]


def test_estimate_counts_the_step_flops_and_gpu_hours():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import realshape_cuda as rs
    finally:
        sys.path.remove(str(SCRIPT.parent))
    # Independent count: GPT-2 small has 85.0M non-embedding parameters (124.4M − 50,257×768 − 1,024×768);
    # 6 of its blocks 42.5M. A forward is ~2 FLOPs per weight plus the LM head and attention.
    d, v, ctx = 768, 50257, (1024 + 1) / 2
    per_block = 12 * d * d + 13 * d
    teacher = 2 * (12 * per_block + 2 * d + d * v) + 2 * 12 * ctx * d
    student = 2 * (6 * per_block + 2 * d + d * v) + 2 * 6 * ctx * d
    flops = rs.step_flops_per_token()
    assert flops["teacher_forward"] == pytest.approx(teacher) and flops["student_forward"] == pytest.approx(student)
    assert 12 * per_block + 2 * d == pytest.approx(85.0e6, rel=2e-3)
    proc = _run("--estimate")
    assert proc.returncode == 0, proc.stderr
    hours = (3 * student + teacher) * rs.OPENWEBTEXT_TOKENS / (312e12 * rs.ASSUMED_MFU) / 3600
    assert f"| A100 | 312 | {hours:,.0f} |" in proc.stdout, proc.stdout
