"""Every per-device decision of a stage, made in one place: device, precision, KL chunks, compile, TF32, syncs.

    python -m python3_distillation.device_plan        # prints this machine's plan, one line per decision

Each stage logs its plan at its start (``precision: bf16 — why``, then compile, then the device).
Explained in README.md, "Precision, resume and reproducibility" and "On a GPU: one device plan, and
`make gpu-check`". Design notes: docs/design/training.md.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable

import torch

from python3_distillation.errors import GenerationError

# bf16 must beat fp32 by this much on the probe to be chosen: autocast also pays for casting the
# weights every step, so a small matmul gain can be a net loss for the whole training step.
MIN_SPEEDUP = 1.25
# A probe's bf16 matmul slower than this multiple of fp32 means the scalar fallback: stop there.
SLOW_PATH = 0.2
# Logits per KL chunk on CPU: 16 rows of GPT-2's 50,257-token vocabulary, 3.2 MB per fp32
# temporary, so a worker's few live temporaries stay near its core's cache (2 MB L2 per core, 32 MB
# L3 on the 2-core dev box). Measured there, fwd+bwd of 1024 fp32 rows with 2 workers (load ~4):
# 8 rows 0.59 s, 16 rows 0.44 s, 32 rows 0.44 s, 64 rows 0.70 s, naive graph 2.2 s. Counted in
# elements so a tiny test vocabulary gets big chunks instead of thousands of Python iterations.
CPU_KD_CHUNK_ELEMENTS = 16 * 50257
# On CUDA a chunk is a fixed set of kernel launches (~5 µs each), so small chunks are pure overhead:
# 1,024 GPT-2 rows = 51.5M logits, 206 MB per fp32 temporary (a few live at once: ~1 GB), which
# takes ~60 µs to stream at 3.35 TB/s (H100 SXM), well above the launch cost.
CUDA_KD_CHUNK_ELEMENTS = 1024 * 50257
GPT2_VOCAB = 50257


def pick_device(device: str | torch.device | None = None, *, cpu: bool = False) -> torch.device:
    """Every stage's device: ``device`` when given; else CUDA when available and ``cpu`` (``train.cpu``) unset."""
    if device:  # None or "" (an unset setting): the rule below
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


@dataclasses.dataclass(frozen=True)
class Precision:
    """The mixed-precision mode to use (``"no"`` = fp32, ``"bf16"``, ``"fp16"``) and why."""

    mode: str
    reason: str
    requested: str = "auto"
    bf16_speedup: float | None = None  # fp32 time ÷ bf16 autocast time on the probe (>1 = bf16 faster)

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
    """fp32 time ÷ bf16-autocast time of a training-shaped ``F.linear`` on this CPU (>1: bf16 faster); a small
    matmul first, so a CPU on the scalar fallback pays milliseconds, not seconds (docs/design/training.md)."""
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
            return small if small < SLOW_PATH else ratio(512, 768, 768, 16)
    finally:
        torch.set_num_threads(threads)


_CPU_PROBE: float | None = None  # the probe's answer, measured once per process


def native_bf16(device: torch.device | str) -> bool:
    """Whether this GPU does bf16 matmuls in hardware (CUDA compute capability ≥ 8.0: A100, L4, H100; not
    ``torch.cuda.is_bf16_supported()`` alone: docs/design/training.md)."""
    major, _ = torch.cuda.get_device_capability(device)
    rocm = bool(getattr(torch.version, "hip", None))  # ROCm: torch knows per GPU architecture
    return (rocm or major >= 8) and bool(torch.cuda.is_bf16_supported(including_emulation=False))


def gpu_choice(device: torch.device) -> Precision:
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    if native_bf16(device):
        return Precision("bf16", f"{name} (compute capability {major}.{minor}) has native bf16")
    if major >= 7:
        return Precision("fp16", f"{name} (compute capability {major}.{minor}) has fp16 tensor cores but no bf16")
    return Precision("no", f"{name} (compute capability {major}.{minor}) has neither bf16 nor fp16 tensor cores")


