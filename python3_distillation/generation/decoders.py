"""Batched KV-cache decoders that rows can join between steps and leave when finished.

    HF_HUB_OFFLINE=1 python -m pytest tests/generation/test_decoders.py -q

A decoder holds the KV cache of the rows decoding together. Its interface, used by
``generation/generator.py``:

* ``add(ids, mask)``: prefill new rows (LEFT padded, ``mask`` marks real tokens) and append them to
  the batch; returns their next-token logits [k, V]. Rows already decoding are not recomputed;
* ``step(tokens)``: one new token per row → next-token logits [n, V];
* ``remove(rows)``: drop batch positions; returns the new order as old positions (None: cannot);
* ``reserve(steps)``: make room for that many more steps.

``GPT2Decoder`` is GPT-2's forward written out over the HF model's own modules with a preallocated,
growable cache; ``HFDecoder`` is any causal LM through its own forward and cache. Both are checked
token for token against ``model.generate`` in the tests.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Fn = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------- module factories
# Each projection, embedding and the head is one callable chosen once: the plain float modules of
# transformers' GPT-2 get the fast tensor calls; any other module (nn.Linear after a Conv1D
# conversion, an int8 or other quantized module) is simply called.


def _plain_float(weight: Any) -> bool:
    """A plain (not a tensor subclass, e.g. a quantized one) floating-point weight."""
    return type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype.is_floating_point


def projection(module: torch.nn.Module) -> Fn:
    """``x [N, in] → [N, out]``: ``addmm`` on a float ``Conv1D``'s weight, else the module itself."""
    from transformers.pytorch_utils import Conv1D

    if type(module) is Conv1D and _plain_float(module.weight) and _plain_float(module.bias):
        w, b = module.weight, module.bias
        return lambda x: torch.addmm(b, x, w)
    return module


def embedding(module: torch.nn.Module) -> Fn:
    """``ids → vectors``: ``F.embedding`` on a float ``nn.Embedding``'s table, else the module itself."""
    if type(module) is torch.nn.Embedding and _plain_float(module.weight):
        w = module.weight
        return lambda ids: F.embedding(ids, w)
    return module


def layer_norm(module: torch.nn.Module) -> Fn:
    if type(module) is torch.nn.LayerNorm and module.elementwise_affine:
        args = (module.normalized_shape, module.weight, module.bias, module.eps)
        return lambda x: F.layer_norm(x, *args)
    return module


def plain_head(model) -> torch.Tensor | None:
    """The weight of a standard float, bias-free ``lm_head`` Linear, else None."""
    head = model.lm_head
    if type(head) is torch.nn.Linear and head.bias is None and _plain_float(head.weight):
        return head.weight
    return None


def cpu_head_t(model) -> torch.Tensor | None:
    """The lm-head weight transposed ([d, vocab], contiguous) for a standard head on CPU, else None.

    On CPU, MKL's product of one row with the vocab×d weight (a gemv, what ``F.linear`` does at
    batch 1) runs at a fraction of memory speed, while ``x @ Wᵀ`` with ``Wᵀ`` stored contiguous
    runs near it (benchmarks/bench_generate.py); batch 1 is the latency case, so it gets a copy.
    """
    w = plain_head(model)
    return w.detach().t().contiguous() if w is not None and w.device.type == "cpu" else None


def head(model, head_t: torch.Tensor | None) -> Fn:
    """``h [n, d] → float32 logits [n, V]``."""
    w = plain_head(model)
    if w is None:
        module = model.lm_head
        return lambda h: module(h).float()
    if head_t is None:
        return lambda h: F.linear(h, w).float()

    def fast(h: torch.Tensor) -> torch.Tensor:
        if h.shape[0] == 1:
            return torch.mm(h, head_t).float()
        # Several rows: a real gemm, fastest with the weight as stored (measured) — then rows contiguous.
        return torch.mm(w, h.t()).t().contiguous().float()

    return fast


def gelu(act: torch.nn.Module) -> Fn:
    """GPT-2's ``gelu_new`` as PyTorch's fused tanh GELU: the same function in one kernel instead of
    eight (rounding differs by ~1e-7, checked token for token against ``generate`` in the tests)."""
    from transformers.activations import NewGELUActivation

    if type(act) is NewGELUActivation:
        return lambda x: F.gelu(x, approximate="tanh")
    return act


