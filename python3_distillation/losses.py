"""Distillation losses as pure tensor functions: soft-target KD, causal-LM CE, hidden-state cosine.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_losses.py -q

``kd_loss`` and ``cached_kd_loss`` (against a stored top-k teacher, teacher_cache.py) walk the (N, V)
rows in chunks (``chunks.map_chunks``), in fp32, with the closed-form gradient instead of an autograd
graph; results are bit-identical for any thread count, and teacher tensors get no gradient.
Design notes: docs/design/training.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from python3_distillation.chunks import map_chunks
from python3_distillation.device_plan import kd_chunk_elements

__all__ = ["kd_loss", "cached_kd_loss", "lm_loss", "hidden_cosine_loss", "CHUNK_ELEMENTS", "default_chunk_rows"]

CHUNK_ELEMENTS = kd_chunk_elements("cpu")  # logits per chunk on CPU: 16 GPT-2 rows (measured in device_plan.py)


def default_chunk_rows(vocab_size: int, device: torch.device | str | None = None) -> int:
    """Rows per chunk so one fp32 chunk holds about ``kd_chunk_elements(device)`` values (≥ 1 row)."""
    return max(1, kd_chunk_elements(device) // max(vocab_size, 1))


def _checked_chunk_rows(logits: Tensor, temperature: float, chunk_rows: int | None) -> int:
    """The checks both KD losses make; ``chunk_rows`` None → ``default_chunk_rows`` for the logits."""
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor of shape (..., V)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk_rows = default_chunk_rows(logits.shape[-1], logits.device) if chunk_rows is None else chunk_rows
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return chunk_rows


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits (bf16's 8-bit mantissa loses softmax tails); fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(x: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """A fresh ``x / T`` in ``dtype``; upcast before dividing so bf16 never rounds ``x / T``."""
    return x / temperature if x.dtype == dtype else x.to(dtype).div_(temperature)


def _log_probs(x: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    return torch.log_softmax(_scaled(x, temperature, dtype), dim=-1)


def _zero_nan_(x: Tensor) -> Tensor:
    """In place: NaN → 0 (the ``0 · log 0`` terms of a −inf logit), ±inf kept (a truly infinite KL)."""
    return x.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def _log_mixture(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """``log((1-β)·p_s + β·p_t)`` computed in log space (no underflow for tiny probabilities)."""
    return torch.logaddexp(logp_s + math.log1p(-beta), logp_t + math.log(beta))


def _forward_kl_sum(s_c: Tensor, t_c: Tensor, temperature: float, dtype: torch.dtype, safe: bool) -> Tensor:
    """``Σ_rows Σ_v p_t (log p_t − log p_s)`` of one chunk, as an fp64 scalar.

    The fast path turns a −inf teacher logit into NaN (0 · −inf); ``safe`` zeroes those terms as
    ``F.kl_div`` does, for one extra pass.
    """
    logp_s = _log_probs(s_c, temperature, dtype)
    logp_t = _log_probs(t_c, temperature, dtype)
    p_t = logp_t.exp()
    if safe:
        terms = (p_t * (logp_t - logp_s)).masked_fill_(logp_t == -math.inf, 0.0)
    else:
        terms = logp_t.sub_(logp_s).mul_(p_t)
    # Rows in fp32, rows' sums in fp64: sum(dtype=float64) over the chunk upcasts it first, 10× slower.
    return terms.sum(-1).sum(dtype=torch.float64)


class _ChunkedKD(torch.autograd.Function):
    """Sum over ``rows`` (None = all) of ``T² · D(p_t, p_s)`` / N; backward recomputes softmaxes per chunk."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: Tensor | None,  # type: ignore[override]
                temperature: float, beta: float, chunk_rows: int) -> Tensor:
        n = student.shape[0] if rows is None else rows.numel()
        dtype = _compute_dtype(student.dtype)
        # Per-row constant the gradient needs: KL(p_s‖p_t) for β = 1, Σ p_s·g for 0 < β < 1.
        row_c = torch.empty(n if beta > 0 else 0, dtype=dtype, device=student.device)

        def chunk(i: int, j: int, safe: bool = False) -> Tensor:
            s_c, t_c = _take(student, rows, i, j), _take(teacher, rows, i, j)
            if beta == 0.0:  # forward KL(p_t‖p_s), the default
                return _forward_kl_sum(s_c, t_c, temperature, dtype, safe)
            logp_s, logp_t = _log_probs(s_c, temperature, dtype), _log_probs(t_c, temperature, dtype)
            if beta == 1.0:  # reverse KL: Σ p_s (log p_s − log p_t)
                kl = _zero_nan_(logp_s.exp() * (logp_s - logp_t)).sum(-1)
                row_c[i:j] = kl
                return kl.sum(dtype=torch.float64)
            # generalized JSD: β·KL(p_t‖m) + (1−β)·KL(p_s‖m), m = (1−β)p_s + βp_t
            log_m = _log_mixture(logp_s, logp_t, beta)
            kl_t = _zero_nan_(logp_t.exp() * (logp_t - log_m)).sum(-1)
            kl_s = _zero_nan_(logp_s.exp() * (logp_s - log_m)).sum(-1)
            row_c[i:j] = (1.0 - beta) * kl_s
            return (beta * kl_t + (1.0 - beta) * kl_s).sum(dtype=torch.float64)

        # fp64 accumulation: ~1e3-1e5 row sums; fixed chunk order keeps the result deterministic.
        zero = torch.zeros((), dtype=torch.float64, device=student.device)
        total = sum(map_chunks(chunk, n, chunk_rows, student.device), zero)
        if beta == 0.0 and torch.isnan(total):  # one check (one sync on GPU), not one per chunk
            total = sum(map_chunks(lambda i, j: chunk(i, j, safe=True), n, chunk_rows, student.device), zero)
        ctx.save_for_backward(student, teacher, rows, row_c)
        ctx.temperature, ctx.beta, ctx.chunk_rows, ctx.n = temperature, beta, chunk_rows, n
        return (total * (temperature**2 / max(n, 1))).to(dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        student, teacher, rows, row_c = ctx.saved_tensors
        temp, beta, chunk_rows, n = ctx.temperature, ctx.beta, ctx.chunk_rows, ctx.n
        dtype = _compute_dtype(student.dtype)
        # Rows the mask drops get exactly zero; without a mask every row is overwritten below.
        grad = torch.empty_like(student) if rows is None else torch.zeros_like(student)
        # d(T²·D/N)/ds = (T/N)·dD/dz with z = s/T; T² from Hinton et al. keeps gradient size T-free.
        scale = grad_out.to(dtype) * (temp / max(n, 1))

        def chunk(i: int, j: int) -> None:
            s_c, t_c = _take(student, rows, i, j), _take(teacher, rows, i, j)
            if beta == 0.0:  # dKL(p_t‖p_s)/dz = p_s − p_t
                p_t = torch.softmax(_scaled(t_c, temp, dtype), dim=-1)
                g = torch.softmax(_scaled(s_c, temp, dtype), dim=-1).sub_(p_t)
            else:  # dD/dz = p_s ⊙ (g − Σ p_s g), g = log p_s − log p_t (β=1) or (1−β)(log p_s − log m)
                logp_s, logp_t = _log_probs(s_c, temp, dtype), _log_probs(t_c, temp, dtype)
                if beta == 1.0:
                    g = logp_s - logp_t
                else:
                    g = (logp_s - _log_mixture(logp_s, logp_t, beta)).mul_(1.0 - beta)
                _zero_nan_(g.sub_(row_c[i:j, None]).mul_(logp_s.exp_()))
            if rows is None:  # one rounding into the input dtype, written straight into place
                torch.mul(g, scale, out=grad[i:j])
            else:
                grad.index_copy_(0, rows[i:j], g.mul_(scale).to(grad.dtype))

        map_chunks(chunk, n, chunk_rows, student.device)
        return grad, None, None, None, None, None


def _take(x: Tensor, rows: Tensor | None, i: int, j: int) -> Tensor:
    """Rows i..j of the selection: a view when nothing is masked, a chunk-sized gather otherwise."""
    return x[i:j] if rows is None else x.index_select(0, rows[i:j])


def _flat_rows(mask: Tensor | None, lead_shape: torch.Size, device: torch.device) -> Tensor | None:
    """Indices of the kept rows of the flattened logits, or None when every row is kept."""
    if mask is None:
        return None
    if mask.shape != lead_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(lead_shape)}")
    keep = mask.reshape(-1).to(device) != 0
    return None if bool(keep.all()) else keep.nonzero().squeeze(1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 2.0,
            chunk_rows: int | None = None, beta: float = 0.0) -> Tensor:
    """Soft-target loss over (..., V) logits, averaged over positions where ``mask`` (leading shape) is nonzero.

    ``beta=0``: ``F.kl_div(F.log_softmax(s/T, -1), F.softmax(t/T, -1), reduction="batchmean") * T**2``.
    ``beta`` follows TRL's ``generalized_jsd_loss`` (1 reverse KL ``KL(p_s ‖ p_t)``, (0, 1) JSD with
    mixture ``(1−β)p_s + βp_t``), times T² (divide by T² for TRL's number). fp32 result (fp64 for fp64
    logits), gradient in the logits' dtype; all-masked gives 0. ``chunk_rows`` None:
    ``default_chunk_rows(V, device)`` (16 rows of GPT-2's vocabulary on CPU, 1,024 on CUDA).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same vocabulary size)")
    chunk_rows = _checked_chunk_rows(student_logits, temperature, chunk_rows)
    vocab = student_logits.shape[-1]
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    rows = _flat_rows(mask, student_logits.shape[:-1], student_logits.device)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    return _ChunkedKD.apply(student, teacher, rows, float(temperature), float(beta), int(chunk_rows))


class _ChunkedBucketKD(torch.autograd.Function):
    """Sum over rows of ``T² · KL(P ‖ Q)`` / N between (k+1)-bucket distributions, analytic gradient.

    Q is softmax(z), z = s/T, folded into the k named tokens and one tail bucket: dKL/dz_j = q_j − P_j
    for the k named tokens and q_j·(1 − P_tail/Q_tail) for the rest (Σ P = 1). Forward keeps two numbers
    a row (log-normaliser, log Q_tail); each chunk is one fp32 copy of the logits worked on in place.
    """

    @staticmethod
    def forward(ctx, student: Tensor, ids: Tensor, logp_t: Tensor, rows: Tensor | None,  # type: ignore[override]
                temperature: float, chunk_rows: int) -> Tensor:
        n = student.shape[0] if rows is None else rows.numel()
        dtype = _compute_dtype(student.dtype)
        lse = torch.empty(n, dtype=dtype, device=student.device)  # log Σ_v exp(z_v)
        log_tail = torch.empty(n, dtype=dtype, device=student.device)  # log Q_tail

        def chunk(i: int, j: int) -> Tensor:
            ids_c, logp_c = _take(ids, rows, i, j), _take(logp_t, rows, i, j)
            logq = _bucket_log_probs(_scaled(_take(student, rows, i, j), temperature, dtype), ids_c, lse, log_tail, i, j)
            # 0 · log 0 = 0: a bucket the teacher gives no mass (the tail when k = V) adds nothing.
            terms = (logp_c.exp() * (logp_c - logq)).masked_fill_(logp_c == -math.inf, 0.0)
            return terms.sum(-1).sum(dtype=torch.float64)

        zero = torch.zeros((), dtype=torch.float64, device=student.device)
        total = sum(map_chunks(chunk, n, chunk_rows, student.device), zero)
        ctx.save_for_backward(student, ids, logp_t, rows, lse, log_tail)
        ctx.temperature, ctx.chunk_rows, ctx.n = temperature, chunk_rows, n
        return (total * (temperature**2 / max(n, 1))).to(dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        student, ids, logp_t, rows, lse, log_tail = ctx.saved_tensors
        temp, chunk_rows, n = ctx.temperature, ctx.chunk_rows, ctx.n
        dtype = _compute_dtype(student.dtype)
        grad = torch.empty_like(student) if rows is None else torch.zeros_like(student)
        scale = grad_out.to(dtype) * (temp / max(n, 1))  # T²·(1/T) per row, over N rows

        def chunk(i: int, j: int) -> None:
            ids_c, logp_c = _take(ids, rows, i, j), _take(logp_t, rows, i, j)
            k = ids_c.shape[-1]
            q = _scaled(_take(student, rows, i, j), temp, dtype).sub_(lse[i:j, None]).exp_()  # softmax(z)
            q_named = q.gather(1, ids_c)
            # P_tail / Q_tail, 0 where the teacher's tail is empty (then Q_tail may be 0 too).
            ratio = torch.where(logp_c[:, k] == -math.inf, 0.0, (logp_c[:, k] - log_tail[i:j]).exp())
            g = q.mul_((1.0 - ratio)[:, None])  # every token outside the k ...
            g.scatter_(1, ids_c, q_named - logp_c[:, :k].exp())  # ... and the k named ones
            if rows is None:
                torch.mul(g, scale, out=grad[i:j])
            else:
                grad.index_copy_(0, rows[i:j], g.mul_(scale).to(grad.dtype))

        map_chunks(chunk, n, chunk_rows, student.device)
        return grad, None, None, None, None, None


def _bucket_log_probs(z: Tensor, ids: Tensor, lse: Tensor, log_tail: Tensor, i: int, j: int) -> Tensor:
    """(rows, k+1): log softmax(z) of the k tokens ``ids``, then of all others together; consumes ``z``.

    The tail sums the others' exponentials, not 1 − Σ top-k (which cancels to nothing when the k hold
    almost all the mass). Stores the log-normaliser and log-tail into ``lse[i:j]``, ``log_tail[i:j]``.
    """
    m = z.amax(dim=-1, keepdim=True)
    z_named = z.sub_(m).gather(1, ids)
    e = z.exp_()
    log_total = e.sum(-1).log_()
    log_rest = e.scatter_(1, ids, 0.0).sum(-1).log_() - log_total
    lse[i:j] = m.squeeze(-1) + log_total
    log_tail[i:j] = log_rest
    return torch.cat([z_named - log_total[:, None], log_rest[:, None]], dim=-1)


def cached_kd_loss(student_logits: Tensor, top_ids: Tensor, top_logprobs: Tensor, tail_logprob: Tensor,
                   mask: Tensor | None = None, temperature: float = 2.0, chunk_rows: int | None = None) -> Tensor:
    """``T² · KL(P ‖ Q)`` against a cached teacher, averaged over the non-masked positions (fp32 scalar).

    The teacher is, per position, k distinct token ids (``top_ids``), their ``log softmax(t/T)``
    (``top_logprobs``) and the log of the mass of every other token (``tail_logprob``, −inf when
    k = V), as ``gpt2-distill cache-teacher`` stores them. P is that (k+1)-bucket distribution
    renormalised to sum 1 (fp16 storage rounds each log-probability by up to 2⁻¹¹ relative); Q is the
    student's ``softmax(s/T)`` folded into the same buckets. Folding never increases a KL, so this is
    a lower bound of ``kd_loss`` (equal when k = V). T applies to the student only: the cached values
    are already at the T they were cached at.
    """
    chunk_rows = _checked_chunk_rows(student_logits, temperature, chunk_rows)
    vocab, lead = student_logits.shape[-1], student_logits.shape[:-1]
    if top_ids.shape != top_logprobs.shape or top_ids.shape[:-1] != lead or tail_logprob.shape != lead:
        raise ValueError(f"cached teacher shapes ids {tuple(top_ids.shape)}, log-probabilities "
                         f"{tuple(top_logprobs.shape)}, tail {tuple(tail_logprob.shape)} do not fit student logits "
                         f"{tuple(student_logits.shape)}: expected (..., k), (..., k), (...)")
    k = top_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k = {k} cached tokens per position; must be in [1, {vocab}]")
    dtype, device = _compute_dtype(student_logits.dtype), student_logits.device
    logp = torch.cat([top_logprobs.detach().to(device, dtype), tail_logprob.detach().to(device, dtype)[..., None]], -1)
    logp = (logp - torch.logsumexp(logp, dim=-1, keepdim=True)).reshape(-1, k + 1)
    ids = top_ids.detach().to(device, torch.int64).reshape(-1, k)
    rows = _flat_rows(mask, lead, device)
    return _ChunkedBucketKD.apply(student_logits.reshape(-1, vocab), ids, logp, rows, float(temperature), int(chunk_rows))


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Causal-LM cross entropy in fp32, as GPT2LMHeadModel computes it from unshifted ``labels``.

    Position i predicts ``labels[..., i+1]``; the mean runs over targets != ``ignore_index``. Unlike
    transformers (NaN), a batch with no target returns 0 with a zero gradient.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits' leading shape {tuple(logits.shape[:-1])}")
    # Shift the labels, not the logits: padding the last target with ignore_index avoids copying
    # a (B, T-1, V) slice of the logits (206 MB at 8×128×50257 fp32).
    targets = F.pad(labels[..., 1:], (0, 1), value=ignore_index).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


def hidden_cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over non-masked positions of ``1 − cos(s, t)`` (DistilBERT's hidden-state term), fp32 (0 if none)."""
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(f"hidden widths differ: student {student_hidden.shape[-1]} vs teacher "
                         f"{teacher_hidden.shape[-1]}; cosine loss needs equal widths (add a linear projection of "
                         "the student states)")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden shapes differ: {tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}")
    per_pos = 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.detach().float(), dim=-1)
    if mask is None:
        return per_pos.mean()
    if mask.shape != per_pos.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the hidden states' leading shape {tuple(per_pos.shape)}")
    keep = mask != 0
    # where, not multiply: a NaN at a dropped position must not leak into the mean.
    return torch.where(keep, per_pos, 0.0).sum() / keep.sum().clamp(min=1)
