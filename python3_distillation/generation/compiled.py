"""A compiled decode step: GPT-2's whole step, token embedding to next-token logits, as one call.

    HF_HUB_OFFLINE=1 DISTILL_COMPILE=1 python python3_distillation/distill_infer_v2.py "Emma"

Opt-in (``Generator(..., compile=True)`` or ``DISTILL_COMPILE=1``). ``CompiledGPT2Decoder`` is
``GPT2Decoder`` with the same cache layout; prefill stays eager, and each ``step`` is one call of a
``torch.compile``d graph (inductor) for the whole batch. Why: at batch 1 the eager step of the
6 × d256 student is ~640 ATen calls (fp32) / ~870 (int8) from Python, which left 28% (int8) and 48%
(fp32) of the step to Python, dispatch and small ops on this 2-core machine; the compiled step took
1.79 ms (int8) and 4.62 ms (fp32) against 2.37 and 5.3 (benchmarks/bench_compiled.py).

Shapes are bucketed so that rows joining and leaving do not recompile every step: the graph runs on
the next power of two ≥ the live rows (padding rows' output is dropped) and on the cache's full
column capacity, a power of two, with a mask; the new key/value is written in place at the current
column (``index_copy_``, kept in place by inductor). One graph per (rows, columns) bucket, compiled
once per process (``dynamic=False``), on first use or ahead by ``CompiledStep.warm``. int8 models
(int8.py) stay int8 inside the graph: inductor lowers ``aten._weight_int8pack_mm`` to that same kernel.

CUDA (untested here): the step has no data-dependent control flow and mutates only the decoder's own
tensors, so it is captured as a CUDA graph (``mode="reduce-overhead"``), those tensors marked static.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch._dynamo
import torch._inductor
import torch._inductor.config
import torch.nn.functional as F

from python3_distillation.generation.decoders import GPT2Decoder, additive, float_logits, module_spec
from python3_distillation.int8 import int8_kernel_works

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


def bucket(n: int, least: int = 1) -> int:
    """The smallest power of two ≥ ``max(n, least)``."""
    n = max(n, least, 1)
    return 1 << (n - 1).bit_length()


# ------------------------------------------------------------------------------------ the graph


class StepGraph(torch.nn.Module):
    """GPT-2's decode step as one function of tensors, for ``torch.compile``.

    ``forward(tokens [B], pos [B], col [1], valid [B, C] bool, *cache)`` → float32 logits [B, V];
    ``cache`` is one [B, 2, n_head, C, head dim] tensor per layer, written at column ``col``; the
    step also sets ``valid[:, col]`` and advances ``pos`` (in place: fewer calls outside the graph). The
    weights are buffers ``{module}_{i}`` sharing the model's storage (no copy), so inductor sees them as constants.
    """

    def __init__(self, model, head_t: torch.Tensor | None = None):
        super().__init__()
        cfg, tr = model.config, model.transformer
        self.n_head, self.d = cfg.n_head, cfg.n_embd
        self.dh = self.d // self.n_head
        self.max_pos = cfg.n_positions - 1
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
        # decoders.cpu_head_t: the float head transposed, for batch 1 (a gemv on the stored weight
        # runs at a fraction of memory speed on CPU).
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
            o = F.scaled_dot_product_attention(qkv[:, 0], kv[:, 0], kv[:, 1], attn_mask=mask,
                                               scale=self.scales[i])  # [B, nh, 1, dh]
            h = h + self._mm(f"h{i}_out", o.reshape(b, d))
            x = self._mm(f"h{i}_fc", self._ln(f"h{i}_ln2", h))
            h = h + self._mm(f"h{i}_proj", F.gelu(x, approximate="tanh"))
        pos.add_(1)  # every row's next position (padding rows' are never read)
        return self._head(self._ln("ln_f", h))


# ------------------------------------------------------------------------------- compiled step


class CompiledStep:
    """One model's ``StepGraph`` under ``torch.compile``: a graph per (rows, columns) bucket.

    ``options``/``mode`` are torch.compile's; ``compile_seconds`` records the first call of every
    bucket (compile + one run). The default, plain inductor, was the fastest measured
    (benchmarks/bench_compiled.py, a busy 2-core machine): cpp_wrapper was within noise of it (int8
    batch 1: 1.72 vs 1.79 ms a step) and adds ~2.5 s to each bucket's compile; max-autotune + freezing
    picks inductor's C++ int8 GEMM for the block matmuls (2× the ATen kernel per call when the machine
    is quiet) but took 18–28 s a bucket, its choices are benchmarks that a busy machine makes random,
    and frozen weights are packed again per bucket.
    """

    def __init__(self, model, head_t: torch.Tensor | None = None, mode: str | None = None,
                 options: dict | None = None):
        self.graph = StepGraph(model, head_t).eval()
        self.device = next(iter(self.graph.buffers())).device
        self.mode, self.options = mode, dict(options or {})
        if self.device.type == "cuda" and mode is None and options is None:
            self.mode = "reduce-overhead"
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                               RECOMPILE_LIMIT)
        # ``freezing`` (weights as constants, fp32 linears prepacked for MKL) takes effect only from
        # inductor's global config, not from torch.compile's options: it is set around each compile.
        self.freezing = bool(self.options.get("freezing", False))
        rest = {k: v for k, v in self.options.items() if k != "freezing"}
        if rest and self.mode is not None:  # torch.compile takes one or the other: the mode as options
            kwargs = {"options": {**torch._inductor.list_mode_options(self.mode), **rest}}
        else:
            kwargs = {"mode": self.mode, "options": rest or None}
        self.fn = torch.compile(self.graph, dynamic=False, fullgraph=True, **kwargs)
        self.compile_seconds: dict[tuple[int, int], float] = {}

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

    def __call__(self, tokens, pos, col, valid, cache) -> torch.Tensor:
        key = tuple(valid.shape)
        if key in self.compile_seconds:
            return self.fn(tokens, pos, col, valid, *cache)
        if self.mode == "reduce-overhead":
            # A CUDA graph replays fixed addresses: the tensors the step mutates must be those
            # addresses (the decoder keeps them until a reallocation); the rest is copied in.
            for t in (pos, valid, *cache):
                torch._dynamo.mark_static_address(t)
        t0 = time.perf_counter()
        with torch._inductor.config.patch(freezing=self.freezing):
            out = self.fn(tokens, pos, col, valid, *cache)
        self.compile_seconds[key] = time.perf_counter() - t0
        log.info("compiled the decode step for %d rows × %d columns in %.1f s", *key, self.compile_seconds[key])
        return out

    @torch.inference_mode()
    def warm(self, buckets: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
        """Compile (rows, columns) buckets ahead of use, on zero inputs; returns seconds per bucket."""
        g = self.graph
        dtype = g.ln_f_0.dtype
        for rows, cols in buckets:
            rows, cols = bucket(rows), bucket(cols, MIN_COLUMNS)
            if (rows, cols) in self.compile_seconds:
                continue
            cache = [torch.zeros(rows, 2, g.n_head, cols, g.dh, dtype=dtype, device=self.device)
                     for _ in g.scales]
            valid = torch.ones(rows, cols, dtype=torch.bool, device=self.device)
            # Distinct tensors, as in a real step: dynamo guards on inputs aliasing each other.
            tokens, pos = (torch.zeros(rows, dtype=torch.long, device=self.device) for _ in range(2))
            self(tokens, pos, torch.zeros(1, dtype=torch.long, device=self.device), valid, cache)
        return dict(self.compile_seconds)


# ------------------------------------------------------------------------------------- decoder


class CompiledGPT2Decoder(GPT2Decoder):
    """``GPT2Decoder`` whose steps run ``CompiledStep``; prefill, joining and leaving are unchanged.

    The cache storage is always a bucket: rows and columns powers of two (columns ≥ MIN_COLUMNS),
    grown only when a step needs it (not reserved ahead: every step attends over the whole column
    capacity, so unused columns cost), with a quarter of the need as headroom.
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