# ----------------------------------------------------------------------------------- GPT-2 decoder


class GPT2Decoder:
    """GPT-2's forward over the HF model's own modules, for decoding, with a cache rows can join.

    Same maths as ``GPT2LMHeadModel`` with SDPA attention (layer norms, the projections, the model's
    attention scaling, its GELU fused), minus the per-step work of the general forward: building a
    4-D mask, growing the cache by concatenation, keyword plumbing.

    The cache of each layer is one tensor [rows, 2 (k/v), heads, columns, head dim]. Rows share the
    column axis: every row's newest token is in column ``t - 1``, its older tokens to the left, its
    first real token at ``first[row]`` (left of it: other rows' history, masked out). A joining row's
    prompt is written right-aligned to ``t``; the cache grows by reallocation (rows and columns) and
    columns no live row can see are cut off the left. Everything is zero-initialised: masked
    columns still enter the attention product, and garbage there could be NaN (NaN · 0 = NaN).
    """

    def __init__(self, model, head_t: torch.Tensor | None = None):
        cfg = model.config
        tr = model.transformer
        self.n_head, self.d = cfg.n_head, cfg.n_embd
        self.dh = self.d // self.n_head
        self.max_pos = cfg.n_positions - 1
        self.wte, self.wpe = embedding(tr.wte), embedding(tr.wpe)
        self.ln_f = layer_norm(tr.ln_f)
        self.dtype, self.device = tr.ln_f.weight.dtype, tr.ln_f.weight.device
        self.head = head(model, head_t)
        self.layers = [(
            layer_norm(b.ln_1), projection(b.attn.c_attn), projection(b.attn.c_proj), b.attn.scaling,
            layer_norm(b.ln_2), projection(b.mlp.c_fc), projection(b.mlp.c_proj), gelu(b.mlp.act),
        ) for b in tr.h]
        self.cache: list[torch.Tensor] = []  # per layer [R, 2, n_head, C, dh]
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # [R, C]
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [R] next position of each row
        self.first: list[int] = []  # first real column of each row in use
        self.n = 0  # rows in use
        self.t = 0  # next column

    @staticmethod
    def cpu_head_t(model) -> torch.Tensor | None:
        return cpu_head_t(model)

    @staticmethod
    def supports(model) -> bool:
        """A transformers GPT2LMHeadModel of the standard shape; its modules may be of any type."""
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:  # pragma: no cover
            return False
        cfg = model.config
        if type(model) is not GPT2LMHeadModel or cfg.n_embd % cfg.n_head:
            return False
        if getattr(cfg, "add_cross_attention", False) or getattr(cfg, "reorder_and_upcast_attn", False):
            return False
        # A float Linear head with a bias would be skipped by plain_head's fast path; any other head
        # module is called as it is.
        head = model.lm_head
        return not (type(head) is torch.nn.Linear and head.bias is not None)

    # -------------------------------------------------------------------------------- storage

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.valid.shape[0], self.valid.shape[1])

    def _realloc(self, rows: int, cols: int, shift: int) -> None:
        """New storage of ``rows`` × ``cols``; rows in use keep columns [lo, t) moved by ``shift`` (may be < 0)."""
        lo = min(self.first, default=self.t)
        cache = [torch.zeros(rows, 2, self.n_head, cols, self.dh, device=self.device, dtype=self.dtype)
                 for _ in self.layers]
        valid = torch.zeros(rows, cols, dtype=torch.bool, device=self.device)
        pos = torch.zeros(rows, dtype=torch.long, device=self.device)
        n = self.n
        if n:
            for new, old in zip(cache, self.cache):
                new[:n, :, :, lo + shift:self.t + shift] = old[:n, :, :, lo:self.t]
            valid[:n, lo + shift:self.t + shift] = self.valid[:n, lo:self.t]
            pos[:n] = self.pos[:n]
        self.cache, self.valid, self.pos = cache, valid, pos
        self.first = [f + shift for f in self.first]
        self.t += shift

    def _fit(self, rows: int, left: int, right: int) -> None:
        """Make room for ``rows`` rows, ``left`` columns before ``t`` and ``right`` from ``t`` on."""
        cap_rows, cap_cols = self.capacity
        lo = min(self.first, default=self.t)
        # Columns that must be kept: [lo, t) of the rows in use, and [t - left, t) for new ones.
        keep_from = min(lo, self.t - left)
        need_cols = self.t - keep_from + right
        if rows <= cap_rows and keep_from >= 0 and self.t + right <= cap_cols:
            return
        # Grow by half again, so a stream of joins or steps reallocates rarely.
        new_rows = rows if rows <= cap_rows else max(rows, cap_rows + cap_rows // 2)
        new_cols = need_cols if need_cols <= cap_cols else max(need_cols, cap_cols + cap_cols // 2)
        self._realloc(new_rows, new_cols, -keep_from)

    def reserve(self, steps: int) -> None:
        self._fit(self.n, 0, steps)

    # ------------------------------------------------------------------------------- forward

    def _blocks(self, h: torch.Tensor, rows: slice, w0: int, w1: int, a0: int, mask: torch.Tensor) -> torch.Tensor:
        """Run the blocks on ``h`` [b, q, d] of cache ``rows``: write columns w0:w1, attend over a0:w1.

        ``mask`` is additive, [b, 1, q or 1, w1 - a0].
        """
        b, q, d = h.shape
        for kv, (ln1, qkv_proj, out_proj, scale, ln2, fc, proj, act) in zip(self.cache, self.layers):
            kv = kv[rows]
            qkv = qkv_proj(ln1(h).view(-1, d)).view(b, q, 3, self.n_head, self.dh)
            kv[:, :, :, w0:w1] = qkv[:, :, 1:].permute(0, 2, 3, 1, 4)  # keys and values in one copy
            o = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), kv[:, 0, :, a0:w1], kv[:, 1, :, a0:w1],
                                               attn_mask=mask, scale=scale)
            h = h + out_proj(o.transpose(1, 2).reshape(-1, d)).view(b, q, d)
            h = h + proj(act(fc(ln2(h).view(-1, d)))).view(b, q, d)
        return h

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        # Made once per forward: SDPA would otherwise turn a boolean mask into this in every layer.
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(h))

    @torch.inference_mode()
    def add(self, ids: torch.Tensor, mask: torch.Tensor, room: int = 1) -> torch.Tensor:
        """Prefill rows ``ids`` [k, width] into the batch, leaving ``room`` columns for the steps to come."""
        k, width = ids.shape
        if self.n == 0:
            self.t, self.first = width, []  # a fresh batch starts with its prompts' width
        self._fit(self.n + k, width, max(room, 1))
        r0, r1, c0, c1 = self.n, self.n + k, self.t - width, self.t
        dev = self.device
        self.valid[r0:r1] = False
        self.valid[r0:r1, c0:c1] = mask
        pos = (mask.long().cumsum(1) - 1).clamp_(min=0)
        self.pos[r0:r1] = pos[:, -1] + 1
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril_()
        # Pad queries attend to themselves only, so no softmax row is empty (which would be NaN).
        allowed = (causal[None] & mask[:, None, :]) | torch.eye(width, dtype=torch.bool, device=dev)[None]
        h = self.wte(ids) + self.wpe(pos)
        h = self._blocks(h, slice(r0, r1), c0, c1, c0, self._additive(allowed[:, None]))
        pads = (~mask).long().sum(1).tolist()  # left padding: real tokens start after the pads
        self.first += [c0 + p for p in pads]
        self.n = r1
        return self._logits(h[:, -1])

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int) -> torch.Tensor:
        """A fresh batch of ``ids`` with room for ``capacity`` columns in all."""
        self.n, self.first = 0, []
        return self.add(ids, mask, capacity - ids.shape[1])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._fit(self.n, 0, 1)
        t, n = self.t, self.n
        a0 = min(self.first)
        self.valid[:n, t] = True
        # Finished rows still in the batch (not yet dropped) may run past the context; their output is unused.
        pos = self.pos[:n].clamp(max=self.max_pos)
        h = (self.wte(tokens) + self.wpe(pos))[:, None]
        h = self._blocks(h, slice(0, n), t, t + 1, a0, self._additive(self.valid[:n, None, None, a0:t + 1]))
        self.pos[:n] += 1
        self.t = t + 1
        return self._logits(h[:, 0])

    @torch.inference_mode()
    def remove(self, rows: list[int]) -> list[int]:
        """Drop batch positions ``rows``: the last live rows move into the holes (copying only those)."""
        gone = set(rows)
        n_keep = self.n - len(gone)
        order = [i for i in range(self.n)]
        holes = [i for i in sorted(gone) if i < n_keep]
        movers = [i for i in range(n_keep, self.n) if i not in gone]
        lo = min((self.first[i] for i in range(self.n) if i not in gone), default=self.t)
        for hole, src in zip(holes, movers):
            for kv in self.cache:
                kv[hole, :, :, lo:self.t] = kv[src, :, :, lo:self.t]
            self.valid[hole] = self.valid[src]
            self.pos[hole] = self.pos[src]
            self.first[hole] = self.first[src]
            order[hole] = src
        self.n = n_keep
        self.first = self.first[:n_keep]
        return order[:n_keep]


