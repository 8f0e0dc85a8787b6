"""Cached teacher logits (offline KD): the teacher runs once, distillation then reads its answers.

    gpt2-distill cache-teacher --config v2                                # → <data dir>/teacher_cache/v2
    gpt2-distill distill --config v2 distill.teacher_cache=data/teacher_cache/v2   # no teacher in memory

``cache-teacher`` runs the configured teacher over every training block (the token shards, in
block order) and keeps, at every position, its ``distill.cache_top_k`` most likely tokens with their
log-probabilities ``log softmax(t/T)`` (fp16, int32 ids) and the log of the probability of all the
other tokens together (fp32: the tail). Training with ``distill.teacher_cache=DIR`` looks each
batch's rows up by block index and takes the kd term as the KL between (k+1)-bucket distributions
(``losses.cached_kd_loss``): the k tokens and "everything else", for the teacher as stored and for
the student's full softmax folded the same way. That keeps it a proper divergence over the whole
vocabulary, one that lower-bounds the full-vocabulary KL (equal to it at k = V).

The temperature is baked in: the tail's mass depends on T (it is a sum over tokens the cache does
not hold), so the cache is made at ``distill.temperature`` and training at any other T is refused.

Files (``DIR/``): ``shard-NNNNN.logprobs`` (float16), ``.ids`` (int32), ``.tail`` (float32), raw
C-order arrays of ``(blocks, block_size, k)`` / ``(blocks, block_size)``, each shard a run of
consecutive blocks, ~64 MiB; ``manifest.json`` binds them to the teacher (``lineage.weights_sha256``),
the token shards and block size (the data fingerprint), T and k; its ``key`` is the cache's
identity, part of a distillation run's fingerprint. Per position that is ``6k + 4`` bytes: 388 at
k = 64, ~200× the 2-byte token it describes. Shards are written into ``.<name>.partial/`` beside
the folder, each file renamed into place when complete, so a killed run resumes at the first
unfinished shard; the finished folder is published atomically.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from python3_distillation.errors import ConfigError, DataError, ModelError

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
# The three arrays of a shard: name → dtype. fp16 log-probabilities hold ~3 significant digits,
# far finer than the differences distillation learns from; ids stay int32 for any vocabulary.
ARRAYS = {"logprobs": np.float16, "ids": np.int32, "tail": np.float32}
SHARD_BYTES = 64 << 20  # per shard: small enough to lose little to a kill, large enough to be few files


def bytes_per_position(k: int) -> int:
    """Disk bytes per cached position: k fp16 log-probabilities, k int32 ids, one fp32 tail."""
    return k * (2 + 4) + 4


def default_dir(cfg) -> Path:
    """Where the cache of ``cfg`` goes: ``distill.teacher_cache``, else ``<data dir>/teacher_cache/<name>``."""
    from python3_distillation.paths import data_dir

    return Path(cfg.distill.teacher_cache).expanduser() if cfg.distill.teacher_cache.strip() \
        else data_dir() / "teacher_cache" / cfg.name


@torch.no_grad()
def teacher_buckets(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probabilities (..., k) fp16, ids (..., k) int32, tail (...) fp32) of logits (..., V) at T.

    The top-k of ``log softmax(logits/T)`` in descending order, and the log of the mass of every
    other token: a logsumexp with the k taken out (not log(1 − Σ top-k), which cancels to 0 when
    the k hold nearly all the mass); −inf when k = V.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    top = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, top.indices, -math.inf), dim=-1)
    return top.values.to(torch.float16), top.indices.to(torch.int32), tail


def cache_key(teacher_sha256: str, data: str, n_blocks: int, block_size: int, top_k: int, temperature: float) -> str:
    """The cache's identity: what decides every stored number (not the precision it ran in)."""
    src = {"format": FORMAT, "teacher": teacher_sha256, "data": data, "n_blocks": n_blocks, "block_size": block_size,
           "top_k": top_k, "temperature": float(temperature)}
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:20]


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def _row_shape(name: str, block_size: int, k: int) -> tuple[int, ...]:
    return (block_size,) if name == "tail" else (block_size, k)


def _row_bytes(name: str, block_size: int, k: int) -> int:
    return int(np.prod(_row_shape(name, block_size, k))) * np.dtype(ARRAYS[name]).itemsize


def _shards(n_blocks: int, per_shard: int) -> list[tuple[int, int]]:
    return [(a, min(a + per_shard, n_blocks)) for a in range(0, n_blocks, per_shard)]


def _shard_complete(folder: Path, s: int, n_rows: int, block_size: int, k: int) -> bool:
    for name in ARRAYS:
        f = folder / f"{_shard_name(s)}.{name}"
        if not f.is_file() or f.stat().st_size != n_rows * _row_bytes(name, block_size, k):
            return False
    return True


