"""Offline KD: the cached-teacher loss against references, and the cache written, resumed and trained from.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_teacher_cache.py -q

The loss (``losses.cached_kd_loss``) is checked against ``F.kl_div`` on the (k+1)-bucket
distributions built another way (a 0/1 membership mask, probabilities rather than logsumexp), its
gradient against autograd through that reference and ``gradcheck``, and against the full-vocabulary
``kd_loss`` (equal at k = V, never larger below). The command is run for real on a tiny teacher.
"""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TEXT, tiny_gpt2, tiny_overrides
from python3_distillation.cli import main as cli_main
from python3_distillation.errors import DataError
from python3_distillation.losses import cached_kd_loss, kd_loss
from python3_distillation.teacher_cache import (MANIFEST, TeacherCache, bytes_per_position, cache_teacher,
                                                teacher_buckets)


def _logits(shape, seed: int, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _random_ids(lead, vocab: int, k: int, seed: int) -> torch.Tensor:
    """k distinct token ids per position, not the teacher's top-k: the loss must not assume an order."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(vocab, generator=g)[:k] for _ in range(math.prod(lead))]
    return torch.stack(rows).reshape(*lead, k)


def _teacher_rows(t: torch.Tensor, ids: torch.Tensor, temperature: float):
    """The teacher's log-probabilities of ``ids`` and of the rest, fp32, from full logits (fp64 sums)."""
    logp = torch.log_softmax(t.double() / temperature, -1)
    top = logp.gather(-1, ids)
    rest = (logp.exp().sum(-1) - top.exp().sum(-1)).clamp_min(0).log()
    return top.float(), rest.float()


def _bucket_reference(s, ids, logp_top, tail, temperature, mask=None) -> torch.Tensor:
    """``F.kl_div`` × T² on the (k+1)-bucket distributions, built with a 0/1 membership mask, in fp64."""
    v, k = s.shape[-1], ids.shape[-1]
    q = F.softmax(s.reshape(-1, v).double() / temperature, -1)
    ids2 = ids.reshape(-1, k)
    member = torch.zeros_like(q).scatter_(1, ids2, 1.0)
    big_q = torch.cat([q.gather(1, ids2), (q * (1 - member)).sum(-1, keepdim=True)], -1)
    big_p = torch.cat([logp_top.reshape(-1, k).double().exp(), tail.reshape(-1, 1).double().exp()], -1)
    big_p = big_p / big_p.sum(-1, keepdim=True)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        big_q, big_p = big_q[keep], big_p[keep]
    return F.kl_div(big_q.log(), big_p, reduction="batchmean") * temperature**2


# ----------------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("shape, k, temperature, chunk_rows", [
    *[((2, 3, 5), k, t, c) for k in (1, 3) for t in (1.0, 2.0) for c in (1, 4, None)],  # 4 divides no 6 rows
    *[((3, 7, 50257), k, t, None) for k in (1, 64) for t in (1.0, 2.0)],  # GPT-2's vocabulary, 21 rows
    ((3, 7, 50257), 64, 2.0, 5),
])
def test_cached_kd_matches_kl_div_on_buckets(shape, k, temperature, chunk_rows):
    s = _logits(shape, 0).requires_grad_(True)
    t = _logits(shape, 1)
    ids = _random_ids(shape[:-1], shape[-1], k, 2)
    top, tail = _teacher_rows(t, ids, temperature)
    got = cached_kd_loss(s, ids, top, tail, temperature=temperature, chunk_rows=chunk_rows)
    got.backward()
    s_ref = s.detach().clone().requires_grad_(True)
    ref = _bucket_reference(s_ref, ids, top, tail, temperature)
    ref.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s_ref.grad.double(), rtol=1e-4, atol=1e-7)


def test_cached_kd_gradcheck_fp64():
    s = _logits((2, 3, 7), 3, dtype=torch.float64).requires_grad_(True)
    t = _logits((2, 3, 7), 4, dtype=torch.float64)
    ids = _random_ids((2, 3), 7, 3, 5)
    top, tail = _teacher_rows(t, ids, 1.5)
    top, tail = top.double(), tail.double()
    assert torch.autograd.gradcheck(lambda x: cached_kd_loss(x, ids, top, tail, temperature=1.5, chunk_rows=2), (s,))


