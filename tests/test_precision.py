"""``mixed_precision: auto``: the decision with the measurements injected, and one real probe.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_precision.py -q
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_config
from python3_distillation import device_plan
from python3_distillation.device_plan import MIN_SPEEDUP, SLOW_PATH, Precision, decide, pick_device


def test_cpu_auto_follows_the_probe():
    fast = decide("auto", "cpu", probe=lambda: 2.1)
    assert fast.mode == "bf16" and "2.10× fp32" in fast.reason and fast.bf16_speedup == 2.1
    slow = decide("auto", "cpu", probe=lambda: 0.011)
    assert slow.mode == "no" and slow.label == "fp32"
    assert slow.line() == "precision: fp32 — bf16 autocast measured 0.01× fp32 on this CPU (no native bf16)"
    marginal = decide("auto", "cpu", probe=lambda: MIN_SPEEDUP - 0.05)
    assert marginal.mode == "no" and "not worth it" in marginal.reason


@pytest.mark.parametrize("ratio, mode, why", [
    (MIN_SPEEDUP, "bf16", f"bf16 autocast measured {MIN_SPEEDUP:.2f}× fp32 on this CPU"),  # the threshold itself
    (MIN_SPEEDUP - 1e-9, "no", f"(< {MIN_SPEEDUP}×, not worth it)"),
    (1.0, "no", f"(< {MIN_SPEEDUP}×, not worth it)"),  # as fast as fp32: not "no native bf16"
    (0.999, "no", "(no native bf16)"),
])
def test_auto_on_cpu_at_both_sides_of_min_speedup(ratio, mode, why):
    choice = decide("auto", "cpu", probe=lambda: ratio)
    assert choice.mode == mode and choice.reason.endswith(why) and choice.bf16_speedup == ratio


def test_an_explicit_bf16_warns_below_fp32_speed_only():
    with pytest.warns(RuntimeWarning):
        decide("bf16", "cpu", probe=lambda: 0.999)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forced = decide("bf16", "cpu", probe=lambda: 1.0)
    assert forced.reason == "set explicitly (bf16 autocast measured 1.00× fp32 on this CPU)"


def test_alternating_best_is_each_calls_fastest_run(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(device_plan.time, "perf_counter", lambda: clock[0])
    runs = {"a": iter([5.0, 3.0, 4.0]), "b": iter([2.0, 6.0, 1.5])}
    order = []

    def timed(name):
        def fn():
            order.append(name)
            clock[0] += next(runs[name])
        return fn

    assert device_plan._alternating_best(timed("a"), timed("b"), 3) == (3.0, 1.5)
    assert order == ["a", "b"] * 3  # alternated, so both see the same conditions


@pytest.mark.parametrize("timings, ratio, pairs", [
    ([(1.0, 10.0)], 0.1, [3]),  # the small matmul is on the slow path (0.1 < SLOW_PATH): the probe stops
    ([(1.0, 5.0), (3.0, 1.5)], 2.0, [3, 16]),  # exactly SLOW_PATH is not slow: the training shape decides
    ([(1.0, 2.0), (1.0, 1.25)], 0.8, [3, 16]),
])
def test_the_probe_ratio_on_fake_timings(monkeypatch, timings, ratio, pairs):
    calls = []

    def fake_best(a, b, n):
        calls.append(n)
        return timings[len(calls) - 1]

    monkeypatch.setattr(device_plan, "_alternating_best", fake_best)
    threads = torch.get_num_threads()
    assert (timings[0][0] / timings[0][1] < SLOW_PATH) == (pairs == [3])
    assert device_plan.probe_cpu_bf16() == ratio  # fp32 time ÷ bf16 time of the last shape measured
    assert calls == pairs and torch.get_num_threads() == threads


def test_pick_device_is_the_one_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda") and pick_device("") == torch.device("cuda")
    assert pick_device(cpu=True) == torch.device("cpu") and pick_device("cuda:1", cpu=True) == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu") and pick_device("meta") == torch.device("meta")


def test_explicit_choices_are_kept_and_a_slow_bf16_warns():
    assert decide("no", "cpu", probe=lambda: 3.0).mode == "no"
    with pytest.warns(RuntimeWarning, match=r"0\.01× fp32.*use train.mixed_precision=auto or no"):
        forced = decide("bf16", "cpu", probe=lambda: 0.01)
    assert forced.mode == "bf16" and forced.requested == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bf16 that is really faster raises no warning
        assert decide("bf16", "cpu", probe=lambda: 2.0).mode == "bf16"
    with pytest.raises(ValueError, match="expected auto, bf16, fp16 or no"):
        decide("fp8", "cpu")


def test_cuda_follows_the_device_capability():
    def capability(bf16: bool, major: int):
        def choose(device):
            if bf16:
                return Precision("bf16", "test GPU supports bf16")
            if major >= 7:
                return Precision("fp16", f"test GPU (compute capability {major}.0) has fp16 tensor cores but no bf16")
            return Precision("no", "old GPU")
        return choose

    never = lambda: pytest.fail("the CPU probe must not run for a CUDA device")  # noqa: E731
    assert decide("auto", "cuda", probe=never, cuda_choice=capability(True, 8)).mode == "bf16"
    assert decide("auto", "cuda", probe=never, cuda_choice=capability(False, 7)).mode == "fp16"
    assert decide("auto", "cuda", probe=never, cuda_choice=capability(False, 6)).mode == "no"
    assert decide("fp16", "cuda", probe=never, cuda_choice=capability(True, 8)).mode == "fp16"


def _fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """torch.cuda's answers for a GPU that is not here; ``is_bf16_supported`` behaves as torch's does:
    with emulation included (its default) it is True on every GPU since Kepler, without it only ≥ 8.0."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability[0] >= 8)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("name, capability, mode", [
    ("Tesla T4", (7, 5), "fp16"),  # emulates bf16: fp16 with loss scaling, as the README promises
    ("Tesla V100-SXM2-16GB", (7, 0), "fp16"),
    ("Tesla P100-PCIE-16GB", (6, 0), "no"),  # no tensor cores at all
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16"),
])
def test_the_real_cuda_choice_on_faked_gpus(monkeypatch, name, capability, mode):
    _fake_gpu(monkeypatch, name, capability)
    never = lambda: pytest.fail("the CPU probe must not run for a CUDA device")  # noqa: E731
    choice = decide("auto", "cuda", probe=never)
    assert choice.mode == mode and choice.requested == "auto"
    assert name in choice.reason and f"{capability[0]}.{capability[1]}" in choice.reason
    assert device_plan.native_bf16("cuda") == (mode == "bf16")


