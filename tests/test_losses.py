"""Loss functions against hand-written references and transformers' own GPT-2 loss.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from python3_distillation.losses import hidden_cosine_loss, kd_loss, lm_loss

SHAPES = [(2, 3, 5), (3, 7, 50257)]  # tiny, and GPT-2's vocabulary (21 rows: no chunk size below divides it)
TEMPERATURES = [0.5, 1.0, 2.0, 4.0]
CHUNKS = [1, 4, 5, 64]  # 4 and 5 divide neither 6 nor 21 rows; 64 is larger than both


def _logits(shape, seed: int, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _kl_div_reference(s: torch.Tensor, t: torch.Tensor, temperature: float, mask=None) -> torch.Tensor:
    """The brief's definition: F.kl_div batchmean × T² over the flattened kept rows, in fp32."""
    v = s.shape[-1]
    s2, t2 = s.reshape(-1, v).float(), t.reshape(-1, v).float()
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s2, t2 = s2[keep], t2[keep]
    return F.kl_div(F.log_softmax(s2 / temperature, -1), F.softmax(t2 / temperature, -1), reduction="batchmean") * temperature**2


def _hand_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> float:
    """Σ_rows Σ_v p_t (log p_t − log p_s) / N × T², written out in fp64 with explicit exp/sum."""
    zs = s.double().reshape(-1, s.shape[-1]) / temperature
    zt = t.double().reshape(-1, t.shape[-1]) / temperature
    ps = torch.exp(zs - zs.max(-1, keepdim=True).values)
    ps = ps / ps.sum(-1, keepdim=True)
    pt = torch.exp(zt - zt.max(-1, keepdim=True).values)
    pt = pt / pt.sum(-1, keepdim=True)
    return float((pt * (pt.log() - ps.log())).sum() / zs.shape[0] * temperature**2)


def _trl_jsd_reference(s: torch.Tensor, t: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """TRL's generalized_jsd_loss body (per-position mean), times T² as kd_loss documents; in fp64."""
    v = s.shape[-1]
    ls = F.log_softmax(s.reshape(-1, v).double() / temperature, -1)
    lt = F.log_softmax(t.reshape(-1, v).double() / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=ls.dtype)
        mix = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, lt, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mix, ls, reduction="none", log_target=True
        )
    return jsd.sum() / ls.shape[0] * temperature**2


def _grad_of(fn, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = s.detach().clone().requires_grad_(True)
    loss = fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


# ----------------------------------------------------------------------------------------- kd_loss


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("chunk_rows", CHUNKS)
def test_kd_matches_kl_div_value_and_grad(shape, temperature, chunk_rows):
    s, t = _logits(shape, 0), _logits(shape, 1)
    loss, grad = _grad_of(lambda x: kd_loss(x, t, temperature=temperature, chunk_rows=chunk_rows), s)
    ref, ref_grad = _grad_of(lambda x: _kl_div_reference(x, t, temperature), s)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() > 0.01
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert grad.dtype == torch.float32 and grad.shape == s.shape
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_matches_hand_formula_and_analytic_gradient(temperature):
    shape = (2, 3, 5)
    s, t = _logits(shape, 2), _logits(shape, 3)
    loss, grad = _grad_of(lambda x: kd_loss(x, t, temperature=temperature, chunk_rows=4), s)
    assert loss.item() == pytest.approx(_hand_kl(s, t, temperature), rel=1e-5)
    n = 6
    expected = temperature * (torch.softmax(s.double() / temperature, -1) - torch.softmax(t.double() / temperature, -1)) / n
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_kd_gradcheck_fp64(beta):
    # fp64 inputs are computed in fp64, so torch's finite-difference check applies directly.
    s = _logits((2, 3, 7), 4, dtype=torch.float64).requires_grad_(True)
    t = _logits((2, 3, 7), 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, temperature=1.5, chunk_rows=4, beta=beta), (s,))
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, mask=mask, temperature=1.5, chunk_rows=2, beta=beta), (s,))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 3.0])  # 3: s/T is not exact in bf16, so it must be upcast first
def test_kd_low_precision_inputs(shape, dtype, temperature):
    s, t = _logits(shape, 6, dtype=dtype), _logits(shape, 7, dtype=dtype)
    loss, grad = _grad_of(lambda x: kd_loss(x, t, temperature=temperature, chunk_rows=5), s)
    # Reference on the same (rounded) values upcast to fp32: the only extra error is rounding the
    # returned gradient to the input dtype (bf16: 8 mantissa bits, ~0.4 % relative).
    ref, ref_grad = _grad_of(lambda x: _kl_div_reference(x.float(), t.float(), temperature), s)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert grad.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol * ref_grad.abs().max().item())


