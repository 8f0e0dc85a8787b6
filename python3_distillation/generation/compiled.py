"""A compiled decode step: GPT-2's whole step, token embedding to next-token logits, as one call.

    HF_HUB_OFFLINE=1 DISTILL_COMPILE=1 python python3_distillation/distill_infer_v2.py "Emma"

``CompiledGPT2Decoder`` is ``GPT2Decoder`` whose ``step`` is one call for the whole batch (``CompiledStep``);
prefill stays eager. When it is used and what it gains: README.md, "Serving" and "Benchmarks"; engines,
buckets and exactness: docs/design/generation.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor
import torch._inductor.config
import torch.nn.functional as F

from python3_distillation.generation.decoders import GPT2Decoder, additive, float_logits, gpt2_shape, module_spec
from python3_distillation.fsio import atomic_dir
from python3_distillation.int8 import int8_kernel_works
from python3_distillation.paths import data_dir

log = logging.getLogger(__name__)

ENV = "DISTILL_COMPILE"
MIN_COLUMNS = 16  # the smallest column bucket (a prompt of a few tokens)
# One cache entry per bucket and model; dynamo's default of 8 per code object would fall back to
# eager after 8 buckets (e.g. rows {1, 2, 4, 8} × columns {128, 256}).
RECOMPILE_LIMIT = 256


def env_wants_compile(env: dict | None = None) -> bool:
    """``DISTILL_COMPILE`` = 1/true/yes/on (case-insensitive) asks for the compiled step."""
    value = (os.environ if env is None else env).get(ENV, "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use here, or None (then the CPU step cannot be compiled)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler()
    except Exception:  # inductor raises its own error types when it finds none
        return None


def bucket(n: int, least: int = 1) -> int:
    """The smallest power of two ≥ ``max(n, least)``."""
    return 1 << (max(n, least, 1) - 1).bit_length()


class StepGraph(torch.nn.Module):
    """GPT-2's decode step as one function of tensors.

    ``forward(tokens [B], pos [B], col [1], valid [B, C] bool, *cache)`` → float32 logits [B, V]; ``cache``
    is one [B, 2, n_head, C, head dim] tensor per layer, written at column ``col``; the step also sets
    ``valid[:, col]`` and advances ``pos`` (in place: fewer calls outside the graph). The weights are
    buffers ``{module}_{i}`` sharing the model's storage (no copy), so inductor sees them as constants.
    """

    def __init__(self, model, head_t: torch.Tensor | None = None):
        super().__init__()
        tr = model.transformer
        self.n_head, self.d, self.dh, self.max_pos = gpt2_shape(model.config)
        self.eps = tr.ln_f.eps  # GPT-2's layer norms all take config.layer_norm_epsilon
        self.scales = [float(b.attn.scaling) for b in tr.h]
        embed, norm, proj = ("embed", "int8_embed"), ("ln",), ("addmm", "linear", "int8")
        modules = {"wte": (tr.wte, embed), "wpe": (tr.wpe, embed), "ln_f": (tr.ln_f, norm),
                   "head": (model.lm_head, ("linear", "int8"))}
        for i, b in enumerate(tr.h):
            modules.update({f"h{i}_ln1": (b.ln_1, norm), f"h{i}_ln2": (b.ln_2, norm),
                            f"h{i}_qkv": (b.attn.c_attn, proj), f"h{i}_out": (b.attn.c_proj, proj),
                            f"h{i}_fc": (b.mlp.c_fc, proj), f"h{i}_proj": (b.mlp.c_proj, proj),
                            f"h{i}_act": (b.mlp.act, ("gelu",))})
        self.kinds: dict[str, str] = {}
        for name, (module, kinds) in modules.items():
            spec = module_spec(module)
            # The head has no bias (float_logits and the int8 head multiply only).
            if spec is None or spec[0] not in kinds or (name == "head" and spec[1][-1] is not None):
                raise TypeError(f"no compiled form for {name}")
            self.kinds[name] = spec[0]
            for j, t in enumerate(spec[1]):
                self.register_buffer(f"{name}_{j}", t, persistent=False)
        # decoders.cpu_head_t: the float head transposed, for batch 1.
        self.register_buffer("head_t", head_t if self.kinds["head"] == "linear" else None, persistent=False)

    def _ln(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.d,), getattr(self, f"{name}_0"), getattr(self, f"{name}_1"), self.eps)

    def _mm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        kind = self.kinds[name]
        if kind == "addmm":
            return torch.addmm(getattr(self, f"{name}_1"), x, getattr(self, f"{name}_0"))
        if kind == "linear":
            return F.linear(x, getattr(self, f"{name}_0"), getattr(self, f"{name}_1"))
        # int8 (int8.int8_matmul): bf16 activations, int8 weights, a bf16 scale per output channel.
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), getattr(self, f"{name}_0"),
                                               getattr(self, f"{name}_1")).to(x.dtype)
        b = getattr(self, f"{name}_2")
        return y if b is None else y + b.to(y.dtype)

    def _embed(self, name: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.kinds[name] == "embed":
            return F.embedding(ids, getattr(self, f"{name}_0"))
        # Int8Embedding: only the rows read are dequantized.
        q, scale = getattr(self, f"{name}_0"), getattr(self, f"{name}_1")
        return (q[ids].float() * scale[ids].unsqueeze(-1)).to(dtype)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.kinds["head"] == "linear":
            return float_logits(h, self.head_0, self.head_t)
        return self._mm("head", h).float()  # Int8LMHead: its table's product, in h's dtype

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, col: torch.Tensor, valid: torch.Tensor,
                *cache: torch.Tensor) -> torch.Tensor:
        dtype = self.ln_f_0.dtype
        b, d, nh, dh = tokens.shape[0], self.d, self.n_head, self.dh
        # The new column is visible to every row (padding rows too: no softmax row is empty, NaN).
        valid.index_fill_(1, col, True)
        # Finished rows still in the batch (and padding rows) may run past the context; unused.
        h = self._embed("wte", tokens, dtype) + self._embed("wpe", pos.clamp(max=self.max_pos), dtype)  # [B, d]
        mask = additive(valid[:, None, None], dtype)  # [B, 1, 1, C]
        for i, kv in enumerate(cache):
            qkv = self._mm(f"h{i}_qkv", self._ln(f"h{i}_ln1", h)).view(b, 3, nh, 1, dh)
            kv.index_copy_(3, col, qkv[:, 1:])  # keys and values of the new token at column col, in place
            # Attention as two matmuls and a softmax, not scaled_dot_product_attention: inductor
            # lowers SDPA to ATen's flash kernel (one call per layer, ~20 µs at one query), while these
            # it generates itself (int8 batch 1: 0.77 against 0.85 ms a step; batch 8: 1.46 against 1.66).
            a = torch.softmax((qkv[:, 0] @ kv[:, 0].transpose(-1, -2)) * self.scales[i] + mask, -1)
            o = a @ kv[:, 1]  # [B, nh, 1, dh]
            h = h + self._mm(f"h{i}_out", o.reshape(b, d))
            x = self._mm(f"h{i}_fc", self._ln(f"h{i}_ln2", h))
            h = h + self._mm(f"h{i}_proj", F.gelu(x, approximate="tanh"))
        pos.add_(1)  # every row's next position (padding rows' are never read)
        return self._head(self._ln("ln_f", h))


def package_key(graph: torch.nn.Module, options: dict) -> str:
    """A digest of what a compiled package depends on.

    ``options``, torch's version and this CPU's instruction set (inductor compiles for the CPU it runs on;
    a package built elsewhere could fault here), this file, and the graph's buffers (names and bytes).
    """
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    machine = f"{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{platform.machine()}|{flags}"
    h = hashlib.blake2b(digest_size=16)
    for part in (repr(sorted(options.items())), machine, Path(__file__).read_text()):
        h.update(part.encode())
    for name, t in graph.named_buffers():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# int8 models on CPU: inductor's C++ GEMM template (AMX / AVX-512 / AVX2 micro-kernels, the scale
# fused as an epilogue) in place of the ATen int8 kernel. It needs the weights as constants
# (freezing). Only that backend is offered, so nothing is benchmarked while compiling: the choice does
# not depend on how busy the machine is. Float models: freezing (linears prepacked for oneDNN).
CPU_INT8_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP", "freezing": True}
CPU_FLOAT_OPTIONS = {"freezing": True}


class CompiledStep:
    """One model's ``StepGraph``, compiled: ``step(tokens, pos, col, valid, cache) → logits``.

    ``engine``: ``"aoti"`` (AOTInductor, the default on CPU: one package for 1 row, one for 2+, kept in
    ``<data dir>/compiled/`` under ``package_key``) or ``"dynamo"`` (``torch.compile`` per (rows, columns)
    bucket, the default on CUDA); why each: docs/design/generation.md.
    ``options``: inductor's (defaults ``CPU_*_OPTIONS`` for AOTInductor, none for dynamo).
    ``compile_seconds``: each bucket's first call (compile or load + one run), keyed by rows for
    AOTInductor (``1`` or ``"2+"``), by (rows, columns) for dynamo.
    """

    def __init__(self, model, head_t: torch.Tensor | None = None, engine: str | None = None,
                 options: dict | None = None, cache_dir: str | Path | None = None):
        self.device = next(model.parameters()).device
        self.engine = engine or ("dynamo" if self.device.type == "cuda" else "aoti")
        if self.engine not in {"aoti", "dynamo"}:
            raise ValueError(f"unknown engine {self.engine!r}; expected aoti or dynamo")
        # Frozen float linears are prepacked: the transposed head copy gains nothing there (1.49 vs
        # 1.50 ms a batch-1 step) and would add its 51 MB to every package.
        self.graph = StepGraph(model, head_t if self.engine == "dynamo" else None).eval()
        int8 = "int8" in self.graph.kinds.values()
        if options is None:
            options = {} if self.engine == "dynamo" else dict(CPU_INT8_OPTIONS if int8 else CPU_FLOAT_OPTIONS)
        self.options = dict(options)
        self.compile_seconds: dict = {}
        self._runners: dict = {}  # AOTInductor: rows key → loaded package
        self._lock = threading.Lock()
        if self.engine == "aoti":
            self.cache_dir = Path(cache_dir) if cache_dir is not None else data_dir() / "compiled"
            self.key = package_key(self.graph, self.options)
            return
        self.mode = "reduce-overhead" if self.device.type == "cuda" and not self.options else None
        for limit in ("recompile_limit", "accumulated_recompile_limit"):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
        self.fn = torch.compile(self.graph, dynamic=False, fullgraph=True, mode=self.mode,
                                options=self.options or None)

    @staticmethod
    def supports(model) -> bool:
        """A model ``GPT2Decoder`` supports, each of whose modules has a compiled form (float or int8)."""
        if not GPT2Decoder.supports(model):
            return False
        try:
            graph = StepGraph(model)
        except TypeError:
            return False
        return "int8" not in graph.kinds.values() or int8_kernel_works(graph.ln_f_0.device)

    def _bucket(self, valid: torch.Tensor):
        return (1 if valid.shape[0] == 1 else "2+") if self.engine == "aoti" else tuple(valid.shape)

    def __call__(self, tokens, pos, col, valid, cache) -> torch.Tensor:
        key = self._bucket(valid)
        if key in self.compile_seconds:
            if self.engine == "aoti":
                return self._runners[key]([tokens, pos, col, valid, *cache])[0]
            return self.fn(tokens, pos, col, valid, *cache)
        t0 = time.perf_counter()
        if self.engine == "aoti":
            out = self._runner(key, tokens, pos, col, valid, cache)([tokens, pos, col, valid, *cache])[0]
        else:
            if self.mode == "reduce-overhead":
                # A CUDA graph replays fixed addresses: the tensors the step mutates must be those
                # addresses (the decoder keeps them until a reallocation); the rest is copied in.
                for t in (pos, valid, *cache):
                    torch._dynamo.mark_static_address(t)
            out = self.fn(tokens, pos, col, valid, *cache)
        self.compile_seconds[key] = time.perf_counter() - t0
        log.info("decode step for %s rows ready in %.1f s", key, self.compile_seconds[key])
        return out

    def _runner(self, key, tokens, pos, col, valid, cache):
        """The package for ``key``: loaded from the cache folder, else exported, compiled and saved."""
        with self._lock:
            if key in self._runners:
                return self._runners[key]
            folder = self.cache_dir / f"{self.key}-rows{key}"
            if not (folder / "step.pt2").is_file():
                self._compile(folder, key, (tokens, pos, col, valid, tuple(cache)))
            package = torch._inductor.aoti_load_package(str(folder / "step.pt2"))
            # The loader's own entry point, a flat list of tensors in and out: the package's
            # ``__call__`` parses its call spec and walks pytrees on every call (~0.08 ms, an eighth
            # of an int8 step at batch 1).
            run = getattr(getattr(package, "loader", None), "boxed_run", None)
            self._runners[key] = run if run is not None else (lambda args: [package(*args)])
            return self._runners[key]

    @torch.inference_mode(False)  # exported from plain tensors: under inference mode the float linears
    def _compile(self, folder: Path, key, example: tuple) -> None:  # were not prepacked (2.05 vs 1.5 ms a step)
        cols = torch.export.Dim("columns", min=MIN_COLUMNS)
        if key == 1:
            shapes = (None, None, None, {1: cols}, tuple({3: cols} for _ in example[4]))
        else:
            rows = torch.export.Dim("rows", min=2)
            shapes = ({0: rows}, {0: rows}, None, {0: rows, 1: cols}, tuple({0: rows, 3: cols} for _ in example[4]))
        # Exported on copies: tracing runs the step, which writes to its inputs.
        *first, cache = example
        args = tuple(t.clone() for t in (*first, *cache))
        t0 = time.perf_counter()
        with torch.no_grad():  # the varargs' shapes nest as one tuple
            program = torch.export.export(self.graph, args, dynamic_shapes=shapes, strict=False)
        with atomic_dir(folder, "a compiled decode step") as tmp, \
                torch._inductor.config.patch(freezing=bool(self.options.get("freezing"))):
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp / "step.pt2"),
                                                     inductor_configs=self.options)
        log.info("compiled the decode step for %s rows in %.1f s → %s", key, time.perf_counter() - t0, folder)

    @torch.inference_mode()
    def warm(self, rows: list[int], columns: int = 2 * MIN_COLUMNS) -> dict:
        """Compile (or load) the buckets of ``rows`` (``columns``: dynamo's only) ahead of use → ``compile_seconds``."""
        g = self.graph
        dtype = g.ln_f_0.dtype
        for n in rows:
            n, cols = bucket(n), bucket(columns, MIN_COLUMNS)
            if self._bucket(torch.empty(n, cols)) in self.compile_seconds:
                continue
            cache = [torch.zeros(n, 2, g.n_head, cols, g.dh, dtype=dtype, device=self.device) for _ in g.scales]
            valid = torch.ones(n, cols, dtype=torch.bool, device=self.device)
            # Distinct tensors, as in a real step: dynamo guards on inputs aliasing each other.
            tokens, pos = (torch.zeros(n, dtype=torch.long, device=self.device) for _ in range(2))
            self(tokens, pos, torch.zeros(1, dtype=torch.long, device=self.device), valid, cache)
        return dict(self.compile_seconds)


class CompiledGPT2Decoder(GPT2Decoder):
    """``GPT2Decoder`` whose steps run ``CompiledStep``; prefill, joining and leaving are unchanged.

    The cache storage is always a bucket: rows and columns powers of two (columns ≥ MIN_COLUMNS), grown
    only when a step needs it (not reserved ahead: every step attends over the whole column capacity, so
    unused columns cost), with a quarter of the need as headroom.
    """

    def __init__(self, model, head_t: torch.Tensor | None = None, compiled: CompiledStep | None = None):
        super().__init__(model, head_t)
        self.compiled = compiled if compiled is not None else CompiledStep(model, head_t)
        self._tokens: torch.Tensor | None = None  # [rows] the step's input tokens
        self._views: tuple | None = None  # (rows, cache list, the graph's row views of the storage)

    def _grown(self, rows: int, cols: int) -> tuple[int, int]:
        cap_rows, cap_cols = self.capacity
        # Past the columns' capacity: columns no live row sees are cut off the left (``_fit``); a
        # bigger bucket only when the live span needs one (then a new graph, compiled once).
        if rows <= cap_rows and cols + cols // 4 <= cap_cols:
            return cap_rows, cap_cols
        return max(cap_rows, bucket(rows)), bucket(cols + cols // 4, MIN_COLUMNS)

    @torch.inference_mode()
    def add(self, ids: torch.Tensor, mask: torch.Tensor, room: int = 1) -> torch.Tensor:
        return super().add(ids, mask, 1)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._fit(self.n, 0, 1)
        t, n = self.t, self.n
        rows = min(bucket(n), self.capacity[0])
        views = self._views
        if views is None or views[0] != rows or views[1] is not self.cache:  # after a reallocation
            if self._tokens is None or self._tokens.shape[0] < rows:
                self._tokens = torch.zeros(self.capacity[0], dtype=torch.long, device=self.device)
            views = self._views = (rows, self.cache, self._tokens[:rows], self.pos[:rows], self.valid[:rows],
                                   [kv[:rows] for kv in self.cache])
        _, _, tok, pos, valid, cache = views
        # Inputs made here, under inference mode: dynamo's guards tell an inference tensor from a
        # plain one, and a caller's plain tensor would compile the bucket again.
        tok[:n] = tokens  # rows n..rows keep any earlier token: padding, never read
        logits = self.compiled(tok, pos, torch.full((1,), t, dtype=torch.long, device=self.device), valid, cache)
        self.t = t + 1
        return logits[:n]