@dataclass
class TeacherCache:
    """A finished cache folder: rows looked up by training block index."""

    folder: Path
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def n_blocks(self) -> int:
        return int(self.manifest["n_blocks"])

    @property
    def block_size(self) -> int:
        return int(self.manifest["block_size"])

    @property
    def n_bytes(self) -> int:
        return int(self.manifest["bytes"])

    @classmethod
    def open(cls, folder: str | Path) -> "TeacherCache":
        """The cache in ``folder``; DataError when it is missing, unfinished or its files do not fit."""
        folder = Path(folder).expanduser()
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            k, block, per_shard = int(manifest["top_k"]), int(manifest["block_size"]), int(manifest["blocks_per_shard"])
            n_blocks, fmt = int(manifest["n_blocks"]), manifest["format"]
        except FileNotFoundError:
            raise DataError(f"{folder}: no teacher cache there (no {MANIFEST}); make one with "
                            "`gpt2-distill cache-teacher` (it also finishes an interrupted one)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{folder}: unreadable teacher cache manifest ({e})") from None
        if fmt != FORMAT:
            raise DataError(f"{folder}: teacher cache format {fmt}, this version reads {FORMAT}; run cache-teacher again")
        for s, (a, b) in enumerate(_shards(n_blocks, per_shard)):
            if not _shard_complete(folder, s, b - a, block, k):
                raise DataError(f"{folder}: {_shard_name(s)} is missing or not the size its manifest records "
                                "(truncated or changed); run cache-teacher again")
        return cls(folder, manifest)

    def check(self, *, teacher_sha256: str, data: str, n_blocks: int, temperature: float, top_k: int) -> None:
        """Refuse a cache made from another teacher, other data, or at another T or k."""
        m = self.manifest
        if m["teacher_sha256"] != teacher_sha256:
            raise ModelError(f"{self.folder} was cached from another teacher (weights sha256 "
                             f"{m['teacher_sha256'][:12]}…, the configured teacher's is {teacher_sha256[:12]}…); "
                             "run cache-teacher again with this teacher")
        if m["data"] != data or self.n_blocks != n_blocks:
            raise DataError(f"{self.folder} was cached over other training blocks ({m['data']}, {self.n_blocks:,} "
                            f"blocks; this run has {data}, {n_blocks:,}); run cache-teacher again with this data")
        if not math.isclose(self.temperature, temperature, rel_tol=0, abs_tol=1e-12):
            raise ConfigError(f"distill.temperature={temperature:g}, but {self.folder} holds the teacher at "
                              f"T={self.temperature:g} (the tail's mass depends on T); train at "
                              f"distill.temperature={self.temperature:g} or cache again at {temperature:g}")
        if self.top_k != top_k:
            raise ConfigError(f"distill.cache_top_k={top_k}, but {self.folder} holds the top {self.top_k}; set "
                              f"distill.cache_top_k={self.top_k} or cache again with {top_k}")

    def rows(self, block_index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, T, k) int64, log-probabilities (B, T, k) fp16, tail (B, T) fp32) of the given blocks,
        read from disk (one seek per block and array; nothing is kept between calls)."""
        idx = np.asarray(block_index.cpu() if isinstance(block_index, torch.Tensor) else block_index,
                         dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_blocks):
            raise IndexError(f"block indices out of range for a cache of {self.n_blocks:,} blocks")
        k, block, per_shard = self.top_k, self.block_size, int(self.manifest["blocks_per_shard"])
        out = {name: np.empty((idx.size, *_row_shape(name, block, k)), dtype=dtype) for name, dtype in ARRAYS.items()}
        shard_of, local = np.divmod(idx, per_shard)
        for name in ARRAYS:
            row_bytes = _row_bytes(name, block, k)
            for s in np.unique(shard_of):
                with open(self.folder / f"{_shard_name(int(s))}.{name}", "rb", buffering=0) as f:
                    for pos in np.flatnonzero(shard_of == s):
                        f.seek(int(local[pos]) * row_bytes)
                        view = memoryview(out[name][pos]).cast("B")
                        if f.readinto(view) != row_bytes:
                            raise DataError(f"{self.folder}: {_shard_name(int(s))}.{name} is shorter than its manifest says")
        return (torch.from_numpy(out["ids"]).to(torch.int64), torch.from_numpy(out["logprobs"]),
                torch.from_numpy(out["tail"]))

    def kd_loss(self, student_logits: torch.Tensor, block_index, mask: torch.Tensor | None = None,
                chunk_rows: int | None = None) -> torch.Tensor:
        """``losses.cached_kd_loss`` of the student's logits for the rows of ``block_index`` (T of the cache)."""
        from python3_distillation.losses import cached_kd_loss

        device = student_logits.device

        def to_device(t: torch.Tensor) -> torch.Tensor:
            # Read from disk into pageable memory: a non_blocking copy from there is synchronous, so
            # on CUDA the rows are pinned first (then the copy is queued and the host moves on).
            return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

        ids, logp, tail = (to_device(t) for t in self.rows(block_index))
        return cached_kd_loss(student_logits, ids, logp, tail, mask, self.temperature, chunk_rows)

    def summary(self) -> str:
        m = self.manifest
        tokens = self.n_blocks * self.block_size
        return (f"teacher cache {self.folder}: {self.n_blocks:,} blocks × {self.block_size} tokens "
                f"({tokens:,} positions), top {self.top_k} at T={self.temperature:g}, "
                f"{self.n_bytes / 2**20:,.1f} MiB ({self.n_bytes / max(1, tokens) * 1e6 / 2**20:,.1f} MiB per million "
                f"tokens), teacher {m['teacher']} ({m['teacher_sha256'][:12]}…), {m['precision']}, made in "
                f"{m['seconds']:,.1f} s")


