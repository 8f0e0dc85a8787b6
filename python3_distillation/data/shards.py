"""Token shards on disk (one flat id file per split under ``<data dir>/tokens/<key>/``) and the blocks read from them.

    gpt2-distill prepare-data --config teacher          # tokenize ahead of training, print the manifest

Each tokenized piece is appended to the files (raw ids, no header) and committed to the work folder's
progress record (resumable.py). Explained and measured in README.md, "Data at scale".
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tqdm import tqdm

from python3_distillation.config import DataConfig
from python3_distillation.data.blocks import Blocks, MixedBlocks, TokenBlocks
from python3_distillation.data.documents import is_local_spec
from python3_distillation.data.sources import SPLITS, Plan, Source, held_out, plan_sources
from python3_distillation.data.tokenizing import (auto_num_proc, chunk_ids, map_tokenize, quiet_datasets_bars,
                                                  stage_pieces, token_dtype, tokenizer_fingerprint)
from python3_distillation.errors import DataError
from python3_distillation.fsio import reporting_disk_full, sha256_json
from python3_distillation.paths import data_dir as default_data_dir
from python3_distillation.resumable import WorkFolder, check_files, read_manifest

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the tokenize/group logic changes (2: flat token files, one even cut of each split)
TOKENS_DIR = "tokens"
# Text per tokenizing process per piece: ~2-3 s of work for GPT-2's tokenizer on one core here, so the
# worker pool's start (~0.2 s a piece) costs < 10%, while what one piece holds stays small.
PIECE_BYTES_PER_PROC = 8 << 20


@dataclass
class TokenShards:
    """A finished ``<data dir>/tokens/<key>/`` folder: one token file per split and its manifest."""

    folder: Path
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def path(self, split: str) -> Path:
        return self.folder / self.manifest["splits"][split]["file"]

    def blocks(self, split: str, block_size: int) -> Blocks:
        view = TokenBlocks(self.path(split), self.manifest["dtype"], block_size)
        return Blocks(view, fingerprint=f"tokens:{self.key}:block{block_size}")

    def summary(self, block_size: int | None = None) -> str:
        m = self.manifest
        tok = m["tokenizer"]
        processes = f"{m['num_proc']} process{'es' if m['num_proc'] > 1 else ''}"
        lines = [f"token shards: {self.folder}",
                 (f"  {m['dtype']}, tokenizer {tok['name']} ({tok['vocab_size']:,} tokens, "
                  f"fingerprint {tok['fingerprint']}), cache version {m['version']}"),
                 f"  prepared in {m['seconds']:,.1f} s with {processes}"
                 + (" (the last part of a resumed run)" if m.get("resumed") else "")]
        lines += [f"  {split} source: {s}" for split, s in m["sources"].items()]
        if m.get("holdout"):
            lines.append(f"  validation: a seeded {m['holdout']['fraction']:.1%} of the train documents "
                         f"(seed {m['holdout']['seed']})")
        for split, c in m["splits"].items():
            blocks = f", {c['tokens'] // block_size:,} blocks of {block_size}" if block_size else ""
            lines.append(f"  {split:<10} {c['tokens']:>14,} tokens  {c['documents']:>12,} documents  "
                         f"{c['bytes'] / 2**20:>10,.1f} MiB{blocks}")
        return "\n".join(lines)


def _read_manifest(folder: Path) -> dict | None:
    """The manifest of a finished folder whose files have the sizes it records, else None."""
    try:
        manifest = read_manifest(folder)
        problem = check_files(folder, {e["file"]: e for e in [manifest["splits"][s] for s in SPLITS]}, ("bytes",))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if problem:
        log.warning("%s: %s; preparing it again", folder, problem)
    return None if problem else manifest


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the lock of the token folder ``root`` (``<root>.lock`` beside it): processes that prepare
    data at once (several training ranks) take turns instead of writing over each other."""
    lock = FileLock(root.with_name(f"{root.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process preparing token shards in %s", root)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def prepare_tokens(cfg: DataConfig, tokenizer, data_dir: Path | None = None, seed: int = 0,
                   num_proc: int | None = None) -> TokenShards:
    """Token shards for ``cfg``'s train/validation data: found under ``<data dir>/tokens/<key>/`` or
    prepared there (resuming an interrupted preparation of the same key)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    data_dir = Path(data_dir or default_data_dir())
    plan = plan_sources(cfg, data_dir, seed)
    key_src = {"v": CACHE_VERSION, "tok": tokenizer_fingerprint(tokenizer), "data": plan.fingerprint,
               "doc": cfg.document, "field": cfg.text_field}
    key = sha256_json(key_src)[:20]
    root = data_dir / TOKENS_DIR
    work = WorkFolder(root / key)
    manifest = _read_manifest(work.dest)
    if manifest is not None and not work.path.exists():
        return TokenShards(work.dest, manifest)

    root.mkdir(parents=True, exist_ok=True)
    with locked(root):
        manifest = _read_manifest(work.dest)  # another process may have finished it while we waited
        if manifest is None:
            # Holding the lock, nothing else is preparing here: other keys' unfinished work (data that
            # has since changed) and folders of a publish killed half-way are leftovers.
            for stale in [*root.glob(".*.partial"), *root.glob(".*-tmp-*")]:
                if stale != work.path:
                    log.info("removing %s, left by an interrupted preparation", stale)
                    shutil.rmtree(stale, ignore_errors=True)
            manifest = _prepare(plan, cfg, tokenizer, key, key_src, work, num_proc)
        work.discard()
    return TokenShards(work.dest, manifest)


def _cut_back(work: Path, state: dict, key: str, dtype: str) -> bool:
    """Whether ``state`` is the progress of ``key``; its files are cut back to the last commit (a piece
    written after it is dropped). False when it does not add up (then the caller starts afresh)."""
    if state.get("key") != key or state.get("dtype") != dtype:
        return False
    itemsize = np.dtype(dtype).itemsize
    for split, counts in state["splits"].items():
        path = work / f"{split}.bin"
        want = counts["tokens"] * itemsize
        if not path.exists() or path.stat().st_size < want:
            return False
        os.truncate(path, want)
    return True


def _prepare(plan: Plan, cfg: DataConfig, tokenizer, key: str, key_src: dict, work: WorkFolder,
             num_proc: int | None) -> dict:
    dtype = token_dtype(tokenizer)
    num_proc = cfg.num_proc if num_proc is None else num_proc
    if not num_proc:  # 0: chosen from the CPU count and the data size
        sizes = [s.n_bytes for s in plan.sources.values()]
        num_proc = auto_num_proc(None if None in sizes else sum(sizes))
    t0 = time.perf_counter()
    state = work.resume(lambda record: _cut_back(work.path, record, key, dtype))
    resumed = state is not None
    if state is None:
        state = {"key": key, "dtype": dtype, "held": 0, "last_doc_tokens": 0,
                 "streams": {name: {"docs": 0, "bytes": 0, "done": False} for name in plan.sources},
                 "splits": {s: {"tokens": 0, "documents": 0} for s in SPLITS}}
        for split in SPLITS:
            (work.path / f"{split}.bin").touch()
    else:
        done = sum(s["docs"] for s in state["streams"].values())
        log.info("resuming the token shards %s after %s documents", key, f"{done:,}")
    log.info("tokenizing into %s (%s, %d process%s)", work.dest, dtype, num_proc, "es" if num_proc > 1 else "")
    try:
        for name, source in plan.sources.items():
            _tokenize_stream(name, source, plan, state, work, tokenizer, dtype, num_proc)
    except DataError:
        work.discard()  # bad input: nothing worth resuming
        raise
    itemsize = np.dtype(dtype).itemsize
    manifest = {
        "version": CACHE_VERSION, "key": key, "key_source": key_src, "dtype": dtype,
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer": {"name": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
                      "fingerprint": key_src["tok"]},
        "sources": {name: s.describe for name, s in plan.sources.items()}, "source_fingerprint": plan.fingerprint,
        "document": cfg.document, "text_field": cfg.text_field,
        "holdout": {"fraction": plan.holdout[0], "seed": plan.holdout[1]} if plan.holdout else None,
        "splits": {s: {"file": f"{s}.bin", "tokens": c["tokens"], "documents": c["documents"],
                       "bytes": c["tokens"] * itemsize} for s, c in state["splits"].items()},
        "num_proc": num_proc, "seconds": round(time.perf_counter() - t0, 2),  # of the run that finished it
        "resumed": resumed, "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    work.publish(manifest)
    return manifest


def _commit(work: WorkFolder, state: dict) -> None:
    """Record a finished piece (the token files synced first; a resume cuts them back to what it claims)."""
    work.commit(state, sync=[work.path / f"{split}.bin" for split in SPLITS])


def _append(path: Path, ids: np.ndarray) -> None:
    with path.open("ab") as f:
        ids.tofile(f)


def _write_piece(chunks, name: str, plan: Plan, state: dict, work: Path) -> None:
    """Append one tokenized piece to the split files (held-out documents to validation), chunk by chunk."""
    stream = state["streams"][name]
    holdout = plan.holdout is not None and name == "train"
    for chunk in chunks:
        ids, lengths = chunk_ids(chunk)
        held = held_out(stream["docs"], len(lengths), *plan.holdout) if holdout else np.zeros(len(lengths), bool)
        state["held"] += int(held.sum())
        if held.any():
            by_token = np.repeat(held, lengths)
            writes = [("train", ids[~by_token], int((~held).sum())), ("validation", ids[by_token], int(held.sum()))]
        else:
            writes = [(name, ids, len(lengths))]
        for split, part, docs in writes:
            if docs:
                _append(work / f"{split}.bin", part)
                state["splits"][split]["tokens"] += int(part.size)
                state["splits"][split]["documents"] += docs
        stream["docs"] += len(lengths)
        state["last_doc_tokens"] = int(lengths[-1])


def _hold_out_last_document(state: dict, work: WorkFolder) -> None:
    """A hold-out draw that picked nothing (a tiny corpus) moves the last train document to validation,
    so there is always something to validate on. Crash-safe: validation is appended and the counts
    committed before train is cut, and a resume cuts every file back to the committed counts anyway."""
    n, train = state["last_doc_tokens"], state["splits"]["train"]
    itemsize = np.dtype(state["dtype"]).itemsize
    last = np.fromfile(work.path / "train.bin", dtype=state["dtype"], count=n, offset=(train["tokens"] - n) * itemsize)
    _append(work.path / "validation.bin", last)
    train["tokens"] -= n
    train["documents"] -= 1
    state["splits"]["validation"]["tokens"] += n
    state["splits"]["validation"]["documents"] += 1
    state["held"] = 1
    _commit(work, state)
    os.truncate(work.path / "train.bin", train["tokens"] * itemsize)


def _tokenize_stream(name: str, source: Source, plan: Plan, state: dict, work: WorkFolder, tokenizer, dtype: str,
                     num_proc: int) -> None:
    """Tokenize one source into the split files, a piece at a time, committing after each piece."""
    stream = state["streams"][name]
    if stream["done"]:
        return
    docs = source.open()
    skipped = sum(1 for _ in itertools.islice(docs, stream["docs"]))  # documents a previous run already wrote
    if skipped < stream["docs"]:
        raise DataError(f"{source.describe}: fewer documents than an interrupted preparation already read "
                        f"({skipped:,} < {stream['docs']:,}): the source changed; run again to start afresh")
    bar = tqdm(total=source.n_bytes, initial=stream["bytes"], unit="B", unit_scale=True, mininterval=1.0,
               desc=f"tokenize {name}" + (f" ({num_proc} processes)" if num_proc > 1 else ""))
    for stale in work.path.glob("piece-*.arrow"):  # staged by a run that was killed
        stale.unlink()
    # Two bytes a token of uint16 ids, about a token per four bytes of text: half the text's size.
    need = (source.n_bytes - stream["bytes"]) // 2 if source.n_bytes else None
    full = reporting_disk_full(f"token shards of {name}", work.path, need,
                               "every piece committed so far is kept; the command resumes from the last one")
    with bar, quiet_datasets_bars(), full:
        for piece, _, raw in stage_pieces(docs, PIECE_BYTES_PER_PROC * max(1, num_proc), work.path):
            _write_piece(map_tokenize(piece, tokenizer, dtype, num_proc), name, plan, state, work.path)
            stream["bytes"] += raw
            _commit(work, state)
            bar.update(raw)
            bar.set_postfix(tokens=f"{sum(c['tokens'] for c in state['splits'].values()):,}")
    if stream["docs"] == 0:  # local sources say so themselves; this catches any other empty stream
        raise DataError(f"{source.describe}: no text found")
    if plan.holdout is not None and name == "train":
        if stream["docs"] < 2:
            raise DataError("need at least 2 documents to hold some out for validation (or set data.validation)")
        if state["held"] == 0:
            _hold_out_last_document(state, work)
    stream["done"] = True
    _commit(work, state)


def load_blocks(cfg: DataConfig, tokenizer, data_dir: Path | None = None, seed: int = 0,
                num_proc: int | None = None) -> dict[str, Blocks]:
    """``train``/``validation`` blocks of ``cfg.block_size`` tokens, read from the token shards
    (prepared first when missing)."""
    if cfg.mix:
        return _mixed_blocks(cfg, tokenizer, data_dir, seed, num_proc)
    shards = prepare_tokens(cfg, tokenizer, data_dir, seed, num_proc)
    out = {s: shards.blocks(s, cfg.block_size) for s in SPLITS}
    for s, b in out.items():
        if len(b) == 0:
            raise DataError(f"the {s} split has fewer tokens than one block of {cfg.block_size}; "
                            "add text or lower data.block_size")
    log.info("data: %s", ", ".join(f"{s} {len(b):,} blocks ({b.n_tokens:,} tokens)" for s, b in out.items()))
    return out


def _mixed_blocks(cfg: DataConfig, tokenizer, data_dir: Path | None, seed: int, num_proc: int | None) -> dict[str, Blocks]:
    """``data.mix``: each source's own shards, mixed by :class:`MixedBlocks`; validation from the first."""
    first, *rest = [p.strip() for p in cfg.train.split(",") if p.strip()]
    for spec in rest:
        if not is_local_spec(spec):
            raise DataError(f"data.mix: {spec!r} must be a local .txt/.jsonl file or folder (only the first source may be "
                            "the embedded corpus or a hub set)")
    out = load_blocks(cfg.model_copy(update={"train": first, "mix": []}), tokenizer, data_dir, seed, num_proc)
    # A further source is used whole for training: naming it as its own validation avoids a held-out cut.
    train = [out["train"]] + [load_blocks(cfg.model_copy(update={"train": s, "validation": s, "mix": []}), tokenizer,
                                          data_dir, seed, num_proc)["train"] for s in rest]
    mixed = MixedBlocks([b.ids for b in train], cfg.mix)
    out["train"] = Blocks(mixed, fingerprint="mix:" + ";".join(f"{b.fingerprint}*{w:g}" for b, w in zip(train, cfg.mix)))
    log.info("data.mix: %s", ", ".join(f"{s} {c:,} blocks" for s, c in zip([first, *rest], mixed.counts)))
    return out
