"""Cached teacher logits (offline KD): the teacher runs once, distillation then reads its answers.

    gpt2-distill cache-teacher --config v2                                # → <data dir>/teacher_cache/v2
    gpt2-distill distill --config v2 distill.teacher_cache=data/teacher_cache/v2   # no teacher in memory

Explained and measured in README.md, "Cached teacher logits (offline KD)"; design notes:
docs/design/data.md.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from python3_distillation.data import load_blocks
from python3_distillation.device_plan import pick_device, plan as device_plan
from python3_distillation.errors import ConfigError, DataError, ModelError
from python3_distillation.fsio import atomic_file, read_rows, reporting_disk_full, sha256_json
from python3_distillation.lineage import data_fingerprint, weights_sha256
from python3_distillation.losses import cached_kd_loss
from python3_distillation.models import check_vocab, open_model, stage_tokenizer
from python3_distillation.paths import data_dir, display_path
from python3_distillation.resumable import MANIFEST, WorkFolder, check_files, read_manifest
from python3_distillation.teacher import check_block_size

log = logging.getLogger(__name__)

FORMAT = 1
# The three arrays of a shard: name → dtype. fp16 log-probabilities hold ~3 significant digits,
# far finer than the differences distillation learns from; ids stay int32 for any vocabulary.
ARRAYS = {"logprobs": np.float16, "ids": np.int32, "tail": np.float32}
SHARD_BYTES = 64 << 20  # per shard: small enough to lose little to a kill, large enough to be few files


def bytes_per_position(k: int) -> int:
    """Disk bytes per cached position: k fp16 log-probabilities, k int32 ids, one fp32 tail."""
    return k * (2 + 4) + 4


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


def _shard_file(s: int, name: str) -> str:
    return f"shard-{s:05d}.{name}"


def _row_shape(name: str, block_size: int, k: int) -> tuple[int, ...]:
    return (block_size,) if name == "tail" else (block_size, k)


def _shards(n_blocks: int, per_shard: int) -> list[tuple[int, int]]:
    return [(a, min(a + per_shard, n_blocks)) for a in range(0, n_blocks, per_shard)]


def _shard_problem(folder: Path, s: int, n_rows: int, block_size: int, k: int) -> str | None:
    """Why shard ``s``'s files in ``folder`` are not the sizes the manifest implies, or None."""
    sizes = {_shard_file(s, n): {"bytes": n_rows * int(np.prod(_row_shape(n, block_size, k))) * np.dtype(d).itemsize}
             for n, d in ARRAYS.items()}
    return check_files(folder, sizes, ("bytes",))


@dataclass
class TeacherCache:
    """A finished cache folder: rows looked up by training block index."""

    folder: Path
    manifest: dict

    def __post_init__(self):
        m = self.manifest
        self.key, self.top_k, self.temperature = m["key"], int(m["top_k"]), float(m["temperature"])
        self.n_blocks, self.block_size, self.n_bytes = int(m["n_blocks"]), int(m["block_size"]), int(m["bytes"])

    @classmethod
    def open(cls, folder: str | Path) -> "TeacherCache":
        """The cache in ``folder``; DataError when it is missing, unfinished or its files do not fit."""
        folder = Path(folder).expanduser()
        try:
            manifest = read_manifest(folder)
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
            if problem := _shard_problem(folder, s, b - a, block, k):
                raise DataError(f"{folder}: {problem}; run cache-teacher again")
        return cls(folder, manifest)

    def check(self, *, teacher_sha256: str, data: str, n_blocks: int, temperature: float, top_k: int) -> TeacherCache:
        """This cache, unless it was made from another teacher, other data, or at another T or k."""
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
        return self

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
        for name, dtype in ARRAYS.items():
            for s in np.unique(shard_of):
                sel = np.flatnonzero(shard_of == s)
                rows = np.empty((sel.size, *_row_shape(name, block, k)), dtype=dtype)
                out[name][sel] = read_rows(self.folder / _shard_file(int(s), name), local[sel], rows)
        return (torch.from_numpy(out["ids"]).to(torch.int64), torch.from_numpy(out["logprobs"]),
                torch.from_numpy(out["tail"]))

    def kd_loss(self, student_logits: torch.Tensor, block_index, mask: torch.Tensor | None = None,
                chunk_rows: int | None = None) -> torch.Tensor:
        """``losses.cached_kd_loss`` of the student's logits for the rows of ``block_index`` (T of the cache)."""
        device = student_logits.device
        # Read from disk into pageable memory: a non_blocking copy from there is synchronous, so
        # on CUDA the rows are pinned first (then the copy is queued and the host moves on).
        ids, logp, tail = (t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
                           for t in self.rows(block_index))
        return cached_kd_loss(student_logits, ids, logp, tail, mask, self.temperature, chunk_rows)

    def summary(self) -> str:
        m = self.manifest
        tokens = self.n_blocks * self.block_size
        return (f"teacher cache {self.folder}: {self.n_blocks:,} blocks × {self.block_size} tokens "
                f"({tokens:,} positions), top {self.top_k} at T={self.temperature:g}, "
                f"{self.n_bytes / 2**20:,.1f} MiB ({self.n_bytes / max(1, tokens) * 1e6 / 2**20:,.1f} MiB per million "
                f"tokens), teacher {m['teacher']} ({m['teacher_sha256'][:12]}…), {m['precision']}, made in "
                f"{m['seconds']:,.1f} s")


