"""Documents → token ids: the tokenizer's fingerprint, the id dtype, and ``datasets.map`` over pieces staged on disk.

    python -c "from python3_distillation.data import tokenize_piece; from python3_distillation.tokenizer import \\
load_tokenizer; print(tokenize_piece(['It is a truth.'], load_tokenizer('gpt2'), 'uint16'))"
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Below this much text per process another process costs more than it saves (the embedded corpus,
# 4 MB, is tokenized in-process).
BYTES_PER_PROC = 32 << 20
MAP_BATCH = 1000  # documents per tokenizer call inside datasets.map


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the ids: vocabulary and merges, normalizer, pre-tokenizer,
    post-processor, added tokens, and the EOS id. Not padding or truncation: they are call settings
    that transformers changes per call, and the tokenization here uses neither."""
    h = hashlib.sha256()
    if (backend := getattr(tokenizer, "backend_tokenizer", None)) is not None:
        # Each component's own serialization (bytes), so the ~1.5 MB vocabulary + merges of GPT-2 are
        # hashed without being parsed into Python objects (~20 MB).
        for part in (backend.model, backend.normalizer, backend.pre_tokenizer, backend.post_processor):
            h.update((part.__getstate__() if part is not None else b"-") + b"|")
        h.update(json.dumps(sorted((i, repr(t)) for i, t in backend.get_added_tokens_decoder().items())).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def token_dtype(tokenizer) -> str:
    """``uint16`` when every id fits (GPT-2: 50,257), else ``uint32`` (twice the disk, same code)."""
    return "uint16" if len(tokenizer) <= 2**16 else "uint32"


# Tokenizers registered here before datasets.map forks its workers: a forked worker inherits them, so
# the map function travels as a key instead of a ~3 MB pickle per worker per piece (measured 0.6 s of
# a 0.8 s pool start with GPT-2's tokenizer).
_FORK_SHARED: dict[int, object] = {}


def _shared_tokenize(key: int, eos: int) -> _Tokenize:
    return _Tokenize(_FORK_SHARED[key], eos)


class _Tokenize:
    """The ``datasets.map`` function: token ids of each document followed by EOS (picklable for workers)."""

    def __init__(self, tokenizer, eos: int):
        self.tokenizer, self.eos = tokenizer, eos

    def __reduce__(self):
        import multiprocess

        key = id(self.tokenizer)
        if _FORK_SHARED.get(key) is self.tokenizer and multiprocess.get_start_method() == "fork":
            return _shared_tokenize, (key, self.eos)
        return _Tokenize, (self.tokenizer, self.eos)

    def __call__(self, batch: dict) -> dict:
        # verbose=False: documents longer than the model's context are fine here (blocks cut them).
        return {"ids": [ids + [self.eos] for ids in self.tokenizer(batch["text"], verbose=False)["input_ids"]]}


@contextlib.contextmanager
def quiet_datasets_bars():
    """One tqdm bar per split instead of datasets' bar per piece."""
    from datasets import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def map_tokenize(texts, tokenizer, dtype: str, num_proc: int):
    """``datasets.map`` over one piece → Arrow list arrays of ids. ``texts`` is a list of strings, or
    the path of an Arrow file holding a ``text`` column (then each worker maps its share of the file
    and is sent the path, not the text)."""
    import pyarrow as pa
    from datasets import Dataset, Features, Sequence, Value
    from datasets.table import InMemoryTable, MemoryMappedTable

    table = (MemoryMappedTable.from_file(str(texts)) if isinstance(texts, Path)
             else InMemoryTable(pa.table({"text": pa.array(texts, type=pa.string())})))
    # Given a fingerprint, datasets does not hash the whole piece to make one (a transient copy of
    # ~2× the piece, measured); pieces are never cached, so any name will do.
    ds = Dataset(table, fingerprint="piece")
    _FORK_SHARED[id(tokenizer)] = tokenizer
    try:
        # The features name the id dtype: arrow refuses ids that do not fit.
        out = ds.map(_Tokenize(tokenizer, tokenizer.eos_token_id), batched=True, batch_size=MAP_BATCH,
                     remove_columns=["text"], features=Features({"ids": Sequence(Value(dtype))}),
                     num_proc=num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None,
                     new_fingerprint="tokenize", load_from_cache_file=False, keep_in_memory=True)
    finally:
        _FORK_SHARED.pop(id(tokenizer), None)
    return [c for c in out.data.column("ids").chunks if len(c)]


def chunk_ids(chunk) -> tuple[np.ndarray, np.ndarray]:
    """(ids, per-document lengths) of one Arrow chunk of id lists, without copying the ids."""
    return chunk.flatten().to_numpy(zero_copy_only=False), chunk.value_lengths().to_numpy(zero_copy_only=False)


def tokenize_piece(texts: list[str], tokenizer, dtype: str, num_proc: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lengths)``: the EOS-terminated token ids of ``texts`` concatenated, and each one's length."""
    parts = [chunk_ids(c) for c in map_tokenize(texts, tokenizer, dtype, num_proc)]
    if not parts:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    return (np.concatenate([i for i, _ in parts]).astype(dtype, copy=False),
            np.concatenate([n for _, n in parts]).astype(np.int64))


def stage_pieces(docs: Iterator[tuple[str, int]], piece_bytes: int, folder: Path) -> Iterator[tuple[Path, int, int]]:
    """Yield ``(file, n_docs, raw_bytes)`` for Arrow files of about ``piece_bytes`` characters of the
    documents, each deleted once the caller has tokenized it. Staged on disk, a piece is never held
    whole here, and workers are sent its path: pickling an in-memory piece sends every worker all of
    it (Arrow pickles a slice with its whole buffer), ~6× the piece in this process, measured.
    """
    import pyarrow as pa

    schema = pa.schema([("text", pa.string())])
    docs = iter(docs)
    for index in itertools.count():
        path = folder / f"piece-{index:06d}.arrow"
        n = raw_total = size = 0
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            batch: list[str] = []
            for doc, raw in docs:
                batch.append(doc)
                size, raw_total, n = size + len(doc), raw_total + raw, n + 1
                if len(batch) == MAP_BATCH or size >= piece_bytes:
                    writer.write_batch(pa.record_batch([pa.array(batch, type=pa.string())], schema=schema))
                    batch = []
                if size >= piece_bytes:
                    break
            if batch:
                writer.write_batch(pa.record_batch([pa.array(batch, type=pa.string())], schema=schema))
        if not n:
            path.unlink()
            return
        yield path, n, raw_total
        path.unlink(missing_ok=True)


def auto_num_proc(n_bytes: int | None) -> int:
    """Tokenizing processes: every usable CPU for a big (or unknown-size, streamed) source, fewer for
    a small one, one below ``BYTES_PER_PROC`` of text."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus if n_bytes is None else min(cpus, n_bytes // BYTES_PER_PROC))