@pytest.mark.parametrize("vocab", [5, 50257])
def test_cached_kd_equals_the_full_kl_when_k_is_the_vocabulary(vocab):
    shape, temperature = (2, 3, vocab), 2.0
    s = _logits(shape, 6).requires_grad_(True)
    t = _logits(shape, 7)
    # Exactly what the cache stores (top-V in descending order, tail −inf), but fp32 log-probabilities.
    logp = torch.log_softmax(t / temperature, -1)
    top = logp.topk(vocab, dim=-1)
    tail = torch.full(shape[:-1], -math.inf)
    got = cached_kd_loss(s, top.indices, top.values, tail, temperature=temperature)
    got.backward()
    s_full = s.detach().clone().requires_grad_(True)
    full = kd_loss(s_full, t, temperature=temperature)
    full.backward()
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s_full.grad, rtol=1e-4, atol=1e-8)
    # The cache's own fp16 rows: the same up to fp16's rounding of the log-probabilities.
    c_logp, c_ids, c_tail = teacher_buckets(t, vocab, temperature)
    assert torch.isinf(c_tail).all()
    torch.testing.assert_close(cached_kd_loss(s.detach(), c_ids, c_logp, c_tail, temperature=temperature), full.detach(),
                               rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("k", [1, 8, 100, 1000])
def test_cached_kd_lower_bounds_the_full_kl(k):
    """Folding tokens into one bucket never increases a KL (data processing)."""
    shape = (2, 4, 2000)
    for seed in range(3):
        s, t = _logits(shape, 10 + seed), _logits(shape, 20 + seed)
        logp, ids, tail = teacher_buckets(t, k, 2.0)
        cached = cached_kd_loss(s, ids, logp.float(), tail, temperature=2.0)
        full = kd_loss(s, t, temperature=2.0)
        assert 0.0 <= cached.item() <= full.item() + 1e-6
    assert cached.item() < full.item()  # strictly, here: the tails' shapes differ


def test_cached_kd_is_zero_for_the_teacher_itself():
    t = _logits((2, 5, 300), 30)
    logp, ids, tail = teacher_buckets(t, 16, 2.0)
    exact = torch.log_softmax(t / 2.0, -1).gather(-1, ids.long())
    assert cached_kd_loss(t, ids, exact, tail, temperature=2.0).abs().item() < 1e-6
    assert cached_kd_loss(t, ids, logp, tail, temperature=2.0).abs().item() < 1e-4  # fp16 storage


def test_cached_kd_mask_and_all_masked():
    shape, k = (3, 7, 50), 4
    s = _logits(shape, 40).requires_grad_(True)
    t = _logits(shape, 41)
    logp, ids, tail = teacher_buckets(t, k, 1.0)
    mask = torch.ones(shape[:-1], dtype=torch.long)
    mask[0, 2:] = 0
    mask[2, :3] = 0
    got = cached_kd_loss(s, ids, logp, tail, mask=mask, temperature=1.0, chunk_rows=3)
    got.backward()
    torch.testing.assert_close(got.double(), _bucket_reference(s.detach(), ids.long(), logp, tail, 1.0, mask),
                               rtol=1e-5, atol=1e-6)
    assert s.grad[mask == 0].abs().max() == 0 and s.grad[mask == 1].abs().max() > 0
    s.grad = None
    none = cached_kd_loss(s, ids, logp, tail, mask=torch.zeros_like(mask), temperature=1.0)
    none.backward()
    assert none.item() == 0 and s.grad.abs().max() == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"ids": torch.zeros(2, 3, 4, dtype=torch.long)}, "do not fit"),
    ({"tail": torch.zeros(2, 4)}, "do not fit"),
    ({"temperature": 0.0}, "temperature"),
    ({"chunk_rows": 0}, "chunk_rows"),
])
def test_cached_kd_rejects_bad_arguments(kwargs, match):
    s = _logits((2, 3, 10), 0)
    args = {"ids": torch.zeros(2, 3, 2, dtype=torch.long), "logp": torch.zeros(2, 3, 2), "tail": torch.zeros(2, 3)}
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(ValueError, match=match):
        cached_kd_loss(s, args["ids"], args["logp"], args["tail"], temperature=kwargs.get("temperature", 1.0),
                       chunk_rows=kwargs.get("chunk_rows"))


