"""How a stage runs on the device at hand, decided in one place: precision, KL chunks, compile, TF32, syncs.

    python -m python3_distillation.device_plan        # prints this machine's plan, one line per decision

Training, distillation's KL, the teacher cache, the report and serving read their device decisions
from here (the device itself and the precision: precision.py), and each stage logs them at its start
in the style of the precision line (``precision: bf16 — why``). TF32: fp32 matmuls on CUDA use TF32
tensor cores through ``torch.backends.cuda.matmul.allow_tf32``, not
``torch.set_float32_matmul_precision("high")``, which also switches oneDNN's CPU matmuls to TF32 and
would change CPU numerics. On CUDA each batch is gathered into pinned host memory and its copy issued
before the previous step has finished (train.BatchPrefetcher); on every device the loss terms stay on
the device and are read back only at ``train.log_every``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

from python3_distillation.errors import GenerationError
from python3_distillation.precision import Precision, decide, gpu_choice, pick_device

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

COMPILE_CHOICES = ("auto", "on", "off")


def kd_chunk_elements(device: torch.device | str | None = None) -> int:
    """Logits per chunk of the chunked KL (losses.py) on ``device`` (None = CPU)."""
    return CUDA_KD_CHUNK_ELEMENTS if device is not None and torch.device(device).type == "cuda" else CPU_KD_CHUNK_ELEMENTS


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(has_triton())


def decide_compile(requested: str, device: torch.device | str,
                   has_triton: Callable[[], bool] = _has_triton) -> tuple[bool, str]:
    """(compile?, why) for ``train.compile``. ``auto`` is a rule, not a measurement:

    - CPU → off. Inductor's CPU code needs a C++ compiler at run time, and its first step compiles for
      minutes on a small CPU; a third of a distillation step here is the KL (FACTS: ~2 s of 7.7 s for
      12L → 6L d768), which runs in the chunk pool outside any graph. The CPU numbers in the README
      are eager.
    - CUDA with compute capability ≥ 7.0 and triton importable → on: each transformer block is
      compiled on its own (regional ``torch.compile``: one graph reused by every block, compiled in
      seconds; the module tree, its state_dict and the checkpoints stay those of the eager model).
    - CUDA without triton or below 7.0 → off (inductor's GPU kernels are triton kernels).
    ``has_triton`` is injected by tests.
    """
    if requested not in COMPILE_CHOICES:
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

    def compile_line(self) -> str:
        return f"compile: {'on' if self.compile else 'off'} — {self.compile_reason}"

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
        return [self.precision.line(), self.compile_line(), self.device_line(log_every)]

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


def compile_blocks(model: torch.nn.Module) -> int:
    """Regional ``torch.compile``: each GPT-2 block's forward compiled in place (``Module.compile``),
    so names, state_dict and the optimizer's parameters are unchanged. Returns how many blocks."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        return 0
    for block in blocks:
        block.compile()
    return len(blocks)


# --------------------------------------------------------------------------------------- serving

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

    ``auto``: CUDA → the training precision's capability rule (precision.py: bf16 on native bf16,
    fp16 on older tensor-core GPUs, fp32 otherwise); CPU → fp32 (bf16 decoding on CPU is only fast
    with native bf16, and fp32 is what the README's CPU speeds are). An int8 folder is a CPU format:
    on CUDA PyTorch's int8 weight-only kernel is missing and the int8 layers would dequantize every
    whole weight on every call, so it is dequantized once at load and served in the ``auto`` dtype.
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