def decide(requested: str = "auto", device: torch.device | str | None = None, probe: Callable[[], float] | None = None,
           cuda_choice: Callable[[torch.device], Precision] | None = None) -> Precision:
    """The precision for ``requested`` (``auto``/``bf16``/``fp16``/``no``) on ``device``.

    ``auto``: CUDA → ``cuda_choice`` (default ``gpu_choice``); CPU → bf16 if ``probe`` (default
    ``probe_cpu_bf16``) measures it ≥ ``MIN_SPEEDUP``× fp32, else fp32. An explicit choice is kept; an
    explicit ``bf16`` that the probe finds slower than fp32 on a CPU warns, with the figure.
    """
    global _CPU_PROBE
    if requested not in ("auto", "bf16", "fp16", "no"):
        raise ValueError(f"mixed_precision {requested!r}: expected auto, bf16, fp16 or no")
    device = pick_device(device)
    if device.type == "cuda" and requested == "auto":
        return dataclasses.replace((cuda_choice or gpu_choice)(device), requested="auto")
    if device.type not in ("cuda", "cpu"):
        return Precision("no" if requested == "auto" else requested,
                         f"{device.type}: no autocast measurement for this device", requested)
    if device.type == "cuda" or requested in ("no", "fp16"):
        return Precision(requested, "set explicitly", requested)
    if probe is None and _CPU_PROBE is None:
        _CPU_PROBE = probe_cpu_bf16()
    speedup = _CPU_PROBE if probe is None else probe()
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
    """``decide`` for a training run: the main process decides and the other processes of a launch take
    its answer (their own probes could disagree near the threshold); sets up accelerate's process group."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=cpu)
    choice = [decide(requested, state.device) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    return choice[0]


def kd_chunk_elements(device: torch.device | str | None = None) -> int:
    """Logits per chunk of the chunked KL (losses.py) on ``device`` (None = CPU)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    return CUDA_KD_CHUNK_ELEMENTS if cuda else CPU_KD_CHUNK_ELEMENTS


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(has_triton())


def decide_compile(requested: str, device: torch.device | str,
                   has_triton: Callable[[], bool] = _has_triton) -> tuple[bool, str]:
    """(compile?, why) for ``train.compile``. ``auto`` is a rule, not a measurement (docs/design/training.md).

    On for CUDA of compute capability ≥ 7.0 with triton importable (block by block: ``compile_blocks``), else off.
    """
    if requested not in ("auto", "on", "off"):
        raise ValueError(f"train.compile {requested!r}: expected auto, on or off")
    device = torch.device(device)
    if requested != "auto":
        return requested == "on", "set explicitly"
    if device.type != "cuda":
        return False, (f"{device.type}: eager (compiling costs minutes of a short CPU run and the chunked KL "
                       "runs outside the graph)")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return False, f"compute capability {major}.{minor} < 7.0: inductor's triton kernels need 7.0"
    if not has_triton():
        return False, "triton is not importable: inductor has no GPU code generator here"
    return True, f"CUDA (compute capability {major}.{minor}) with triton: each transformer block compiled"