def test_kd_mixed_dtypes_student_bf16_teacher_fp32():
    s, t = _logits((2, 3, 50257), 8, dtype=torch.bfloat16), _logits((2, 3, 50257), 9)
    loss, grad = _grad_of(lambda x: kd_loss(x, t), s)
    ref, ref_grad = _grad_of(lambda x: _kl_div_reference(x.float(), t, 2.0), s)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-2 * ref_grad.abs().max().item())


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_zero_for_identical_logits(beta, temperature):
    s = _logits((3, 7, 50257), 10)
    loss, grad = _grad_of(lambda x: kd_loss(x, s.clone(), temperature=temperature, chunk_rows=4, beta=beta), s)
    assert loss.item() == 0.0
    assert grad.abs().max().item() < 1e-12


def test_kd_zero_for_identical_logits_jsd():
    s = _logits((2, 3, 5), 11)
    loss, grad = _grad_of(lambda x: kd_loss(x, s.clone(), beta=0.5), s)
    assert abs(loss.item()) < 1e-6
    assert grad.abs().max().item() < 1e-7


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunk_rows", [1, 4, 64])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
def test_kd_mask_matches_reference_on_kept_rows(shape, chunk_rows, mask_dtype):
    s, t = _logits(shape, 12), _logits(shape, 13)
    g = torch.Generator().manual_seed(14)
    mask = torch.rand(shape[:-1], generator=g) < 0.6
    mask[0, 0], mask[-1, -1] = True, False  # at least one kept and one dropped position
    m = mask.to(mask_dtype)
    loss, grad = _grad_of(lambda x: kd_loss(x, t, mask=m, temperature=2.0, chunk_rows=chunk_rows), s)
    ref, ref_grad = _grad_of(lambda x: _kl_div_reference(x, t, 2.0, mask=mask), s)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)
    assert torch.all(grad[~mask] == 0)
    assert grad[mask].abs().sum() > 0


def test_kd_masked_positions_change_nothing():
    shape = (3, 7, 50257)
    s, t = _logits(shape, 15), _logits(shape, 16)
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 0] = False
    loss_a, grad_a = _grad_of(lambda x: kd_loss(x, t, mask=mask, chunk_rows=4), s)
    # Scramble both student and teacher logits wherever the mask is off.
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = _logits(s2[~mask].shape, 17) * 10
    t2[~mask] = _logits(t2[~mask].shape, 18) * 10
    loss_b, grad_b = _grad_of(lambda x: kd_loss(x, t2, mask=mask, chunk_rows=4), s2)
    assert loss_a.item() == loss_b.item()
    assert torch.equal(grad_a, grad_b)
    assert torch.all(grad_b[~mask] == 0)


def test_kd_all_masked_is_zero_not_nan():
    s, t = _logits((2, 3, 5), 19), _logits((2, 3, 5), 20)
    loss, grad = _grad_of(lambda x: kd_loss(x, t, mask=torch.zeros(2, 3, dtype=torch.bool)), s)
    assert loss.item() == 0.0 and not math.isnan(loss.item())
    assert torch.equal(grad, torch.zeros_like(s))


def test_kd_full_mask_equals_no_mask():
    s, t = _logits((2, 3, 5), 21), _logits((2, 3, 5), 22)
    a, ga = _grad_of(lambda x: kd_loss(x, t, mask=torch.ones(2, 3)), s)
    b, gb = _grad_of(lambda x: kd_loss(x, t), s)
    assert a.item() == b.item() and torch.equal(ga, gb)


def test_kd_teacher_gets_no_gradient():
    # Documented behaviour: kd_loss detaches the teacher, so a leaf teacher keeps .grad None and
    # nothing upstream of a non-leaf teacher (here a weight) receives a gradient either.
    s = _logits((2, 3, 5), 23).requires_grad_(True)
    teacher_leaf = _logits((2, 3, 5), 24).requires_grad_(True)
    kd_loss(s, teacher_leaf).backward()
    assert teacher_leaf.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0

    w = torch.randn(5, 5, requires_grad=True)
    teacher_graph = _logits((2, 3, 5), 25) @ w
    s2 = _logits((2, 3, 5), 26).requires_grad_(True)
    kd_loss(s2, teacher_graph).backward()
    assert w.grad is None


def test_kd_backward_scales_with_upstream_gradient():
    s, t = _logits((2, 3, 5), 27), _logits((2, 3, 5), 28)
    _, g1 = _grad_of(lambda x: kd_loss(x, t), s)
    _, g3 = _grad_of(lambda x: 0.25 * kd_loss(x, t) + 0.0 * x.sum(), s)
    torch.testing.assert_close(g3, 0.25 * g1)


