"""A compiled decode step: GPT-2's whole step, token embedding to next-token logits, as one call.

    HF_HUB_OFFLINE=1 python -m pytest tests/generation/test_compiled.py -q
    HF_HUB_OFFLINE=1 DISTILL_COMPILE=1 python python3_distillation/distill_infer_v2.py "Emma"

Opt-in (``Generator(..., compile=True)`` or ``DISTILL_COMPILE=1``). ``CompiledGPT2Decoder`` is
``GPT2Decoder`` with the same cache layout and the same ``add``/``step``/``remove``/``reserve``:
prefill stays on the eager path, writing straight into the cache; each ``step`` is one call of a
``torch.compile``d graph (inductor) for the whole batch. Why: at batch 1 the eager step of the
6 × d256 student is ~640 ATen calls (fp32) / ~870 (int8) from Python; measured on this 2-core
machine (1 thread, busy), the LM head, the 24 projections and the 6 attentions timed alone left
28% (int8, 0.67 of 2.37 ms) and 48% (fp32, 2.6 of 5.3 ms) of the step to Python, dispatch and
small ops; the compiled step took 1.79 and 4.62 ms (benchmarks/bench_compiled.py measures it).

Shapes are bucketed so that rows joining and leaving do not recompile every step: the graph runs
on ``rows`` = the next power of two ≥ the live rows (the rows above are padding whose output is
dropped) and on the cache's full column capacity, a power of two, with a mask; the new key/value is
written in place at the current column (``index_copy_``, which inductor keeps in place: no copy of
the cache). One graph per (rows, columns) bucket, compiled once per process (``dynamic=False``), on
first use or ahead by ``CompiledStep.warm``.

int8 models (quantize.py) stay int8 inside the graph: their matmuls are ``aten._weight_int8pack_mm``,
which inductor lowers to that same kernel (or, under max-autotune, to its C++ GEMM template over
the int8 weights); the weights are never dequantized.

CUDA: the step has no data-dependent control flow and mutates only the decoder's own tensors (the
cache, the column mask, the positions), so it can be captured as a CUDA graph
(``mode="reduce-overhead"``, the default there); those tensors are marked static
(``torch._dynamo.mark_static_address``) so the captured graph writes into them directly. Only the
CPU path is tested here.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

from python3_distillation.generation.decoders import GPT2Decoder

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


def _proj_spec(module) -> tuple[str, tuple] | None:
    """How to run one projection inside the graph: (kind, tensors), or None for an unknown module."""
    from transformers.pytorch_utils import Conv1D

    from python3_distillation.quantize import Int8Linear

    def plain(t) -> bool:
        return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype.is_floating_point)

    if type(module) is Conv1D and plain(module.weight) and module.bias is not None and plain(module.bias):
        return "addmm", (module.weight.detach(), module.bias.detach())  # x @ W + b, W [in, out]
    if type(module) is torch.nn.Linear and plain(module.weight) and plain(module.bias):
        b = module.bias.detach() if module.bias is not None else None
        return "linear", (module.weight.detach(), b)
    if type(module) is Int8Linear:
        b = module.bias if module.bias is not None else None
        # The same bf16 scales Int8Linear makes on its first call: the same numbers as its forward.
        return "int8", (module.qweight, module.scale.to(torch.bfloat16), b)
    return None


def _embedding_spec(module) -> tuple[str, tuple] | None:
    from python3_distillation.quantize import Int8Embedding

    if type(module) is torch.nn.Embedding and module.weight.dtype.is_floating_point:
        return "float", (module.weight.detach(),)
    if type(module) is Int8Embedding:
        return "int8", (module.table.qweight, module.table.scale)
    return None


def _head_spec(model) -> tuple[str, tuple] | None:
    from python3_distillation.quantize import Int8LMHead

    head = model.lm_head
    if type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype.is_floating_point:
        return "float", (head.weight.detach(),)
    if type(head) is Int8LMHead:
        return "int8", (head.table.qweight, head.table.scale.to(torch.bfloat16))
    return None


def _int8_kernel_ok(device: torch.device) -> bool:
    from python3_distillation.quantize import _int8_kernel_works

    return _int8_kernel_works(device)


class StepGraph(torch.nn.Module):
    """GPT-2's decode step as one function of tensors, for ``torch.compile``.

    ``forward(tokens [B], pos [B], col [1], valid [B, C] bool, *cache)`` → float32 logits [B, V];
    ``cache`` is one [B, 2, n_head, C, head dim] tensor per layer, written at column ``col``; the
    step also sets ``valid[:, col]`` and advances ``pos`` (in place: fewer calls outside the graph). The
    weights are buffers sharing the model's storage (no copy), so inductor sees them as constants.
    """

    def __init__(self, model, head_t: torch.Tensor | None = None):
        super().__init__()
        cfg, tr = model.config, model.transformer
        self.n_head, self.d = cfg.n_head, cfg.n_embd
        self.dh = self.d // self.n_head
        self.max_pos = cfg.n_positions - 1
        self.eps = 1e-5
        self.n_layer = len(tr.h)
        self.kinds: dict[str, str] = {}
        self._put("wte", _embedding_spec(tr.wte))
        self._put("wpe", _embedding_spec(tr.wpe))
        self._put("head", _head_spec(model))
        # decoders.cpu_head_t: the float head transposed, for batch 1 (a gemv on the stored weight
        # runs at a fraction of memory speed on CPU).
        self.register_buffer("head_t", head_t if self.kinds["head"] == "float" else None, persistent=False)
        self._norm("ln_f", tr.ln_f)
        self.scales = []
        from transformers.activations import NewGELUActivation

        for i, b in enumerate(tr.h):
            if type(b.mlp.act) is not NewGELUActivation:
                raise TypeError(f"no compiled form for the activation {type(b.mlp.act).__name__}")
            self._norm(f"h{i}_ln1", b.ln_1)
            self._norm(f"h{i}_ln2", b.ln_2)
            for name, m in (("qkv", b.attn.c_attn), ("out", b.attn.c_proj), ("fc", b.mlp.c_fc), ("proj", b.mlp.c_proj)):
                self._put(f"h{i}_{name}", _proj_spec(m))
            self.scales.append(float(b.attn.scaling))

    def _put(self, name: str, spec: tuple[str, tuple] | None) -> None:
        if spec is None:
            raise TypeError(f"no compiled form for {name}")
        kind, tensors = spec
        self.kinds[name] = kind
        for j, t in enumerate(tensors):
            self.register_buffer(f"{name}_{j}", t, persistent=False)

    def _norm(self, name: str, module) -> None:
        if type(module) is not torch.nn.LayerNorm or not module.elementwise_affine or module.bias is None:
            raise TypeError(f"no compiled form for {name}")
        self.register_buffer(f"{name}_w", module.weight.detach(), persistent=False)
        self.register_buffer(f"{name}_b", module.bias.detach(), persistent=False)
        self.eps = module.eps

    def _ln(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.d,), getattr(self, f"{name}_w"), getattr(self, f"{name}_b"), self.eps)

    def _mm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        kind = self.kinds[name]
        if kind == "addmm":
            return torch.addmm(getattr(self, f"{name}_1"), x, getattr(self, f"{name}_0"))
        if kind == "linear":
            return F.linear(x, getattr(self, f"{name}_0"), getattr(self, f"{name}_1"))
        # int8 (quantize.int8_matmul): bf16 activations, int8 weights, a bf16 scale per output channel.
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), getattr(self, f"{name}_0"),
                                               getattr(self, f"{name}_1")).to(x.dtype)
        b = getattr(self, f"{name}_2")
        return y if b is None else y + b.to(y.dtype)

    def _embed(self, name: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.kinds[name] == "float":
            return F.embedding(ids, getattr(self, f"{name}_0"))
        # Int8Embedding: only the rows read are dequantized.
        q, scale = getattr(self, f"{name}_0"), getattr(self, f"{name}_1")
        return (q[ids].float() * scale[ids].unsqueeze(-1)).to(dtype)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.kinds["head"] == "float":
            if self.head_t is not None and h.shape[0] == 1:
                return torch.mm(h, self.head_t).float()
            # Several rows: the weight as stored, then rows contiguous (decoders.head, measured).
            return torch.mm(self.head_0, h.t()).t().contiguous().float()
        return torch.ops.aten._weight_int8pack_mm(h.to(torch.bfloat16), self.head_0, self.head_1).float()

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, col: torch.Tensor, valid: torch.Tensor,
                *cache: torch.Tensor) -> torch.Tensor:
        dtype = self.ln_f_w.dtype
        b, d, nh, dh = tokens.shape[0], self.d, self.n_head, self.dh
        # The new column is visible to every row (padding rows too: no softmax row is empty, NaN).
        valid.index_fill_(1, col, True)
        # Finished rows still in the batch (and padding rows) may run past the context; unused.
        h = self._embed("wte", tokens, dtype) + self._embed("wpe", pos.clamp(max=self.max_pos), dtype)  # [B, d]
        # Additive mask [B, 1, 1, C], made once for all layers (as GPT2Decoder does).
        mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))[:, None, None]
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

    ``options``/``mode`` are torch.compile's; the defaults are the fastest measured on this CPU
    (benchmarks/bench_compiled.py). ``compile_seconds`` records the first call of every bucket
    (compile + one run).
    """

    def __init__(self, model, head_t: torch.Tensor | None = None, mode: str | None = None,
                 options: dict | None = None):
        self.graph = StepGraph(model, head_t).eval()
        self.device = next(iter(self.graph.buffers())).device
        self.mode = mode
        self.options = dict(DEFAULT_OPTIONS if options is None and mode is None else (options or {}))
        if self.device.type == "cuda" and self.mode is None and options is None:
            self.mode, self.options = "reduce-overhead", {}
        import torch._dynamo
        import torch._inductor

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                               RECOMPILE_LIMIT)
        kwargs = {"dynamic": False, "fullgraph": True}
        if self.mode is not None:
            kwargs["mode"] = self.mode
        # ``freezing`` (weights as constants, fp32 linears prepacked for MKL) takes effect only from
        # inductor's global config, not from torch.compile's options: it is set around each compile.
        self.freezing = bool(self.options.get("freezing", False))
        rest = {k: v for k, v in self.options.items() if k != "freezing"}
        if rest and self.mode is not None:  # torch.compile takes one or the other: the mode as options
            rest = {**torch._inductor.list_mode_options(kwargs.pop("mode")), **rest}
        if rest:
            kwargs["options"] = rest
        self.fn = torch.compile(self.graph, **kwargs)
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
        if "int8" in graph.kinds.values() and not _int8_kernel_ok(graph.ln_f_w.device):
            return False
        return True

    def __call__(self, tokens, pos, col, valid, cache) -> torch.Tensor:
        key = tuple(valid.shape)
        if key in self.compile_seconds:
            return self.fn(tokens, pos, col, valid, *cache)
        if self.mode == "reduce-overhead":
            # A CUDA graph replays fixed addresses: the tensors the step mutates must be those
            # addresses (the decoder keeps them until a reallocation); the rest is copied in.
            for t in (pos, valid, *cache):
                torch._dynamo.mark_static_address(t)
        import torch._inductor.config

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
        dtype = g.ln_f_w.dtype
        for rows, cols in buckets:
            rows, cols = bucket(rows), bucket(cols, MIN_COLUMNS)
            if (rows, cols) in self.compile_seconds:
                continue
            cache = [torch.zeros(rows, 2, g.n_head, cols, g.dh, dtype=dtype, device=self.device)
                     for _ in range(g.n_layer)]
            valid = torch.ones(rows, cols, dtype=torch.bool, device=self.device)
            # Distinct tensors, as in a real step: dynamo guards on inputs aliasing each other.
            tokens, pos = (torch.zeros(rows, dtype=torch.long, device=self.device) for _ in range(2))
            self(tokens, pos, torch.zeros(1, dtype=torch.long, device=self.device), valid, cache)
        return dict(self.compile_seconds)