def compile_blocks(model: torch.nn.Module) -> int:
    """Regional ``torch.compile``: each GPT-2 block's forward compiled in place (``Module.compile``; one
    graph reused by every block, compiled in seconds), so names, state_dict, the optimizer's parameters
    and the checkpoints stay the eager model's. Returns how many blocks."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        return 0
    for block in blocks:
        block.compile()
    return len(blocks)


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """Every per-device decision of a stage, and the lines that log it."""

    device: str
    precision: Precision
    compile: bool = False
    compile_reason: str = "not requested"
    compile_requested: str = "off"

    @property
    def is_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    # TF32 for fp32 matmuls, pinned host buffers (only then is ``non_blocking=True`` asynchronous)
    # and the next batch prefetched: CUDA only.
    tf32 = pin_memory = prefetch = is_cuda

    @property
    def kd_chunk_elements(self) -> int:
        return kd_chunk_elements(self.device)

    def device_line(self, log_every: int | None = None) -> str:
        rows = max(1, self.kd_chunk_elements // GPT2_VOCAB)
        parts = [f"KL in chunks of {rows:,} rows of a {GPT2_VOCAB:,}-token vocabulary"]
        parts.append("TF32 for fp32 matmuls" if self.tf32 else "fp32 matmuls in fp32")
        parts.append("next batch prefetched from pinned memory" if self.prefetch else "batches gathered in place")
        if log_every:
            parts.append(f"losses read back every {log_every} step{'s' if log_every > 1 else ''} (train.log_every)")
        return f"device: {self.device} — " + "; ".join(parts)

    def lines(self, log_every: int | None = None) -> list[str]:
        """What a stage logs at its start: the precision line, then compile, then the device line."""
        return [self.precision.line(), f"compile: {'on' if self.compile else 'off'} — {self.compile_reason}",
                self.device_line(log_every)]

    def apply(self) -> None:
        """Process-wide switches this plan needs (TF32 on CUDA; nothing on CPU)."""
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True

    def to_dict(self) -> dict:
        return {"device": self.device, "precision": self.precision.to_dict(),
                "compile": {"on": self.compile, "requested": self.compile_requested, "reason": self.compile_reason},
                "kd_chunk_elements": self.kd_chunk_elements, "tf32": self.tf32, "prefetch": self.prefetch}


def plan(device: torch.device | str, precision: Precision | None = None, mixed_precision: str = "auto",
         compile: str = "off", has_triton: Callable[[], bool] = _has_triton) -> DevicePlan:
    """The plan for ``device``; ``precision`` is taken as given (train.py decides it once for all
    processes of a launch), else decided here from ``mixed_precision``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    precision = precision or decide(mixed_precision, device)
    on, why = decide_compile(compile, device, has_triton)
    return DevicePlan(str(device), precision, on, why, compile)


SERVING_DTYPES = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"bfloat16"``, ``torch.float16``… → a torch dtype (None / ``"auto"`` → None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise GenerationError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


def serving_dtype(requested: str, device: torch.device | str, int8: bool = False) -> tuple[torch.dtype | None, str]:
    """(dtype to serve in, why) on ``device``. ``None`` keeps the folder's own weights (int8 on CPU).

    ``auto``: CUDA → ``gpu_choice``; CPU → fp32 (bf16 decoding is fast only with native bf16; the
    README's CPU speeds are fp32). An int8 folder is a CPU format: CUDA lacks PyTorch's int8 weight-only
    kernel, so there it is dequantized once at load rather than per call, and served in the ``auto`` dtype.
    """
    if requested not in SERVING_DTYPES:
        raise ValueError(f"dtype {requested!r}: expected one of {', '.join(SERVING_DTYPES)}")
    device = torch.device(device)
    if device.type != "cuda":
        if requested == "auto":
            return (None, "int8 kernels on CPU") if int8 else (torch.float32, f"{device.type}: fp32")
        why = f"set explicitly: int8 dequantized once at load to {requested}" if int8 else "set explicitly"
        return DTYPES[requested], why
    suffix = " (int8 is a CPU format: dequantized once at load, served on CUDA in this dtype)" if int8 else ""
    if requested != "auto":
        return DTYPES[requested], "set explicitly" + suffix
    choice = gpu_choice(device)
    return DTYPES.get(choice.mode, torch.float32), choice.reason + suffix  # mode "no": fp32


if __name__ == "__main__":
    print(*plan(pick_device(), mixed_precision=os.environ.get("MIXED_PRECISION", "auto"),
                compile=os.environ.get("COMPILE", "auto")).lines(), sep="\n")