def test_kd_grad_flows_through_noncontiguous_logits():
    big = _logits((2, 4, 50257), 29)
    t = _logits((2, 3, 50257), 30)
    loss, grad = _grad_of(lambda x: kd_loss(x[:, :-1], t, chunk_rows=4), big)
    ref, ref_grad = _grad_of(lambda x: _kl_div_reference(x[:, :-1], t, 2.0), big)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)
    assert torch.all(grad[:, -1] == 0)


def test_kd_does_not_modify_inputs():
    s, t = _logits((2, 3, 5), 31), _logits((2, 3, 5), 32)
    s0, t0 = s.clone(), t.clone()
    x = s.requires_grad_(True)
    kd_loss(x, t, temperature=3.0).backward()
    assert torch.equal(s.detach(), s0) and torch.equal(t, t0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_kd_beta_matches_trl_generalized_jsd(shape, beta, temperature=1.5):
    s, t = _logits(shape, 33), _logits(shape, 34)
    loss, grad = _grad_of(lambda x: kd_loss(x, t, temperature=temperature, chunk_rows=5, beta=beta), s)
    # fp64 reference: in fp32 the reverse-KL gradient p_s·(log p_s − log p_t − KL) cancels, and an
    # fp32 autograd reference is itself ~7× further from fp64 than kd_loss is.
    ref, ref_grad = _grad_of(lambda x: _trl_jsd_reference(x, t, temperature, beta), s)
    assert loss.item() > 1e-3
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-4, atol=1e-6 * ref_grad.abs().max().item())


def test_kd_reverse_kl_is_forward_kl_with_roles_swapped():
    s, t = _logits((2, 3, 5), 35), _logits((2, 3, 5), 36)
    assert kd_loss(s, t, beta=1.0).item() == pytest.approx(_hand_kl(t, s, 2.0), rel=1e-5)


def test_kd_teacher_minus_inf_logits_are_zero_probability():
    # A teacher that bans tokens with -inf (filtered vocab) must give a finite loss, as F.kl_div does.
    s, t = _logits((2, 3, 5), 37), _logits((2, 3, 5), 38)
    t[..., 0] = -math.inf
    loss, grad = _grad_of(lambda x: kd_loss(x, t), s)
    ref, ref_grad = _grad_of(lambda x: _kl_div_reference(x, t, 2.0), s)
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_kd_works_without_grad():
    s, t = _logits((2, 3, 5), 39), _logits((2, 3, 5), 40)
    with torch.no_grad():
        loss = kd_loss(s, t)
    torch.testing.assert_close(loss, _kl_div_reference(s, t, 2.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(teacher=(2, 3, 6)), "same shape"),
        (dict(mask=torch.ones(3, 2)), "mask shape"),
        (dict(temperature=0.0), "temperature"),
        (dict(chunk_rows=0), "chunk_rows"),
        (dict(beta=1.5), "beta"),
    ],
)
def test_kd_rejects_bad_arguments(kwargs, match):
    s = _logits((2, 3, 5), 41)
    t = _logits(kwargs.pop("teacher", (2, 3, 5)), 42)
    with pytest.raises(ValueError, match=match):
        kd_loss(s, t, **kwargs)


# ----------------------------------------------------------------------------------------- lm_loss


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=97)
    return GPT2LMHeadModel(cfg).eval()


def test_lm_loss_equals_gpt2_lm_head_loss():
    model = _tiny_gpt2()
    g = torch.Generator().manual_seed(43)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, 7:] = -100  # right padding
    labels[2, :3] = -100  # ignored prompt
    for lab in (ids, labels):
        out = model(input_ids=ids, labels=lab)
        torch.testing.assert_close(lm_loss(out.logits, lab), out.loss, rtol=1e-6, atol=1e-6)


def test_lm_loss_gradient_matches_gpt2_lm_head_loss():
    model = _tiny_gpt2()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(44))
    out = model(input_ids=ids, labels=ids)
    logits = out.logits.detach().requires_grad_(True)
    lm_loss(logits, ids).backward()
    (ref_grad,) = torch.autograd.grad(out.loss, out.logits)
    torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_lm_loss_hand_formula_and_bf16_in_fp32():
    logits = _logits((2, 4, 5), 45, dtype=torch.bfloat16)
    labels = torch.tensor([[1, 2, 3, 4], [0, -100, 2, 1]])
    # Targets: row 0 positions 0..2 predict 2,3,4; row 1 position 1 predicts 2, position 2 predicts 1.
    lp = torch.log_softmax(logits.double(), -1)
    terms = [-lp[0, 0, 2], -lp[0, 1, 3], -lp[0, 2, 4], -lp[1, 1, 2], -lp[1, 2, 1]]
    loss = lm_loss(logits, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)


def test_lm_loss_custom_ignore_index_and_no_targets():
    logits = _logits((2, 4, 5), 46).requires_grad_(True)
    labels = torch.full((2, 4), 7)
    loss = lm_loss(logits, labels, ignore_index=7)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError, match="labels shape"):
        lm_loss(logits, labels[:, :3])