def test_the_real_probe_agrees_with_what_this_cpu_has():
    """FACTS.md: native bf16 (avx512_bf16/amx_bf16) measured 1.85–4.4× fp32; without it bf16 falls
    to a scalar fallback 90× slower. A probe that timed the wrong thing would miss either side."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    speedup = device_plan.probe_cpu_bf16()
    if re.search(r"\b(avx512_bf16|amx_bf16)\b", flags):
        assert speedup > 1.0, f"native bf16 here, but the probe measured {speedup:.2f}× fp32"
    elif not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert speedup < 1.0, f"no bf16 kernels here, but the probe measured {speedup:.2f}× fp32"
    else:
        assert 0.01 < speedup < 100, speedup


def test_the_probe_runs_once_per_process(monkeypatch):
    monkeypatch.setattr(device_plan, "_CPU_PROBE", None)
    calls = []
    monkeypatch.setattr(device_plan, "probe_cpu_bf16", lambda: calls.append(1) or 1.6)
    first = decide("auto", "cpu")
    second = decide("auto", "cpu")
    assert calls == [1] and first.mode == second.mode == "bf16" and second.bf16_speedup == 1.6


def test_the_choice_is_logged_and_recorded(tmp_path, text_corpus, capsys, monkeypatch):
    from python3_distillation.teacher import run_teacher

    monkeypatch.setattr(device_plan, "_CPU_PROBE", 0.5)  # this process's probe: bf16 at half fp32's speed
    cfg = tiny_run_config(tmp_path, text_corpus, train={"mixed_precision": "auto", "max_steps": 2})
    out = run_teacher(cfg)
    err = capsys.readouterr().err
    meta = json.loads((out / "distill_meta.json").read_text())
    line = f"precision: {meta['precision']['label']} — {meta['precision']['reason']}"
    assert line in err
    reason = "bf16 autocast measured 0.50× fp32 on this CPU (no native bf16)"
    assert meta["precision"] == {"mode": "no", "label": "fp32", "requested": "auto", "reason": reason,
                                 "bf16_speedup": 0.5}
    assert f"precision: fp32 — {reason}" in err
    saved = (out / "distill_config.yaml").read_text()
    assert saved.startswith(f"# precision used: fp32 — {reason}\n") and "mixed_precision: auto" in saved
    assert torch.get_default_dtype() == torch.float32