def open_for_training(folder: str | Path, *, teacher_sha256: str, data: str, n_blocks: int, dc) -> TeacherCache:
    """The cache a distillation run reads (``distill.teacher_cache``), checked against that run."""
    cache = TeacherCache.open(folder)
    cache.check(teacher_sha256=teacher_sha256, data=data, n_blocks=n_blocks, temperature=dc.temperature,
                top_k=dc.cache_top_k)
    return cache


def _load_teacher_and_blocks(cfg):
    """The teacher, its tokenizer's training blocks, as ``run_distill`` loads them."""
    from python3_distillation.data import load_blocks
    from python3_distillation.models import check_vocab, load_model
    from python3_distillation.teacher import check_block_size
    from python3_distillation.tokenizer import load_tokenizer

    teacher_dir = Path(cfg.teacher.path)
    teacher = load_model(teacher_dir).eval()
    teacher_tok = load_tokenizer(teacher_dir) if teacher_dir.is_dir() else load_tokenizer(cfg.tokenizer)
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer != "gpt2" else teacher_tok
    check_vocab(tokenizer, teacher, "teacher")
    check_block_size(cfg, teacher.config.n_positions, "teacher")
    return teacher, load_blocks(cfg.data, tokenizer, seed=cfg.train.seed)


def cache_teacher(cfg, out: str | Path | None = None, batch_size: int | None = None, shard_blocks: int | None = None,
                  on_shard: Callable[[int], None] | None = None) -> TeacherCache:
    """Run the teacher of ``cfg`` over its training blocks and store the top-k cache in ``out``
    (default: ``default_dir(cfg)``), resuming an interrupted run of the same inputs.

    ``shard_blocks`` overrides the blocks per shard (tests use small shards); ``on_shard`` is
    called with each shard's number once it is complete (tests use it to interrupt).
    """
    from python3_distillation.fsio import atomic_write_text, publish_dir, reporting_disk_full
    from python3_distillation.lineage import data_fingerprint, weights_sha256
    from python3_distillation.paths import display_path
    from python3_distillation.device_plan import plan as device_plan

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would write the same shards
        raise ConfigError("cache-teacher runs in one process; start it with python or gpt2-distill, not a "
                          "multi-process launcher (training from the cache may use several)")
    dc = cfg.distill
    dest = Path(out).expanduser() if out else default_dir(cfg)
    teacher, blocks = _load_teacher_and_blocks(cfg)
    k, temperature = dc.cache_top_k, dc.temperature
    vocab = teacher.config.vocab_size
    if k > vocab:
        raise ConfigError(f"distill.cache_top_k={k} is larger than the teacher's vocabulary ({vocab:,})")
    train_blocks = blocks["train"]
    n_blocks, block = len(train_blocks), train_blocks.ids.shape[1]
    teacher_sha = weights_sha256(teacher)
    data = data_fingerprint(blocks)
    key = cache_key(teacher_sha, data, n_blocks, block, k, temperature)

    if (dest / MANIFEST).is_file():
        try:
            existing = TeacherCache.open(dest)
        except DataError as e:
            log.warning("%s; making it again", e)
            existing = None
        if existing is not None and existing.key == key:
            print(f"{dest}: up to date (same teacher, data, T and k)", file=sys.stderr)
            return existing
        print(f"{dest}: holds a cache of other inputs (teacher, data, T or k changed); replacing it", file=sys.stderr)
    elif dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest} exists and is not a teacher cache; choose another distill.teacher_cache or remove it")

    per_shard = shard_blocks or max(1, SHARD_BYTES // (block * bytes_per_position(k)))
    shards = _shards(n_blocks, per_shard)
    work = dest.parent / f".{dest.name}.partial"
    progress = {"key": key, "blocks_per_shard": per_shard}
    try:
        resumable = json.loads((work / PROGRESS).read_text()) == progress
    except (OSError, ValueError):
        resumable = False
    if not resumable:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        atomic_write_text(work / PROGRESS, json.dumps(progress))
    for stale in work.glob("*.tmp"):  # a shard being written when the run was killed
        stale.unlink()
    done = [s for s, (a, b) in enumerate(shards) if _shard_complete(work, s, b - a, block, k)]
    if done:
        print(f"{dest}: resuming, {len(done)} of {len(shards)} shards already cached", file=sys.stderr)

    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    plan = device_plan(device, mixed_precision=cfg.train.mixed_precision)  # forward only: never compiled
    plan.apply()
    for line in plan.lines():
        print(f"cache-teacher: {line}", file=sys.stderr)
    precision = plan.precision
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.mode)
    teacher.to(device)
    batch_size = batch_size or cfg.train.batch_size
    t0 = time.perf_counter()
    done_blocks = sum(shards[s][1] - shards[s][0] for s in done)
    bar = tqdm(total=n_blocks, initial=done_blocks, unit="block", desc=f"cache-teacher {cfg.name}", dynamic_ncols=True)
    need = (n_blocks - done_blocks) * sum(_row_bytes(n, block, k) for n in ARRAYS)
    full = reporting_disk_full("the teacher cache", work, need,
                               f"{len(done)} finished shard(s) are kept; run the command again to resume")
    with bar, full:
        for s, (a, b) in enumerate(shards):
            if s in done:
                continue
            name = _shard_name(s)
            files = {n: open(work / f"{name}.{n}.tmp", "wb") for n in ARRAYS}
            try:
                for start in range(a, b, batch_size):
                    ids = train_blocks.ids[torch.arange(start, min(b, start + batch_size))].to(device)
                    with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32,
                                                         enabled=autocast is not None):
                        logits = teacher(input_ids=ids).logits
                    for row in range(ids.shape[0]):  # one block at a time: one (T, V) fp32 temporary
                        logp, top, tail = teacher_buckets(logits[row], k, temperature)
                        for n, t in (("logprobs", logp), ("ids", top), ("tail", tail)):
                            files[n].write(t.cpu().numpy().astype(ARRAYS[n], copy=False).tobytes())
                    bar.update(ids.shape[0])
                for f in files.values():
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                for f in files.values():
                    f.close()
            for n in ARRAYS:  # each file appears whole under its final name or not at all
                os.replace(work / f"{name}.{n}.tmp", work / f"{name}.{n}")
            if on_shard is not None:
                on_shard(s)

    total = sum((work / f"{_shard_name(s)}.{n}").stat().st_size for s in range(len(shards)) for n in ARRAYS)
    manifest = {
        "format": FORMAT,
        "key": key,
        "teacher": display_path(cfg.teacher.path),
        "teacher_sha256": teacher_sha,
        "data": data,
        "n_blocks": n_blocks,
        "block_size": block,
        "top_k": k,
        "temperature": temperature,
        "vocab_size": vocab,
        "dtypes": {n: np.dtype(d).name for n, d in ARRAYS.items()},
        "blocks_per_shard": per_shard,
        "shards": len(shards),
        "bytes": total,
        "bytes_per_token": bytes_per_position(k),
        "precision": precision.label,
        "seconds": round(time.perf_counter() - t0, 2),  # of the run that finished it
        "resumed": bool(done),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    (work / PROGRESS).unlink()
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    dest.parent.mkdir(parents=True, exist_ok=True)
    publish_dir(work, dest)
    return TeacherCache(dest, manifest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpt2-distill cache-teacher",
                                description="Run the teacher once over the training blocks and store its top-k "
                                "log-probabilities per position (+ the tail's mass), for distill.teacher_cache=DIR. "
                                "Resumes an interrupted run.")
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help="YAML config of the distillation (diff from the defaults); repeatable; default: v2")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write (default: distill.teacher_cache, else <data dir>/teacher_cache/<name>)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="blocks per teacher forward (default: train.batch_size)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. distill.cache_top_k=32")
    args = p.parse_args(argv)
    from python3_distillation.config import load_config

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size must be ≥ 1")
    cfg = load_config(args.config or ["v2"], args.overrides)
    if cfg.stage != "distill":
        raise ConfigError(f"config is for stage {cfg.stage!r}; cache-teacher reads a distillation config "
                          "(its teacher, data, distill.temperature and distill.cache_top_k)")
    cache = cache_teacher(cfg, args.out, args.batch_size)
    print(cache.summary())
    print(f"train from it: gpt2-distill distill {' '.join(f'--config {c}' for c in args.config or ['v2'])} "
          f"distill.teacher_cache={cache.folder}")
    return 0


if __name__ == "__main__":
    from python3_distillation.cli import run_guarded

    raise SystemExit(run_guarded(main, sys.argv[1:]))