# ------------------------------------------------------------------------------- hidden_cosine_loss


def test_cosine_zero_for_identical_and_matches_hand_formula():
    s, t = _logits((2, 3, 16), 47), _logits((2, 3, 16), 48)
    assert hidden_cosine_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    sd, td = s.double(), t.double()
    cos = (sd * td).sum(-1) / (sd.norm(dim=-1) * td.norm(dim=-1))
    assert hidden_cosine_loss(s, t).item() == pytest.approx(float((1 - cos).mean()), rel=1e-6)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    assert hidden_cosine_loss(s, t, mask).item() == pytest.approx(float((1 - cos)[mask].mean()), rel=1e-6)
    # Opposite vectors: 1 − (−1) = 2.
    assert hidden_cosine_loss(s, -s).item() == pytest.approx(2.0, rel=1e-6)


def test_cosine_masking_teacher_and_errors():
    s = _logits((2, 3, 16), 49).requires_grad_(True)
    t = _logits((2, 3, 16), 50).requires_grad_(True)
    hidden_cosine_loss(s, t, torch.tensor([[1, 1, 0], [1, 0, 0]])).backward()
    assert t.grad is None
    assert torch.all(s.grad[0, 2] == 0) and torch.all(s.grad[1, 1:] == 0) and s.grad[0, 0].abs().sum() > 0
    zero = hidden_cosine_loss(s, t, torch.zeros(2, 3))
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match="widths differ"):
        hidden_cosine_loss(s, _logits((2, 3, 8), 51))


def test_kd_nan_logits_are_not_hidden():
    s, t = _logits((2, 3, 5), 52), _logits((2, 3, 5), 53)
    s[1, 2, 3] = math.nan
    assert math.isnan(kd_loss(s, t).item())


def test_default_chunk_rows_counts_elements():
    from python3_distillation.losses import CHUNK_ELEMENTS, default_chunk_rows

    assert default_chunk_rows(50257) == 16
    assert default_chunk_rows(97) == CHUNK_ELEMENTS // 97
    assert default_chunk_rows(10**9) == 1
    # The default path (one chunk for a tiny vocabulary) gives the reference value too.
    s, t = _logits((4, 9, 97), 54), _logits((4, 9, 97), 55)
    loss, grad = _grad_of(lambda x: kd_loss(x, t), s)
    ref, ref_grad = _grad_of(lambda x: _kl_div_reference(x, t, 2.0), s)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_cosine_nan_at_dropped_position_does_not_leak():
    s, t = _logits((1, 3, 4), 56), _logits((1, 3, 4), 57)
    s[0, 2] = math.nan
    mask = torch.tensor([[True, True, False]])
    assert math.isfinite(hidden_cosine_loss(s, t, mask).item())


def test_kd_single_position():
    s, t = _logits((1, 1, 7), 58), _logits((1, 1, 7), 59)
    loss, grad = _grad_of(lambda x: kd_loss(x, t, temperature=1.5), s)
    assert loss.item() == pytest.approx(_hand_kl(s, t, 1.5), rel=1e-5)
    expected = 1.5 * (torch.softmax(s.double() / 1.5, -1) - torch.softmax(t.double() / 1.5, -1))
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-8)


def test_kd_same_bits_for_any_thread_count():
    # Chunks run on single-threaded workers and are summed in chunk order, so the worker count
    # (torch.get_num_threads()) must not change a single bit of the loss or the gradient.
    s, t = _logits((3, 7, 50257), 60), _logits((3, 7, 50257), 61)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 3:] = False
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_grad_of(lambda x: kd_loss(x, t, mask=mask, chunk_rows=2), s))
            assert torch.get_num_threads() == threads  # the caller's setting is left alone
    finally:
        torch.set_num_threads(saved)
    for loss, grad in results[1:]:
        assert loss.item() == results[0][0].item()
        assert torch.equal(grad, results[0][1])


def test_kd_single_chunk_same_bits_for_any_thread_count():
    s, t = _logits((1, 3, 50257), 64), _logits((1, 3, 50257), 65)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grad_of(lambda x: kd_loss(x, t), s)
        torch.set_num_threads(2)
        two = _grad_of(lambda x: kd_loss(x, t), s)
    finally:
        torch.set_num_threads(saved)
    assert one[0].item() == two[0].item() and torch.equal(one[1], two[1])


def test_kd_under_cpu_autocast_stays_fp32():
    s, t = _logits((2, 3, 50257), 62), _logits((2, 3, 50257), 63)
    ref, ref_grad = _grad_of(lambda x: kd_loss(x, t), s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad = _grad_of(lambda x: kd_loss(x, t), s)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert loss.item() == ref.item()
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
