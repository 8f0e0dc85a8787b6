"""Batched KV-cache decoders that rows can join between steps and leave when finished.

    HF_HUB_OFFLINE=1 python -m pytest tests/generation/test_decoders.py -q

``GPT2Decoder`` (GPT-2's forward written out) and ``HFDecoder`` (any causal LM's own); their interface, the
cache layout, the fused GELU and the transposed head: docs/design/generation.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel
from transformers.activations import NewGELUActivation
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.pytorch_utils import Conv1D

from python3_distillation.int8 import Int8Embedding, Int8Linear, Int8LMHead

Fn = Callable[[torch.Tensor], torch.Tensor]


def module_spec(module) -> tuple[str, tuple] | None:
    """What a module computes, as (kind, its tensors) for the kinds written out here, else None.

    ``GPT2Decoder`` calls the float kinds directly; ``StepGraph`` (compiled.py) runs every kind in its graph.
    """
    def plain(t) -> bool:  # None, or a float tensor that is not a subclass (e.g. a quantized one)
        return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype.is_floating_point)

    kind = type(module)
    if kind is Conv1D and plain(module.weight) and module.bias is not None and plain(module.bias):
        return "addmm", (module.weight.detach(), module.bias.detach())  # x @ W + b, W [in, out]
    if kind is torch.nn.Linear and plain(module.weight) and plain(module.bias):
        return "linear", (module.weight.detach(), module.bias.detach() if module.bias is not None else None)
    if kind is Int8Linear:
        # The same bf16 scales Int8Linear makes on its first call: the same numbers as its forward.
        return "int8", (module.qweight, module.scale.to(torch.bfloat16), module.bias)
    if kind is Int8LMHead:
        return "int8", (module.table.qweight, module.table.scale.to(torch.bfloat16), None)
    if kind is torch.nn.Embedding and plain(module.weight):
        return "embed", (module.weight.detach(),)
    if kind is Int8Embedding:
        return "int8_embed", (module.table.qweight, module.table.scale)
    if kind is torch.nn.LayerNorm and module.elementwise_affine and module.bias is not None:
        return "ln", (module.weight.detach(), module.bias.detach())
    return ("gelu", ()) if kind is NewGELUActivation else None


def fast(module: torch.nn.Module) -> Fn:
    """The module as one callable chosen once: ``module_spec``'s float kinds functional (GELU fused), others as-is."""
    kind, t = module_spec(module) or ("", ())
    if kind == "addmm":
        return lambda x, w=t[0], b=t[1]: torch.addmm(b, x, w)
    if kind == "embed":
        return lambda ids, table=t[0]: F.embedding(ids, table)
    if kind == "ln":
        return lambda x, args=(module.normalized_shape, *t, module.eps): F.layer_norm(x, *args)
    if kind == "gelu":
        return lambda x: F.gelu(x, approximate="tanh")
    return module


def plain_head(model) -> torch.Tensor | None:  # the weight of a float, bias-free lm_head Linear
    kind, t = module_spec(model.lm_head) or ("", ())
    return t[0] if kind == "linear" and t[1] is None else None


def cpu_head_t(model) -> torch.Tensor | None:
    """The lm-head weight transposed ([d, vocab], contiguous; fast at batch 1) of a standard head on CPU, else None."""
    w = plain_head(model)
    return w.detach().t().contiguous() if w is not None and w.device.type == "cpu" else None


def head(model, head_t: torch.Tensor | None) -> Fn:
    """``h [n, d] → float32 logits [n, V]``."""
    w = plain_head(model)
    if w is None:
        return lambda h, module=model.lm_head: module(h).float()
    if head_t is None:
        return lambda h: F.linear(h, w).float()
    return lambda h: float_logits(h, w, head_t)


def float_logits(h: torch.Tensor, w: torch.Tensor, head_t: torch.Tensor | None) -> torch.Tensor:
    """``h [n, d] @ wᵀ`` in float32: one row via ``head_t`` (``cpu_head_t``), more as a gemm with ``w`` (fastest)."""
    if head_t is not None and h.shape[0] == 1:
        return torch.mm(h, head_t).float()
    return torch.mm(w, h.t()).t().contiguous().float()