def test_teacher_buckets_are_the_top_k_and_the_rest():
    t = _logits((3, 200), 50)
    logp, ids, tail = teacher_buckets(t, 10, 2.0)
    assert (logp.dtype, ids.dtype, tail.dtype) == (torch.float16, torch.int32, torch.float32)
    p = torch.softmax(t.double() / 2.0, -1)
    order = p.argsort(-1, descending=True)[:, :10]
    assert torch.equal(ids.long(), order)
    torch.testing.assert_close(logp.double(), p.gather(-1, order).log(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(tail.double(), (1 - p.gather(-1, order).sum(-1)).log(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- the command

K = 8


def peaked_gpt2(seed: int):
    """A tiny random GPT-2 whose next-token distributions are far from uniform (a freshly initialised
    one's logits are ~0.1 apart, and every KL between such models is ~0): the tied embedding ×30."""
    model = tiny_gpt2(seed=seed)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(30)
    return model


def _overrides(tmp: Path, corpus: dict[str, Path], **distill) -> list[str]:
    return tiny_overrides(tmp, corpus, "distill", student={"n_layer": 1},
                          distill={"cache_top_k": K, "teacher_cache": tmp / "cache", **distill},
                          train={"max_steps": 4, "save_every": 2})


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tokenizer):
    """A tiny teacher and its cache, made by the command after an interruption (shards of 8 blocks)."""
    from python3_distillation.config import load_config
    from python3_distillation.models import save_model

    tmp = tmp_path_factory.mktemp("teacher_cache")
    corpus = {"train": tmp / "train.txt", "validation": tmp / "validation.txt"}
    corpus["train"].write_text(TEXT * 12, encoding="utf-8")  # 31 blocks of 32 tokens
    corpus["validation"].write_text(TEXT * 4, encoding="utf-8")
    save_model(peaked_gpt2(11), tokenizer, tmp / "teacher")
    cfg = load_config([], _overrides(tmp, corpus))

    class Interrupted(Exception):
        pass

    def stop_after_2(shard: int):
        if shard == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        cache_teacher(cfg, shard_blocks=8, on_shard=stop_after_2)
    partial = tmp / ".cache.partial"
    assert not (tmp / "cache").exists() and {p.name for p in partial.glob("shard-*")} >= {"shard-00000.ids", "shard-00001.tail"}
    return {"tmp": tmp, "corpus": corpus, "cfg": cfg, "cache": cache_teacher(cfg, shard_blocks=8)}


def test_cache_resumes_and_equals_an_uninterrupted_one(cached, tokenizer):
    cfg, cache, tmp = cached["cfg"], cached["cache"], cached["tmp"]
    assert cache.manifest["resumed"] is True and not (tmp / ".cache.partial").exists()
    fresh = cache_teacher(cfg, out=tmp / "fresh", shard_blocks=8)
    assert fresh.key == cache.key and fresh.manifest["resumed"] is False
    files = sorted(p.name for p in (tmp / "cache").iterdir() if p.name != MANIFEST)
    assert files == sorted(p.name for p in (tmp / "fresh").iterdir() if p.name != MANIFEST)
    assert len(files) == 3 * math.ceil(cache.n_blocks / 8) >= 12
    for name in files:
        assert (tmp / "cache" / name).read_bytes() == (tmp / "fresh" / name).read_bytes(), name
    m = cache.manifest
    assert (m["top_k"], m["temperature"], m["block_size"], m["dtypes"]) == (K, 2.0, 32, {"logprobs": "float16", "ids": "int32", "tail": "float32"})
    assert m["bytes"] == cache.n_blocks * 32 * bytes_per_position(K) == cache.n_blocks * 32 * 52


def test_cached_rows_are_the_teachers_top_k_of_those_blocks(cached, tokenizer):
    from python3_distillation.data import load_blocks
    from python3_distillation.models import open_model

    cfg, cache = cached["cfg"], cached["cache"]
    blocks = load_blocks(cfg.data, tokenizer, seed=cfg.train.seed)["train"]
    idx = torch.tensor([17, 0, len(blocks) - 1])
    ids, logp, tail = cache.rows(idx)
    assert ids.shape == (3, 32, K) and logp.shape == (3, 32, K) and tail.shape == (3, 32)
    with torch.no_grad():
        logits = open_model(cfg.teacher.path).model(blocks.ids[idx]).logits
    assert torch.equal(ids, teacher_buckets(logits, K, 2.0)[1].long())  # the blocks asked for, in their order
    # By hand, in fp64: p = softmax(logits / T); the cached ids are the K most likely tokens in
    # descending order, their log-probabilities log p, and the rest bucket log(1 − Σ p of the K).
    p = torch.softmax(logits.double() / 2.0, -1)
    p_cached = p.gather(-1, ids)
    assert (p_cached[..., :-1] >= p_cached[..., 1:] - 1e-9).all()
    kth = p.topk(K, dim=-1).values[..., -1]
    torch.testing.assert_close(p_cached[..., -1], kth, rtol=0, atol=1e-9)  # the top K (up to exact ties)
    torch.testing.assert_close(logp.double(), p_cached.log(), rtol=1e-3, atol=2e-3)  # fp16 storage
    rest = 1 - p_cached.sum(-1)
    assert (rest > 1e-6).all()  # far from cancelling to 0: log(1 − Σ) is the reference here
    torch.testing.assert_close(tail.double(), rest.log(), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        cache.rows(torch.tensor([len(blocks)]))


def test_cache_teacher_cli_is_up_to_date_the_second_time(cached, capsys):
    tmp, corpus = cached["tmp"], cached["corpus"]
    before = (tmp / "cache" / MANIFEST).read_text()
    capsys.readouterr()
    assert cli_main(["cache-teacher", *_overrides(tmp, corpus)]) == 0
    out, err = capsys.readouterr()
    assert "up to date" in err and f"distill.teacher_cache={tmp / 'cache'}" in out
    # The printed size is the cache's: 6k + 4 = 52 bytes per position, per million positions in MiB.
    n_blocks = cached["cache"].n_blocks
    assert f"{n_blocks:,} blocks × 32 tokens ({n_blocks * 32:,} positions), top {K} at T=2" in out
    assert f"{n_blocks * 32 * 52 / 2**20:,.1f} MiB ({52e6 / 2**20:,.1f} MiB per million tokens)" in out
    assert (tmp / "cache" / MANIFEST).read_text() == before


def test_distill_from_the_cache_keeps_no_teacher_and_fingerprints_the_cache(cached, monkeypatch, capsys):
    import python3_distillation.distill as distill_module
    from python3_distillation import checkpoint as ckpt_io
    from python3_distillation.config import load_config
    from python3_distillation.distill import run_distill

    tmp, corpus, cache = cached["tmp"], cached["corpus"], cached["cache"]
    loaded: list[weakref.ref] = []
    real_open = distill_module.open_model

    def open_model(*a, **k):
        opened = real_open(*a, **k)
        loaded.append(weakref.ref(opened.model))
        return opened

    alive: list[bool] = []

    def on_step(step):
        gc.collect()
        alive.append(any(r() is not None for r in loaded))

    monkeypatch.setattr(distill_module, "open_model", open_model)
    cfg = load_config([], _overrides(tmp, corpus))
    out = run_distill(cfg, on_step=on_step)
    assert loaded and alive == [False] * 4  # the teacher was loaded (the student starts from it), then let go
    meta = json.loads((out / "distill_meta.json").read_text())
    assert meta["teacher_cache"] == {"key": cache.key, "top_k": K, "temperature": 2.0}
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in rows if "kd" in r)
    state = ckpt_io.verify(cfg.run_dir / "checkpoint-4")
    assert state["fingerprint"]["inputs"]["teacher_cache"] == cache.key

    # Another cache (top 4) is another input: --resume starts the stage afresh and says why.
    monkeypatch.setattr(distill_module, "open_model", real_open)
    other = _overrides(tmp, corpus, cache_top_k=4, teacher_cache=tmp / "cache4")
    assert cli_main(["cache-teacher", *other]) == 0
    capsys.readouterr()
    assert cli_main(["distill", *other, "--resume"]) == 0
    notice = [line for line in capsys.readouterr().err.splitlines() if "starting it afresh" in line]
    assert len(notice) == 1 and "teacher_cache" in notice[0]


def test_cached_kd_in_the_loss_equals_the_live_teacher_at_k_vocab(tmp_path, tokenizer):
    """Batch rows looked up by block index: the cache (k = V) gives the live teacher's kd term."""
    from python3_distillation.config import load_config
    from python3_distillation.data import load_blocks
    from python3_distillation.distill import make_distill_loss
    from python3_distillation.models import save_model
    from python3_distillation.train import make_batch

    corpus = {"train": tmp_path / "train.txt", "validation": tmp_path / "validation.txt"}
    corpus["train"].write_text(TEXT, encoding="utf-8")  # 5 blocks of 16: 80 positions × 50,257 × 6 bytes
    corpus["validation"].write_text(TEXT, encoding="utf-8")
    teacher = peaked_gpt2(12)
    save_model(teacher, tokenizer, tmp_path / "teacher")
    cfg = load_config([], _overrides(tmp_path, corpus, cache_top_k=50257) + ["data.block_size=16"])
    cache = cache_teacher(cfg)
    blocks = load_blocks(cfg.data, tokenizer, seed=cfg.train.seed)["train"]
    assert cache.n_blocks == len(blocks) >= 4
    batch = make_batch(blocks, torch.tensor([3, 0, 2]), "cpu")
    student = tiny_gpt2(seed=13).train()
    live_total, live = make_distill_loss(teacher, cfg.distill)(student, batch)
    live_total.backward()
    live_grad = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    cached_total, from_cache = make_distill_loss(None, cfg.distill, cache=cache)(student, batch)
    cached_total.backward()
    assert set(from_cache) == set(live) == {"kd", "ce"}
    torch.testing.assert_close(from_cache["ce"], live["ce"], rtol=0, atol=0)
    torch.testing.assert_close(from_cache["kd"], live["kd"], rtol=2e-3, atol=1e-4)  # fp16 log-probabilities
    for a, b in zip(live_grad, (p.grad for p in student.parameters())):
        assert (b - a).norm() <= 2e-3 * a.norm(), ((b - a).norm(), a.norm())
    # The wrong rows give another number: the lookup follows block_index.
    shuffled = dict(batch, block_index=torch.tensor([0, 3, 2]))
    _, wrong = make_distill_loss(None, cfg.distill, cache=cache)(student, shuffled)
    assert abs(wrong["kd"].item() - live["kd"].item()) > 1e-2


@pytest.mark.parametrize("override, message", [
    ("distill.temperature=4", "holds the teacher at T=2"),
    ("distill.cache_top_k=16", "holds the top 8"),
    ("distill.on_policy_fraction=0.5", "on_policy_fraction needs the live teacher"),
    ("distill.loss=jsd", "distill.loss=jsd needs the live teacher"),
    ("distill.alpha_cos=0.5", "alpha_cos needs the teacher's hidden states"),
    ("data.block_size=16", "cached over other training blocks"),
    ("distill.teacher_cache=/nonexistent/cache", "no teacher cache there"),
])
def test_distill_refuses_a_cache_that_does_not_fit(cached, capsys, override, message):
    tmp, corpus = cached["tmp"], cached["corpus"]
    capsys.readouterr()
    assert cli_main(["distill", *_overrides(tmp, corpus), "train.run_dir=" + str(tmp / "refused"), override]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp / "refused").exists()


def test_cache_of_another_teacher_is_refused(cached, tokenizer, tmp_path, capsys):
    from python3_distillation.models import save_model

    tmp, corpus = cached["tmp"], cached["corpus"]
    save_model(peaked_gpt2(99), tokenizer, tmp_path / "other-teacher")
    capsys.readouterr()
    args = ["distill", *_overrides(tmp, corpus), f"teacher.path={tmp_path / 'other-teacher'}",
            f"train.run_dir={tmp_path / 'run'}"]
    assert cli_main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "cached from another teacher" in err[0], err
    # cache-teacher refuses to write over a folder that is not a cache, and a non-distill config.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert cli_main(["cache-teacher", *_overrides(tmp, corpus), f"distill.teacher_cache={tmp_path / 'notes'}"]) == 2
    assert "is not a teacher cache" in capsys.readouterr().err and (tmp_path / "notes" / "keep.txt").exists()
    assert cli_main(["cache-teacher", "--config", "teacher"]) == 2
    assert "reads a distillation config" in capsys.readouterr().err


def test_teacher_cache_reopens_what_it_wrote_and_refuses_a_truncated_shard(cached, tmp_path):
    import shutil

    written = cached["cache"]
    cache = TeacherCache.open(cached["tmp"] / "cache")
    assert cache.manifest == written.manifest and cache.summary() == written.summary()
    on_disk = sum(p.stat().st_size for p in cache.folder.iterdir() if p.name != MANIFEST)
    assert cache.n_bytes == on_disk == cache.n_blocks * 32 * bytes_per_position(K)
    every = cache.rows(torch.arange(cache.n_blocks))
    idx = torch.tensor([cache.n_blocks - 1, 3, 4, 5, 9])  # across shards of 8, consecutive and not
    for got, whole in zip(cache.rows(idx), every):
        assert torch.equal(got, whole[idx])
    copy = tmp_path / "copy"
    shutil.copytree(cache.folder, copy)
    with (copy / "shard-00001.logprobs").open("r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"shard-00001\.logprobs does not match its manifest: 100 bytes, not \d+"):
        TeacherCache.open(copy)
    (copy / "shard-00001.logprobs").unlink()
    with pytest.raises(DataError, match=r"shard-00001\.logprobs is missing; run cache-teacher again"):
        TeacherCache.open(copy)