def cache_teacher(cfg, out: str | Path | None = None, batch_size: int | None = None, shard_blocks: int | None = None,
                  on_shard: Callable[[int], None] | None = None) -> TeacherCache:
    """Store the top-k cache of ``cfg``'s teacher over its training blocks in ``out`` (default:
    ``distill.teacher_cache``, else ``<data dir>/teacher_cache/<name>``), resuming an interrupted run.
    Tests set ``shard_blocks`` and ``on_shard(s)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would write the same shards
        raise ConfigError("cache-teacher runs in one process; start it with python or gpt2-distill, not a "
                          "multi-process launcher (training from the cache may use several)")
    if out or cfg.distill.teacher_cache.strip():
        dest = Path(out or cfg.distill.teacher_cache).expanduser()
    else:
        dest = data_dir() / "teacher_cache" / cfg.name
    teacher = open_model(cfg.teacher.path).model  # the teacher and blocks as run_distill loads them
    tokenizer = stage_tokenizer(cfg, "distill")
    check_vocab(tokenizer, teacher, "teacher")
    check_block_size(cfg, teacher.config.n_positions, "teacher")
    blocks = load_blocks(cfg.data, tokenizer, seed=cfg.train.seed)
    k, temperature = cfg.distill.cache_top_k, cfg.distill.temperature
    vocab = teacher.config.vocab_size
    if k > vocab:
        raise ConfigError(f"distill.cache_top_k={k} is larger than the teacher's vocabulary ({vocab:,})")
    train_blocks = blocks["train"]
    n_blocks, block = len(train_blocks), train_blocks.ids.shape[1]
    teacher_sha = weights_sha256(teacher)
    data = data_fingerprint(blocks)
    # The cache's identity: what decides every stored number (not the precision it ran in).
    key = sha256_json({"format": FORMAT, "teacher": teacher_sha, "data": data, "n_blocks": n_blocks,
                       "block_size": block, "top_k": k, "temperature": float(temperature)})[:20]

    if (dest / MANIFEST).is_file():
        try:
            if (existing := TeacherCache.open(dest)).key == key:
                print(f"{dest}: up to date (same teacher, data, T and k)", file=sys.stderr)
                return existing
        except DataError as e:
            log.warning("%s; making it again", e)
        print(f"{dest}: holds a cache of other inputs (teacher, data, T or k changed); replacing it", file=sys.stderr)
    elif dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest} exists and is not a teacher cache; choose another distill.teacher_cache or remove it")

    per_shard = shard_blocks or max(1, SHARD_BYTES // (block * bytes_per_position(k)))
    shards = _shards(n_blocks, per_shard)
    folder = WorkFolder(dest)
    work = folder.path
    progress = {"key": key, "blocks_per_shard": per_shard}
    if folder.resume(lambda record: record == progress) is None:
        folder.commit(progress)
    for stale in [*work.glob(".shard-*"), *work.glob("*.tmp")]:  # a shard being written when the run was killed
        stale.unlink()
    done = [s for s, (a, b) in enumerate(shards) if not _shard_problem(work, s, b - a, block, k)]
    if done:
        print(f"{dest}: resuming, {len(done)} of {len(shards)} shards already cached", file=sys.stderr)

    device = pick_device(cpu=cfg.train.cpu)
    plan = device_plan(device, mixed_precision=cfg.train.mixed_precision)  # forward only: never compiled
    plan.apply()
    for line in plan.lines():
        print(f"cache-teacher: {line}", file=sys.stderr)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision.mode)
    teacher.to(device)
    batch_size = batch_size or cfg.train.batch_size
    t0 = time.perf_counter()
    done_blocks = sum(shards[s][1] - shards[s][0] for s in done)
    bar = tqdm(total=n_blocks, initial=done_blocks, unit="block", desc=f"cache-teacher {cfg.name}", dynamic_ncols=True)
    need = (n_blocks - done_blocks) * block * bytes_per_position(k)
    full = reporting_disk_full("the teacher cache", work, need,
                               f"{len(done)} finished shard(s) are kept; run the command again to resume")
    with bar, full:
        for s, (a, b) in enumerate(shards):
            if s in done:
                continue
            with contextlib.ExitStack() as stack:  # each file appears whole under its final name or not at all
                paths = {n: stack.enter_context(atomic_file(work / _shard_file(s, n))) for n in ARRAYS}
                files = {n: stack.enter_context(open(path, "wb")) for n, path in paths.items()}
                for start in range(a, b, batch_size):
                    ids = train_blocks.ids[torch.arange(start, min(b, start + batch_size))].to(device)
                    with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32,
                                                         enabled=autocast is not None):
                        logits = teacher(input_ids=ids).logits
                    for row in range(ids.shape[0]):  # one block at a time: one (T, V) fp32 temporary
                        for n, t in zip(ARRAYS, teacher_buckets(logits[row], k, temperature)):  # logprobs, ids, tail
                            files[n].write(t.cpu().numpy().astype(ARRAYS[n], copy=False).tobytes())
                    bar.update(ids.shape[0])
            if on_shard is not None:
                on_shard(s)

    total = sum((work / _shard_file(s, n)).stat().st_size for s in range(len(shards)) for n in ARRAYS)
    manifest = {
        "format": FORMAT, "key": key, "teacher": display_path(cfg.teacher.path), "teacher_sha256": teacher_sha,
        "data": data, "n_blocks": n_blocks, "block_size": block, "top_k": k, "temperature": temperature,
        "vocab_size": vocab, "dtypes": {n: np.dtype(d).name for n, d in ARRAYS.items()},
        "blocks_per_shard": per_shard, "shards": len(shards), "bytes": total, "bytes_per_token": bytes_per_position(k),
        "precision": plan.precision.label,
        "seconds": round(time.perf_counter() - t0, 2),  # of the run that finished it
        "resumed": bool(done), "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    folder.publish(manifest)
    return TeacherCache(dest, manifest)