def gpt2_shape(config) -> tuple[int, int, int, int]:
    """GPT-2's (heads, width, head width, last position id), shared by the eager and the compiled step."""
    return config.n_head, config.n_embd, config.n_embd // config.n_head, config.n_positions - 1


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as 0 / -inf, made once per forward: SDPA would redo it in every layer."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class GPT2Decoder:
    """GPT-2's forward over the HF model's own modules, for decoding, with a cache rows can join (design page)."""

    def __init__(self, model, head_t: torch.Tensor | None = None):
        tr = model.transformer
        self.n_head, self.d, self.dh, self.max_pos = gpt2_shape(model.config)
        self.wte, self.wpe, self.ln_f = fast(tr.wte), fast(tr.wpe), fast(tr.ln_f)
        self.dtype, self.device = tr.ln_f.weight.dtype, tr.ln_f.weight.device
        self.head = head(model, head_t)
        self.layers = [(fast(b.ln_1), fast(b.attn.c_attn), fast(b.attn.c_proj), b.attn.scaling,
                        fast(b.ln_2), fast(b.mlp.c_fc), fast(b.mlp.c_proj), fast(b.mlp.act)) for b in tr.h]
        self.cache: list[torch.Tensor] = []  # per layer [R, 2, n_head, C, dh]
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # [R, C]
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [R] next position of each row
        self.first: list[int] = []  # first real column of each row in use
        self.n = 0  # rows in use
        self.t = 0  # next column

    @staticmethod
    def supports(model) -> bool:
        """A transformers GPT2LMHeadModel of the standard shape; its modules may be of any type."""
        cfg = model.config
        # A float Linear head with a bias would be skipped by plain_head's fast path; any other head is called.
        return (type(model) is GPT2LMHeadModel and not cfg.n_embd % cfg.n_head
                and not (getattr(cfg, "add_cross_attention", False) or getattr(cfg, "reorder_and_upcast_attn", False))
                and not (type(model.lm_head) is torch.nn.Linear and model.lm_head.bias is not None))

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
        if n := self.n:
            for new, old in zip(cache, self.cache):
                new[:n, :, :, lo + shift:self.t + shift] = old[:n, :, :, lo:self.t]
            valid[:n, lo + shift:self.t + shift] = self.valid[:n, lo:self.t]
            pos[:n] = self.pos[:n]
        self.cache, self.valid, self.pos = cache, valid, pos
        self.first = [f + shift for f in self.first]
        self.t += shift

    def _fit(self, rows: int, left: int, right: int) -> None:
        """Make room for ``rows`` rows, ``left`` columns before ``t`` and ``right`` from ``t`` on."""
        # Columns that must be kept: [lo, t) of the rows in use, and [t - left, t) for new ones.
        keep_from = min(min(self.first, default=self.t), self.t - left)
        if rows <= self.capacity[0] and keep_from >= 0 and self.t + right <= self.capacity[1]:
            return
        self._realloc(*self._grown(rows, self.t - keep_from + right), -keep_from)

    def _grown(self, rows: int, cols: int) -> tuple[int, int]:
        """Storage for ``rows`` × ``cols``, grown by half again so a stream of joins or steps reallocates rarely."""
        cap_rows, cap_cols = self.capacity
        return (rows if rows <= cap_rows else max(rows, cap_rows + cap_rows // 2),
                cols if cols <= cap_cols else max(cols, cap_cols + cap_cols // 2))

    def _blocks(self, h: torch.Tensor, rows: slice, w0: int, w1: int, a0: int, mask: torch.Tensor) -> torch.Tensor:
        """Run the blocks on ``h`` [b, q, d] of cache ``rows``.

        They write columns w0:w1 and attend over a0:w1 (``mask`` additive, [b, 1, q or 1, w1 - a0]).
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

    @torch.inference_mode()
    def add(self, ids: torch.Tensor, mask: torch.Tensor, room: int = 1) -> torch.Tensor:
        """Prefill rows ``ids`` [k, width] into the batch, leaving ``room`` columns for the steps to come."""
        k, width = ids.shape
        if self.n == 0:
            self.t, self.first = width, []  # a fresh batch starts with its prompts' width
        self._fit(self.n + k, width, max(room, 1))
        r0, r1, c0, c1 = self.n, self.n + k, self.t - width, self.t
        self.valid[r0:r1] = False
        self.valid[r0:r1, c0:c1] = mask
        pos = (mask.long().cumsum(1) - 1).clamp_(min=0)
        self.pos[r0:r1] = pos[:, -1] + 1
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril_()
        # Pad queries attend to themselves only, so no softmax row is empty (which would be NaN).
        allowed = (causal[None] & mask[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)[None]
        h = self.wte(ids) + self.wpe(pos)
        h = self._blocks(h, slice(r0, r1), c0, c1, c0, additive(allowed[:, None], self.dtype))
        self.first += [c0 + p for p in (~mask).long().sum(1).tolist()]  # real tokens start after the left pads
        self.n = r1
        return self.head(self.ln_f(h[:, -1]))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._fit(self.n, 0, 1)
        t, n, a0 = self.t, self.n, min(self.first)
        self.valid[:n, t] = True
        # Finished rows still in the batch (not yet dropped) may run past the context; their output is unused.
        h = (self.wte(tokens) + self.wpe(self.pos[:n].clamp(max=self.max_pos)))[:, None]
        mask = additive(self.valid[:n, None, None, a0:t + 1], self.dtype)
        h = self._blocks(h, slice(0, n), t, t + 1, a0, mask)
        self.pos[:n] += 1
        self.t = t + 1
        return self.head(self.ln_f(h[:, 0]))

    @torch.inference_mode()
    def remove(self, rows: list[int]) -> list[int]:
        """Drop batch positions ``rows``: the last live rows move into the holes (copying only those)."""
        gone = set(rows)
        n_keep = self.n - len(gone)
        order = list(range(self.n))
        holes = [i for i in sorted(gone) if i < n_keep]
        movers = [i for i in range(n_keep, self.n) if i not in gone]
        lo = min((self.first[i] for i in range(self.n) if i not in gone), default=self.t)
        for hole, src in zip(holes, movers):
            for kv in self.cache:
                kv[hole, :, :, lo:self.t] = kv[src, :, :, lo:self.t]
            for per_row in (self.valid, self.pos, self.first):
                per_row[hole] = per_row[src]
            order[hole] = src
        self.n = n_keep
        self.first = self.first[:n_keep]
        return order[:n_keep]


class HFDecoder:
    """Any causal LM through its own forward (``past_key_values``/``cache``, ``use_cache=True``).

    Rows join by a separate prefill whose cache is padded on the left and concatenated to the running one;
    that needs a ``DynamicCache`` of plain layers. Otherwise ``can_add`` is False once rows are decoding.
    """

    def __init__(self, model, context_length: int):
        self.model = model
        sig = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values → cache (the old name is deprecated).
        self.cache_kw = "cache" if "cache" in sig else "past_key_values"
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in sig else {}  # only the last position's logits
        self.max_pos = context_length - 1
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [n, T] long
        self.pos: torch.Tensor | None = None  # [n, 1]
        self.n = 0

    @staticmethod
    def _out_cache(out) -> Any:
        return out.cache if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", None)

    @staticmethod
    def _layers(cache) -> list | None:
        """The (keys, values) holders of a DynamicCache of plain layers, else None."""
        plain = type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)
        return cache.layers if plain else None

    @property
    def can_add(self) -> bool:
        return self.n == 0 or self._layers(self.cache) is not None

    @torch.inference_mode()
    def add(self, ids: torch.Tensor, mask: torch.Tensor, room: int = 1) -> torch.Tensor:
        mask = mask.long()
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **self.extra)
        cache, pos = self._out_cache(out), pos[:, -1:] + 1
        if self.n == 0:
            self.cache, self.mask, self.pos = cache, mask, pos
        else:  # both caches zero-padded on the left to the wider one, then stacked
            ours, theirs = self._layers(self.cache), self._layers(cache)
            if ours is None or theirs is None:
                raise RuntimeError("this model's cache type cannot take rows into a running batch")
            width = max(self.mask.shape[1], mask.shape[1])

            def left_pad(x: torch.Tensor, dim: int = 2) -> torch.Tensor:  # zeros before the columns (dim)
                return F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (width - x.shape[dim], 0))

            for a, b in zip(ours, theirs):
                a.keys = torch.cat([left_pad(a.keys), left_pad(b.keys)], 0)
                a.values = torch.cat([left_pad(a.values), left_pad(b.values)], 0)
            self.mask = torch.cat([left_pad(self.mask, 1), left_pad(mask, 1)], 0)
            self.pos = torch.cat([self.pos, pos], 0)
        self.n += ids.shape[0]
        return out.logits[:, -1].float()

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
        keep = sorted(set(range(self.n)) - set(rows))
        idx = torch.tensor(keep, device=self.mask.device)
        select(idx)
        self.mask, self.pos = self.mask[idx], self.pos[idx]
        self.n = len(keep)
        return keep