# -------------------------------------------------------------------------------------- HF decoder


class HFDecoder:
    """Any causal LM through its own forward: ``past_key_values``/``cache`` with ``use_cache=True``.

    Rows join by a separate prefill whose cache is then padded on the left and concatenated to the
    running one; that needs transformers' ``DynamicCache`` of plain layers. With another cache type
    ``can_add`` is False once rows are decoding, and new rows wait for the batch to drain.
    """

    def __init__(self, model):
        self.model = model
        sig = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values → cache (the old name is deprecated).
        self.cache_kw = "cache" if "cache" in sig else "past_key_values"
        self.logits_to_keep = "logits_to_keep" in sig
        cfg = model.config
        self.max_pos = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings")) - 1
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [n, T] long
        self.pos: torch.Tensor | None = None  # [n, 1]
        self.n = 0

    def _out_cache(self, out) -> Any:
        c = getattr(out, "cache", None)
        return c if c is not None else getattr(out, "past_key_values", None)

    @staticmethod
    def _layers(cache) -> list | None:
        """The (keys, values) holders of a DynamicCache of plain layers, else None."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
            return None
        return cache.layers

    @property
    def can_add(self) -> bool:
        return self.n == 0 or self._layers(self.cache) is not None

    def reserve(self, steps: int) -> None:
        pass  # the HF cache grows by itself

    @torch.inference_mode()
    def add(self, ids: torch.Tensor, mask: torch.Tensor, room: int = 1) -> torch.Tensor:
        mask = mask.long()
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        extra = {"logits_to_keep": 1} if self.logits_to_keep else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
        cache = self._out_cache(out)
        if self.n == 0:
            self.cache, self.mask, self.pos = cache, mask, pos[:, -1:] + 1
        else:
            self._merge(cache, mask, pos[:, -1:] + 1)
        self.n += ids.shape[0]
        return out.logits[:, -1].float()

    def _merge(self, cache, mask: torch.Tensor, pos: torch.Tensor) -> None:
        ours, theirs = self._layers(self.cache), self._layers(cache)
        if ours is None or theirs is None:
            raise RuntimeError("this model's cache type cannot take rows into a running batch")
        width = max(self.mask.shape[1], mask.shape[1])

        def left_pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - x.shape[dim]
            if not missing:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim)

        for a, b in zip(ours, theirs):
            a.keys = torch.cat([left_pad(a.keys, 2), left_pad(b.keys, 2)], 0)
            a.values = torch.cat([left_pad(a.values, 2), left_pad(b.values, 2)], 0)
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(mask, 1)], 0)
        self.pos = torch.cat([self.pos, pos], 0)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int) -> torch.Tensor:
        self.n = 0
        return self.add(ids, mask)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        # Finished rows still in the batch may run past the context; their output is unused.
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                         position_ids=self.pos.clamp(max=self.max_pos), use_cache=True, **{self.cache_kw: self.cache})
        self.cache = self._out_cache(out)
        self.pos = self.pos + 1
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def remove(self, rows: list[int]) -> list[int] | None:
        """Keep the other rows in order; None when this cache type cannot be pruned (rows then stay)."""
        select = getattr(self.cache, "batch_select_indices", None)
        if select is None:
            return None
        gone = set(rows)
        keep = [i for i in range(self.n) if i not in gone]
        idx = torch.tensor(keep, device=self.mask.device)
        select(idx)
        self.mask, self.pos = self.mask[idx], self.pos[idx]
        self.n = len(keep)
        return keep
