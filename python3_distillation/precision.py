"""Which device and precision to train in, decided on the machine at hand: ``mixed_precision: auto``.

    python -m python3_distillation.precision          # prints the choice for this machine and why

bf16 autocast is only worth it where the hardware does bf16 matmuls natively. On a CPU without
native bf16 (AVX2-only x86 such as AMD Zen 3 or Intel before Cooper Lake, many Arm machines) every
bf16 matmul falls to ATen's scalar fallback GEMM: measured there, 1024² matmuls ran at 0.9 GFLOP/s
in bf16 against 81 in fp32 (90× slower), and a teacher step took 73 s instead of 2 s. So on CPU the
choice is a measurement, not a guess: a short timed probe of a training-shaped matmul under bf16
autocast against fp32, once per process (a few ms; a slow first bf16 call ends it early). On CUDA
it is the device's capability: bf16 where the GPU has it natively (compute capability ≥ 8.0), fp16
(with loss scaling) on older GPUs with tensor cores (T4, V100: they only emulate bf16), fp32
otherwise. The other per-device decisions (KL chunks, compile, TF32, syncs) are in device_plan.py.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable

import torch

# bf16 must beat fp32 by this much on the probe to be chosen: autocast also pays for casting the
# weights every step, so a small matmul gain can be a net loss for the whole training step.
MIN_SPEEDUP = 1.25
# A probe's bf16 matmul slower than this multiple of fp32 means the scalar fallback: stop there.
SLOW_PATH = 0.2


@dataclasses.dataclass(frozen=True)
class Precision:
    """The mixed-precision mode to use (``"no"`` = fp32, ``"bf16"``, ``"fp16"``) and why."""

    mode: str
    reason: str
    requested: str = "auto"
    bf16_speedup: float | None = None  # bf16 autocast time ÷ fp32 time on the probe, inverted (>1 = faster)

    @property
    def label(self) -> str:
        return {"no": "fp32"}.get(self.mode, self.mode)

    def line(self) -> str:
        """The one line every stage logs at its start."""
        return f"precision: {self.label} — {self.reason}"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "label": self.label, "requested": self.requested, "reason": self.reason,
                "bf16_speedup": None if self.bf16_speedup is None else round(self.bf16_speedup, 3)}


def _alternating_best(a: Callable[[], object], b: Callable[[], object], pairs: int) -> tuple[float, float]:
    """Best time of each of two calls, run in alternation: the minimum over many short runs is what a
    shared, loaded machine can still measure, and alternation gives both the same conditions."""
    best = [float("inf"), float("inf")]
    for _ in range(pairs):
        for i, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def probe_cpu_bf16() -> float:
    """fp32 time ÷ bf16-autocast time of a training-shaped ``F.linear`` on this CPU (>1: bf16 faster).

    Two stages so a machine without native bf16 pays milliseconds, not seconds: a small matmul first
    (on the scalar fallback it is already >5× slower than fp32, and the probe stops), then the shape
    of a d768 block's projection over 512 tokens, 16 alternating pairs (~0.1 s with native bf16).
    """
    gen = torch.Generator().manual_seed(0)

    def ratio(tokens: int, d_in: int, d_out: int, pairs: int) -> float:
        x = torch.randn(tokens, d_in, generator=gen)
        w = torch.randn(d_out, d_in, generator=gen)

        def fp32():
            return torch.nn.functional.linear(x, w)

        def bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.nn.functional.linear(x, w)

        fp32(), bf16()  # warm-up: first calls pick kernels and allocate
        t32, t16 = _alternating_best(fp32, bf16, pairs)
        return t32 / max(t16, 1e-9)

    threads = torch.get_num_threads()
    # One thread: per-core speed is what differs between the two kernels, and on a loaded machine a
    # multi-threaded run waits at every barrier for a descheduled thread, which made the ratio swing
    # from 0.8 to 9 between three runs here; single-threaded it stayed within ±15%.
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            small = ratio(128, 256, 256, 3)
            if small < SLOW_PATH:
                return small
            return ratio(512, 768, 768, 16)
    finally:
        torch.set_num_threads(threads)


_CPU_PROBE: float | None = None


def cpu_bf16_speedup(probe: Callable[[], float] | None = None) -> float:
    """The probe's answer, measured once per process (``probe`` injects one, for tests)."""
    global _CPU_PROBE
    if probe is not None:
        return probe()
    if _CPU_PROBE is None:
        _CPU_PROBE = probe_cpu_bf16()
    return _CPU_PROBE


