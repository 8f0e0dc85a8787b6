"""``scripts/realshape_cuda.py`` and ``scripts/gpu_check.py``: real shapes (CPU smoke), no CUDA, estimate, dry run.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_realshape.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from python3_distillation.evaluation.measure import forward_flops_per_token

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
    steps = re.findall(r"step (\d)/2: ([\d.]+) s, loss ([\d.]+) \(kd ([\d.]+), ce ([\d.]+), cos ([\d.]+)\)", out)
    assert [s[0] for s in steps] == ["1", "2"], out
    # A random 50,257-way model starts near ln(50257) = 10.8 nats of cross-entropy.
    assert all(10.0 < float(s[4]) < 11.5 for s in steps), steps
    tps = float(re.search(r"distillation: ([\d,.]+) tokens/s", out).group(1).replace(",", ""))
    mfu = float(re.search(r"MFU ([\d.]+)%", out).group(1))
    # The rate is the batch's 1,024 tokens over the median step after the first: step 2's time here.
    step_s = float(re.search(r"median step ([\d.]+) s of 2, the first excluded", out).group(1))
    assert step_s == pytest.approx(float(steps[1][1]), abs=0.006), out
    assert tps == pytest.approx(1024 / step_s, rel=1e-3, abs=0.5) and 0 < mfu <= 100, out
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


GPU_CHECK = ROOT / "scripts" / "gpu_check.py"
GPU_CHECK_KEYS = {"dry_run", "device", "device_name", "torch", "plan", "cuda_tests", "distillation", "decode", "ok",
                  "seconds"}


def test_gpu_check_dry_run_writes_the_same_keys(tmp_path):
    """``make gpu-check DRY_RUN=1``: the GPU check's every step on CPU with tiny shapes (~20 s)."""
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report) == GPU_CHECK_KEYS and report["ok"] is True and report["device"] == "cpu"
    tests = report["cuda_tests"]
    if not torch.cuda.is_available():  # every cuda test reports itself skipped: none may pass silently
        assert tests["skipped"] >= 6 and tests["passed"] == tests["failed"] == tests["errors"] == 0, tests
    d = report["distillation"]
    assert set(d) == {"teacher_params", "student_params", "steps", "batch", "seq", "tokens_per_s", "wall_s",
                      "model_tflops_per_s", "peak_bf16_tflops", "mfu", "precision", "peak_memory_gib", "loss_first",
                      "loss_last"}
    assert d["steps"] == 4 and d["student_params"] < d["teacher_params"]
    # The timed windows' rate beats the whole run's average (which holds the setup), and the model
    # FLOP/s are that rate times the step's FLOPs per token: 3 student forwards (fwd + bwd) + the teacher's.
    assert d["tokens_per_s"] * d["wall_s"] > d["steps"] * d["batch"] * d["seq"], d
    ctx = (d["seq"] + 1) / 2
    step_flops = 3 * forward_flops_per_token(1, 64, 50257, ctx) + forward_flops_per_token(2, 64, 50257, ctx)
    assert d["model_tflops_per_s"] == pytest.approx(d["tokens_per_s"] * step_flops / 1e12, rel=1e-3, abs=1e-4), d
    assert d["mfu"] is None and d["peak_bf16_tflops"] is None  # a CPU has no entry in the peak table
    assert 8 < d["loss_first"] < 40  # 5·KL·T² + 2·CE + cos of a random 50,257-way model: CE ≈ ln 50257 = 10.8
    dec = report["decode"]
    assert dec["batch_1"]["rows"] == 1 and dec["batch_large"]["rows"] == 4
    assert all(set(dec[k]) == {"rows", "project", "transformers"} for k in ("batch_1", "batch_large"))
    bytes_per_weight = {"float32": 4, "bfloat16": 2, "float16": 2}[dec["dtype"]]
    assert dec["hbm"]["bound_tokens_per_s_batch_1"] is None
    assert dec["hbm"]["weight_bytes"] == d["student_params"] * bytes_per_weight
    log = (tmp_path / "gpu_check.log").read_text()
    assert log.startswith("precision: ") and "gpu check passed" in log


def test_gpu_check_decode_rate_is_tokens_over_the_median_seconds(monkeypatch, tokenizer):
    """On a clock where every timed generation takes 0.25 s, each rate is rows × new tokens / 0.25:
    both decoders produce exactly the tokens asked for, and those are what is counted."""
    from conftest import tiny_gpt2
    from python3_distillation.evaluation import measure

    sys.path.insert(0, str(GPU_CHECK.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(GPU_CHECK.parent))
    clock = iter(range(10**6))
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: next(clock) * 0.25))
    shape = {"decode_batches": (1, 3), "new_tokens": 4}
    out = gpu_check.decode(tiny_gpt2(), tokenizer, shape, torch.device("cpu"), log=lambda *a: None)
    assert out["batch_1"] == {"rows": 1, "project": 4 / 0.25, "transformers": 4 / 0.25}
    assert out["batch_large"] == {"rows": 3, "project": 12 / 0.25, "transformers": 12 / 0.25}


def test_gpu_check_peak_tables_name_the_gpus():
    sys.path.insert(0, str(GPU_CHECK.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(GPU_CHECK.parent))
    peak = lambda name: gpu_check.lookup(gpu_check.PEAK_TFLOPS, name)  # noqa: E731
    assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == 989.0 and peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0 and peak("NVIDIA L4") == 121.0 and peak("Tesla T4") == 65.0
    assert peak("NVIDIA L40S") is None and peak("NVIDIA A10") is None  # not in the table: null, not a guess
    hbm = lambda name: gpu_check.lookup(gpu_check.HBM_TBPS, name)  # noqa: E731
    assert hbm("NVIDIA H100 80GB HBM3") == 3.35 and hbm("NVIDIA H200") == 4.8