# Plain inductor. Measured (benchmarks/bench_compiled.py, a busy 2-core machine): cpp_wrapper was
# within noise of it (int8 batch 1: 1.72 vs 1.79 ms a step) and adds ~2.5 s to each bucket's
# compile; max-autotune + freezing picks inductor's C++ int8 GEMM for the block matmuls (2× the
# ATen kernel per call when the machine is quiet) but took 18–28 s a bucket, its choices are
# benchmarks that a busy machine makes random, and frozen weights are packed again per bucket.
DEFAULT_OPTIONS: dict = {}


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

    def _fit(self, rows: int, left: int, right: int) -> None:
        cap_rows, cap_cols = self.capacity
        lo = min(self.first, default=self.t)
        keep_from = min(lo, self.t - left)
        need_cols = self.t - keep_from + right
        if rows <= cap_rows and keep_from >= 0 and self.t + right <= cap_cols:
            return
        new_rows = max(cap_rows, bucket(rows))
        # Past the columns' capacity: columns no live row sees are cut off the left; a bigger
        # bucket only when the live span needs one (then a new graph, compiled once).
        new_cols = bucket(need_cols + need_cols // 4, MIN_COLUMNS)
        if rows <= cap_rows and need_cols <= cap_cols and need_cols + need_cols // 4 <= cap_cols:
            new_cols = cap_cols
        self._realloc(new_rows, new_cols, -keep_from)

    def reserve(self, steps: int) -> None:
        pass  # columns are added by the steps that need them (see the class docstring)

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