def native_bf16(device: torch.device | str) -> bool:
    """Whether this GPU does bf16 matmuls in hardware (CUDA compute capability ≥ 8.0: A100, L4, H100).

    ``torch.cuda.is_bf16_supported()`` alone is not the answer: it defaults to
    ``including_emulation=True`` and says True on a T4 or V100 (capability 7.x), where bf16 runs
    emulated and far slower than fp16 on their tensor cores. It also asks about the current device;
    the capability asked here is ``device``'s.
    """
    major, _ = torch.cuda.get_device_capability(device)
    if getattr(torch.version, "hip", None):  # ROCm: torch knows per GPU architecture
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return major >= 8 and bool(torch.cuda.is_bf16_supported(including_emulation=False))


def gpu_choice(device: torch.device) -> Precision:
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    if native_bf16(device):
        return Precision("bf16", f"{name} (compute capability {major}.{minor}) has native bf16")
    if major >= 7:
        return Precision("fp16", f"{name} (compute capability {major}.{minor}) has fp16 tensor cores but no bf16")
    return Precision("no", f"{name} (compute capability {major}.{minor}) has neither bf16 nor fp16 tensor cores")


def pick_device(device: str | torch.device | None = None, *, cpu: bool = False) -> torch.device:
    """The device a stage runs on: ``device`` when given; else CUDA when available and ``cpu``
    (``train.cpu``) is not set; else the CPU. Training, the teacher cache, the precision decision,
    generation and serving all ask here."""
    if device:  # None or "" (an unset setting): the rule below
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def decide(requested: str = "auto", device: torch.device | str | None = None,
           probe: Callable[[], float] | None = None,
           cuda_choice: Callable[[torch.device], Precision] | None = None) -> Precision:
    """The precision for ``requested`` (``auto``/``bf16``/``fp16``/``no``) on ``device``.

    ``auto``: CUDA → the device's capability; CPU → bf16 if the probe measures bf16 autocast at least
    ``MIN_SPEEDUP``× faster than fp32, else fp32. An explicit choice is kept, but an explicit ``bf16``
    on a CPU where the probe finds it slower than fp32 warns, with the figure and what to use instead.
    ``probe`` and ``cuda_choice`` replace the measurements (tests inject them).
    """
    if requested not in ("auto", "bf16", "fp16", "no"):
        raise ValueError(f"mixed_precision {requested!r}: expected auto, bf16, fp16 or no")
    device = pick_device(device)
    if device.type == "cuda":
        if requested != "auto":
            return Precision(requested, "set explicitly", requested)
        return dataclasses.replace((cuda_choice or gpu_choice)(device), requested="auto")
    if device.type != "cpu":
        return Precision("no" if requested == "auto" else requested,
                         f"{device.type}: no autocast measurement for this device", requested)
    if requested in ("no", "fp16"):
        return Precision(requested, "set explicitly", requested)
    speedup = cpu_bf16_speedup(probe)
    measured = f"bf16 autocast measured {speedup:.2f}× fp32 on this CPU"
    if requested == "bf16":
        if speedup < 1.0:
            warnings.warn(f"mixed_precision=bf16 on a CPU where {measured} (no native bf16: matmuls fall to a "
                          "slow fallback); use train.mixed_precision=auto or no", RuntimeWarning, stacklevel=2)
        return Precision("bf16", f"set explicitly ({measured})", "bf16", speedup)
    if speedup >= MIN_SPEEDUP:
        return Precision("bf16", measured, "auto", speedup)
    return Precision("no", measured + (" (no native bf16)" if speedup < 1 else f" (< {MIN_SPEEDUP}×, not worth it)"),
                     "auto", speedup)


def decide_for_run(requested: str, cpu: bool = False) -> Precision:
    """``decide`` for a training run, the same answer in every process of a multi-process launch.

    Each process could time its own probe and, near the threshold, disagree; the main process
    decides and the others take its answer (accelerate's process group is set up here if needed).
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=cpu)
    choice = [decide(requested, state.device) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    return choice[0]


if __name__ == "__main__":
    print(decide(os.environ.get("MIXED_PRECISION", "auto")).line())
