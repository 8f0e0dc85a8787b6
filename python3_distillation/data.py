"""Text → token shards on disk → fixed blocks read back a batch at a time.

    gpt2-distill prepare-data --config teacher          # tokenize ahead of training, print the manifest

Sources (``DataConfig.train`` / ``.validation``): ``austen`` (the embedded corpus), local ``.txt`` /
``.jsonl`` files or folders (comma-separated), or a ``datasets`` hub spec ``name:config``
(``wikitext:wikitext-103-raw-v1``, streamed, never loaded whole). Every document is followed by the
EOS token and the stream of each split is written to one flat token file, ``uint16`` when the
vocabulary fits (GPT-2's does) and ``uint32`` otherwise, under ``<data dir>/tokens/<key>/`` with a
``manifest.json``. The key hashes the tokenizer, the sources' contents and the document settings, so
a change to any of them prepares new shards and nothing stale is reused.

Block ``i`` of a split is ``tokens[i·B:(i+1)·B]``: the whole stream cut evenly, the tail shorter than
a block unused. The block size is not part of the key: one set of shards serves every block size.

Memory stays bounded by design, not by corpus size: documents are read as a stream, staged in pieces
of 8 MiB of text per process, and tokenized by ``datasets.map(num_proc=...)`` over each piece; each
piece is appended to the files (``np.memmap``-compatible: raw ids, no header) and committed to a
progress record, and training reads just the rows of each batch from the file (:class:`TokenBlocks`).
A killed preparation resumes from its last committed piece; the finished folder is published
atomically (``fsio.atomic_dir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from python3_distillation.config import DataConfig
from python3_distillation.errors import DataError
from python3_distillation.fsio import atomic_dir, atomic_write_text, reporting_disk_full, sha256_file
from python3_distillation.paths import data_dir as default_data_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the tokenize/group logic changes (2: flat token files, one even cut of each split)
TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".json"}
SPLITS = ("train", "validation")
TOKENS_DIR = "tokens"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
# Text per tokenizing process per piece: ~2-3 s of work for GPT-2's tokenizer on one core here, so the
# worker pool's start (~0.2 s a piece) costs < 10%, while what one piece holds stays small.
PIECE_BYTES_PER_PROC = 8 << 20
# Below this much text per process another process costs more than it saves (the embedded corpus,
# 4 MB, is tokenized in-process).
BYTES_PER_PROC = 32 << 20
MAP_BATCH = 1000  # documents per tokenizer call inside datasets.map


# --------------------------------------------------------------------------- blocks: the view training reads


class TokenBlocks:
    """A flat token file seen as a read-only ``(n_blocks, block_size)`` int64 tensor whose rows stay on disk.

    Indexing works like a tensor's (``ids[idx]`` with a LongTensor, ``ids[i, :n]``, ``ids[:n]``) and
    returns int64 tensors holding just the rows asked for; the tail shorter than a block is not a row.
    Rows are read for each access (``readinto`` at the row's offset; one read for consecutive rows) and
    nothing is kept. Not a memory map: mapped file pages count in the process's RSS while mapped, and
    with the kernel's large page-cache folios one fault maps far more than the row asked for (measured
    here: a 64-row gather from a per-batch ``np.memmap`` raised RSS by ~60 MB). The page cache serves
    repeated reads either way.
    """

    def __init__(self, path: str | Path, dtype: str, block_size: int):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.block_size = int(block_size)
        self.n_blocks = self.path.stat().st_size // (self.dtype.itemsize * self.block_size)

    def __len__(self) -> int:
        return self.n_blocks

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.block_size)

    def numel(self) -> int:
        return len(self) * self.block_size

    def __repr__(self) -> str:
        return f"TokenBlocks({self.path}, {len(self):,} blocks of {self.block_size}, {self.dtype})"

    def _row_index(self, rows) -> int | np.ndarray:
        """A row key as an int or an int64 array of rows (negative counted from the end, bounds checked)."""
        n = len(self)
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        if isinstance(rows, (int, np.integer)):
            i = int(rows) + (n if rows < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"block {int(rows)} is out of range for {n:,} blocks")
            return i
        if isinstance(rows, slice):
            return np.arange(*rows.indices(n), dtype=np.int64)
        idx = np.asarray(rows)
        if idx.dtype == np.bool_:
            if idx.shape != (n,):
                raise IndexError(f"a boolean row mask must have {n:,} entries, not {idx.shape}")
            return np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"block indices must be integers, not {idx.dtype}")
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"block indices out of range for {n:,} blocks")
        return idx

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), block_size)`` tokens of the given rows (a 1-D int64 array)."""
        out = np.empty((rows.size, self.block_size), dtype=self.dtype)
        row_bytes = self.block_size * self.dtype.itemsize
        consecutive = rows.size > 0 and bool(np.all(np.diff(rows) == 1))
        with open(self.path, "rb", buffering=0) as f:
            for buf, row in ([(out, int(rows[0]))] if consecutive else zip(out, rows.tolist())):
                f.seek(int(row) * row_bytes)
                view = memoryview(buf).cast("B")
                if f.readinto(view) != view.nbytes:
                    raise DataError(f"{self.path}: shorter than its {len(self):,} blocks (changed while in use?)")
        return out

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 2:
            raise IndexError(f"too many indices for blocks of 2 dimensions: {len(key)}")
        rows, cols = key[0], key[1] if len(key) == 2 else slice(None)
        idx = self._row_index(rows)
        flat = np.atleast_1d(idx).reshape(-1)
        # Index the rows read with positions shaped like the row key: numpy's (and torch's) semantics
        # for every mix of int, slice and array keys.
        positions = 0 if isinstance(idx, int) else np.arange(flat.size).reshape(idx.shape)
        cols = cols.cpu().numpy() if isinstance(cols, torch.Tensor) else cols
        return torch.from_numpy(np.array(self._read(flat)[positions, cols], dtype=np.int64))


@dataclass
class Blocks:
    """One split as ``(n_blocks, block_size)`` token ids: a :class:`TokenBlocks` view over the shard
    (or any int tensor); ``fingerprint`` names the data for run lineage (shard key + block size)."""

    ids: TokenBlocks | torch.Tensor
    fingerprint: str | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())


# --------------------------------------------------------------------------- reading documents (streamed)


def _file_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(raw bytes, line)`` for each line of a UTF-8 file; ``\\r\\n`` and a lone ``\\r`` end lines
    too, as when the whole text is normalised first. Bad bytes are a DataError naming ``path:line``."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (invalid byte at column {e.start + 1})") from None
            line = line.removesuffix("\n")
            line = line.removesuffix("\r")
            if "\r" in line:
                parts = line.split("\r")
                yield len(raw), parts[0]
                for part in parts[1:]:
                    yield 0, part
            else:
                yield len(raw), line


def _has_paragraphs(lines: Iterable[str]) -> bool:
    """True when an empty line separates text (``"\\n\\n" in text.strip()``), read line by line."""
    seen_text = gap = False
    for line in lines:
        if line == "":
            gap = seen_text
        elif line.strip():
            if gap:
                return True
            seen_text = True
    return False


def _documents(lines: Iterable[tuple[int, str]], mode: str) -> Iterator[tuple[str, int]]:
    """``(document, raw bytes it took)`` from ``(raw bytes, line)`` pairs in ``line``/``paragraph``/``file`` mode."""
    if mode == "line":
        pending = 0
        for size, line in lines:
            pending += size
            if line.strip():
                yield line.strip(), pending
                pending = 0
    elif mode == "paragraph":
        group: list[str] = []
        pending = 0
        for size, line in lines:
            pending += size
            if line == "":
                doc = "\n".join(group).strip()
                if doc:
                    yield doc, pending
                    pending = 0
                group = []
            else:
                group.append(line)
        doc = "\n".join(group).strip()
        if doc:
            yield doc, pending
    else:
        texts, total = [], 0
        for size, line in lines:
            texts.append(line)
            total += size
        doc = "\n".join(texts).strip()
        if doc:
            yield doc, total


def split_documents(text: str, mode: str) -> list[str]:
    """Split one .txt file's text into documents (see ``DataConfig.document``)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if mode == "auto":
        mode = "paragraph" if _has_paragraphs(lines) else "line"
    return [doc for doc, _ in _documents(((0, line) for line in lines), mode)]


def _jsonl_documents(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    n = 0
    for size, line in _file_lines(path):
        n += 1 if size else 0  # a lone \r is not a JSONL line break; keep numbering by \n
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise DataError(f"{path}:{n}: expected an object with a string field {text_field!r}")
        if row[text_field].strip():
            yield row[text_field].strip(), size


def _expand(spec: str) -> list[Path]:
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES)
            if not found:
                raise DataError(f"{path}: folder holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES | JSONL_SUFFIXES:
                raise DataError(f"{path}: unsupported file type (use .txt or .jsonl)")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def is_local_spec(spec: str) -> bool:
    """Local when a part exists, names a .txt/.jsonl file, or is written as a path; else a hub id."""
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if (Path(part).expanduser().exists() or part.startswith(("/", "./", "../", "~"))
                or Path(part).suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES):
            return True
    return False


def _local_documents(spec: str, files: list[Path], cfg: DataConfig) -> Iterator[tuple[str, int]]:
    found = False
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            docs = _jsonl_documents(path, cfg.text_field)
        else:
            mode = cfg.document
            if mode == "auto":  # one extra read of the file, stopping at the first paragraph break
                mode = "paragraph" if _has_paragraphs(line for _, line in _file_lines(path)) else "line"
            docs = _documents(_file_lines(path), mode)
        for doc in docs:
            found = True
            yield doc
    if not found:
        raise DataError(f"{spec}: no text found (empty files?)")


def iter_local(spec: str, cfg: DataConfig) -> Iterator[str]:
    """The documents of local files or folders, in order, read as a stream."""
    return (doc for doc, _ in _local_documents(spec, _expand(spec), cfg))


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A stream of documents: how to open it, what it is, and a fingerprint that changes with it."""

    describe: str
    fingerprint: str
    open: Callable[[], Iterator[tuple[str, int]]]  # a fresh pass: (document, raw bytes it took)
    n_bytes: int | None = None  # the size of the text when known (local files)


def local_source(spec: str, cfg: DataConfig) -> Source:
    files = _expand(spec)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + bytes.fromhex(sha256_file(path)))
    return Source(describe=", ".join(str(p) for p in files), fingerprint=digest.hexdigest(),
                  open=lambda: _local_documents(spec, files, cfg), n_bytes=sum(p.stat().st_size for p in files))


def _hub_error(spec: str, e: Exception) -> DataError:
    return DataError(f"hub dataset {spec!r} could not be loaded ({type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0][:200]}); offline, use local .txt/.jsonl files instead")


def stream_source(spec: str, split: str, text_field: str, name: str, config: str | None = None, **load_kwargs) -> Source:
    """One split of a ``datasets`` set read with ``streaming=True``: rows arrive as they are
    downloaded, so a set larger than memory (or than the hub cache) is never held whole."""

    def open_docs() -> Iterator[tuple[str, int]]:
        from datasets import load_dataset

        try:
            rows = load_dataset(name, config or None, split=split, streaming=True, **load_kwargs)
        except Exception as e:  # offline, no such set, no network: each is one line for the user
            raise _hub_error(spec, e) from None
        found = False
        for row in rows:
            if text_field not in row:
                raise DataError(f"dataset {spec!r} has no column {text_field!r} (has {sorted(row)})")
            text = row[text_field]
            if isinstance(text, str) and text.strip():
                found = True
                yield text.strip(), len(text.encode("utf-8"))
        if not found:
            raise DataError(f"dataset {spec!r} has no non-empty {split} split")

    return Source(describe=f"{spec} [{split}] (streamed)", fingerprint=f"stream:{spec}:{split}", open=open_docs)


def _hub_sources(spec: str, cfg: DataConfig) -> dict[str, Source]:
    """The hub set's ``train`` and, when it has one, ``validation`` split (needs the network)."""
    from datasets import get_dataset_split_names

    name, _, config = spec.partition(":")
    try:
        names = get_dataset_split_names(name, config or None)
    except Exception as e:  # offline, no such set, no network: each is one line for the user
        raise _hub_error(spec, e) from None
    if "train" not in names:
        raise DataError(f"hub dataset {spec!r} has no train split (has {names})")
    return {s: stream_source(spec, s, cfg.text_field, name, config) for s in SPLITS if s in names}


@dataclass
class Plan:
    """What to tokenize: a source per split, or a train source with a seeded hold-out."""

    sources: dict[str, Source]
    holdout: tuple[float, int] | None  # (fraction, seed) when validation comes out of train
    fingerprint: str


def plan_sources(cfg: DataConfig, data_dir: Path | None = None, seed: int = 0) -> Plan:
    """Resolve ``cfg.train`` / ``cfg.validation`` into sources (reading nothing but file hashes)."""
    data_dir = Path(data_dir or default_data_dir())
    if cfg.train == "austen":
        from python3_distillation.corpus import build_austen_corpus

        paths = build_austen_corpus(data_dir)  # one paragraph per line: "auto" reads it as lines
        sources = {s: local_source(str(paths[s]), cfg) for s in SPLITS}
        fingerprint = f"austen:{sources['train'].fingerprint}:{sources['validation'].fingerprint}"
    elif is_local_spec(cfg.train):
        sources = {"train": local_source(cfg.train, cfg)}
        fingerprint = sources["train"].fingerprint
    else:
        sources = _hub_sources(cfg.train, cfg)
        fingerprint = f"hub:{cfg.train}"

    if cfg.validation:
        if is_local_spec(cfg.validation):
            sources["validation"] = local_source(cfg.validation, cfg)
        else:
            hub = _hub_sources(cfg.validation, cfg)
            if "validation" not in hub:
                raise DataError(f"hub dataset {cfg.validation!r} has no validation split")
            sources["validation"] = hub["validation"]
        fingerprint += f"|val:{sources['validation'].fingerprint}"
    holdout = None
    if "validation" not in sources:
        holdout = (cfg.validation_fraction, seed)
        fingerprint += f"|holdout:{cfg.validation_fraction}:{seed}"
    return Plan(sources, holdout, fingerprint)


def held_out(start: int, n: int, fraction: float, seed: int) -> np.ndarray:
    """Whether documents ``start .. start+n-1`` of a stream go to validation.

    A seeded hash of the document's index (splitmix64), so the choice needs no document count (a
    streamed hub set has none up front) and does not depend on how the stream is cut into pieces.
    """
    x = np.arange(start, start + n, dtype=np.uint64)
    x = x + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


# --------------------------------------------------------------------------- tokenizing into shards


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the ids: vocabulary and merges, normalizer, pre-tokenizer,
    post-processor, added tokens, and the EOS id. Not padding or truncation: they are call settings
    that transformers changes per call, and the tokenization here uses neither."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
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
def _quiet_datasets_bars():
    """One tqdm bar per split instead of datasets' bar per piece."""
    from datasets import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _map_tokenize(texts, tokenizer, dtype: str, num_proc: int):
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
        out = ds.map(_Tokenize(tokenizer, tokenizer.eos_token_id), batched=True, batch_size=MAP_BATCH,
                     remove_columns=["text"], features=Features({"ids": Sequence(Value(dtype))}),  # arrow refuses ids that do not fit
                     num_proc=num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None,
                     new_fingerprint="tokenize", load_from_cache_file=False, keep_in_memory=True)
    finally:
        _FORK_SHARED.pop(id(tokenizer), None)
    return [c for c in out.data.column("ids").chunks if len(c)]


def _chunk_ids(chunk) -> tuple[np.ndarray, np.ndarray]:
    """(ids, per-document lengths) of one Arrow chunk of id lists, without copying the ids."""
    return chunk.flatten().to_numpy(zero_copy_only=False), chunk.value_lengths().to_numpy(zero_copy_only=False)


def tokenize_piece(texts: list[str], tokenizer, dtype: str, num_proc: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lengths)``: the EOS-terminated token ids of ``texts`` concatenated, and each one's length."""
    parts = [_chunk_ids(c) for c in _map_tokenize(texts, tokenizer, dtype, num_proc)]
    if not parts:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    return (np.concatenate([i for i, _ in parts]).astype(dtype, copy=False),
            np.concatenate([n for _, n in parts]).astype(np.int64))


def _stage_pieces(docs: Iterator[tuple[str, int]], piece_bytes: int, folder: Path) -> Iterator[tuple[Path, int, int]]:
    """Write the documents to Arrow files of about ``piece_bytes`` characters, one at a time, and
    yield ``(file, n_docs, raw_bytes)`` for each; a file is deleted once the caller has it tokenized.

    Staged on disk, a piece is never held whole in this process (1,000 documents at a time are), and
    the tokenizing workers are sent its path: pickling an in-memory piece sends every worker all of
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
    if n_bytes is None:
        return max(1, cpus)
    return max(1, min(cpus, n_bytes // BYTES_PER_PROC))


def _commit(work: Path, state: dict) -> None:
    """Record a finished piece. The token files are synced first, so the record never claims more
    than is on disk (a resume cuts them back to what it claims)."""
    for split in SPLITS:
        with (work / f"{split}.bin").open("rb+") as f:
            os.fsync(f.fileno())
    atomic_write_text(work / PROGRESS, json.dumps(state, indent=1))


def _append(path: Path, ids: np.ndarray) -> None:
    with path.open("ab") as f:
        ids.tofile(f)


def _resume_state(work: Path, key: str, dtype: str) -> dict | None:
    """The progress of an interrupted preparation of ``key``, its files cut back to the last commit;
    None when there is none or it does not add up (then the caller starts afresh)."""
    try:
        state = json.loads((work / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if state.get("key") != key or state.get("dtype") != dtype:
        return None
    itemsize = np.dtype(dtype).itemsize
    for split, counts in state["splits"].items():
        path = work / f"{split}.bin"
        want = counts["tokens"] * itemsize
        if not path.exists() or path.stat().st_size < want:
            return None
        os.truncate(path, want)  # drop a piece written after the last commit
    return state


def _write_piece(chunks, name: str, plan: Plan, state: dict, work: Path) -> None:
    """Append one tokenized piece to the split files (held-out documents to validation), chunk by chunk."""
    stream = state["streams"][name]
    holdout = plan.holdout is not None and name == "train"
    for chunk in chunks:
        ids, lengths = _chunk_ids(chunk)
        if holdout:
            held = held_out(stream["docs"], len(lengths), *plan.holdout)
            state["held"] += int(held.sum())
        else:
            held = np.zeros(len(lengths), dtype=bool)
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


def _hold_out_last_document(state: dict, work: Path) -> None:
    """A hold-out draw that picked nothing (a tiny corpus) moves the last train document to validation,
    so there is always something to validate on. Crash-safe: validation is appended and the counts
    committed before train is cut, and a resume cuts every file back to the committed counts anyway."""
    n, train = state["last_doc_tokens"], state["splits"]["train"]
    itemsize = np.dtype(state["dtype"]).itemsize
    last = np.fromfile(work / "train.bin", dtype=state["dtype"], count=n, offset=(train["tokens"] - n) * itemsize)
    _append(work / "validation.bin", last)
    train["tokens"] -= n
    train["documents"] -= 1
    state["splits"]["validation"]["tokens"] += n
    state["splits"]["validation"]["documents"] += 1
    state["held"] = 1
    _commit(work, state)
    os.truncate(work / "train.bin", train["tokens"] * itemsize)


def _tokenize_stream(name: str, source: Source, plan: Plan, state: dict, work: Path, tokenizer, dtype: str,
                     num_proc: int) -> None:
    """Tokenize one source into the split files, a piece at a time, committing after each piece."""
    from tqdm import tqdm

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
    for stale in work.glob("piece-*.arrow"):  # staged by a run that was killed
        stale.unlink()
    # Two bytes a token of uint16 ids, about a token per four bytes of text: half the text's size.
    need = (source.n_bytes - stream["bytes"]) // 2 if source.n_bytes else None
    full = reporting_disk_full(f"token shards of {name}", work, need,
                               "every piece committed so far is kept; the command resumes from the last one")
    with bar, _quiet_datasets_bars(), full:
        for piece, _, raw in _stage_pieces(docs, PIECE_BYTES_PER_PROC * max(1, num_proc), work):
            _write_piece(_map_tokenize(piece, tokenizer, dtype, num_proc), name, plan, state, work)
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


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on ``folder`` (flock on the directory): processes that prepare the same
    data at once (several training ranks) take turns instead of writing over each other."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing token shards in %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock: go on unlocked, as on a non-POSIX system
            log.debug("no lock on %s (%s)", folder, e)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
        for split, s in m["sources"].items():
            lines.append(f"  {split} source: {s}")
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
        manifest = json.loads((folder / MANIFEST).read_text())
        for split in SPLITS:
            entry = manifest["splits"][split]
            if (folder / entry["file"]).stat().st_size != entry["bytes"]:
                log.warning("%s: %s does not have the size its manifest records; preparing it again", folder, entry["file"])
                return None
        return manifest
    except (OSError, ValueError, KeyError):
        return None


def shard_key(plan: Plan, tokenizer, cfg: DataConfig) -> tuple[str, dict]:
    key_src = {"v": CACHE_VERSION, "tok": tokenizer_fingerprint(tokenizer), "data": plan.fingerprint,
               "doc": cfg.document, "field": cfg.text_field}
    return hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20], key_src


def prepare_tokens(cfg: DataConfig, tokenizer, data_dir: Path | None = None, seed: int = 0,
                   num_proc: int | None = None) -> TokenShards:
    """Token shards for ``cfg``'s train/validation data: found under ``<data dir>/tokens/<key>/`` or
    prepared there (resuming an interrupted preparation of the same key)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    data_dir = Path(data_dir or default_data_dir())
    plan = plan_sources(cfg, data_dir, seed)
    key, key_src = shard_key(plan, tokenizer, cfg)
    root = data_dir / TOKENS_DIR
    dest, work = root / key, root / f".{key}.partial"
    manifest = _read_manifest(dest)
    if manifest is not None and not work.exists():
        return TokenShards(dest, manifest)

    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        manifest = _read_manifest(dest)  # another process may have finished it while we waited
        if manifest is None:
            # Holding the lock, nothing else is preparing here: other keys' unfinished work (data that
            # has since changed) and folders of a publish killed half-way are leftovers.
            for stale in [*root.glob(".*.partial"), *root.glob(".*-tmp-*")]:
                if stale != work:
                    log.info("removing %s, left by an interrupted preparation", stale)
                    shutil.rmtree(stale, ignore_errors=True)
            manifest = _prepare(plan, cfg, tokenizer, key, key_src, dest, work, num_proc)
        shutil.rmtree(work, ignore_errors=True)
    return TokenShards(dest, manifest)


def _prepare(plan: Plan, cfg: DataConfig, tokenizer, key: str, key_src: dict, dest: Path, work: Path,
             num_proc: int | None) -> dict:
    dtype = token_dtype(tokenizer)
    if num_proc is None:
        num_proc = cfg.num_proc  # 0 = chosen from the CPU count and the data size
    if not num_proc:
        sizes = [s.n_bytes for s in plan.sources.values()]
        num_proc = auto_num_proc(None if None in sizes else sum(sizes))
    t0 = time.perf_counter()
    state = _resume_state(work, key, dtype)
    resumed = state is not None
    if state is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        state = {"key": key, "dtype": dtype, "held": 0, "last_doc_tokens": 0,
                 "streams": {name: {"docs": 0, "bytes": 0, "done": False} for name in plan.sources},
                 "splits": {s: {"tokens": 0, "documents": 0} for s in SPLITS}}
        for split in SPLITS:
            (work / f"{split}.bin").touch()
    else:
        done = sum(s["docs"] for s in state["streams"].values())
        log.info("resuming the token shards %s after %s documents", key, f"{done:,}")
    log.info("tokenizing into %s (%s, %d process%s)", dest, dtype, num_proc, "es" if num_proc > 1 else "")
    try:
        for name, source in plan.sources.items():
            _tokenize_stream(name, source, plan, state, work, tokenizer, dtype, num_proc)
    except DataError:
        shutil.rmtree(work, ignore_errors=True)  # bad input: nothing worth resuming
        raise
    seconds = time.perf_counter() - t0
    itemsize = np.dtype(dtype).itemsize
    manifest = {
        "version": CACHE_VERSION,
        "key": key,
        "key_source": key_src,
        "dtype": dtype,
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer": {"name": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
                      "fingerprint": key_src["tok"]},
        "sources": {name: s.describe for name, s in plan.sources.items()},
        "source_fingerprint": plan.fingerprint,
        "document": cfg.document,
        "text_field": cfg.text_field,
        "holdout": {"fraction": plan.holdout[0], "seed": plan.holdout[1]} if plan.holdout else None,
        "splits": {s: {"file": f"{s}.bin", "tokens": c["tokens"], "documents": c["documents"],
                       "bytes": c["tokens"] * itemsize} for s, c in state["splits"].items()},
        "num_proc": num_proc,
        "seconds": round(seconds, 2),  # of the run that finished it
        "resumed": resumed,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    with atomic_dir(dest) as tmp:
        for split in SPLITS:
            os.replace(work / f"{split}.bin", tmp / f"{split}.bin")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


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


class MixedBlocks:
    """Several sources' training blocks as one ``(n, block_size)`` set in which source k fills a
    share ``weights[k]`` of the rows (``DataConfig.mix``).

    The first source appears once, row for row; source k gets ``n·weights[k]`` rows after it, its own
    rows repeated when it is smaller than that and evenly thinned when larger. ``batch_indices``
    permutes these rows per epoch like any other set's, so each epoch draws exactly the configured
    shares and a batch is still a pure function of the step. Indexed like :class:`TokenBlocks`.
    """

    def __init__(self, parts: list, weights: list[float]):
        self.parts, self.block_size = parts, int(parts[0].shape[1])
        self.counts = [len(parts[0])] + [max(1, round(len(parts[0]) * x / weights[0])) for x in weights[1:]]
        self.starts = np.cumsum([0] + self.counts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.block_size)

    def numel(self) -> int:
        return len(self) * self.block_size

    def source_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, row in that source) of each row of the mixture."""
        part = np.searchsorted(self.starts, rows, side="right") - 1
        local = rows - self.starts[part]
        sizes = np.array([len(p) for p in self.parts])[part]
        counts = np.array(self.counts)[part]
        return part, np.where(counts <= sizes, local * sizes // counts, local % sizes)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        rows, n = key[0], len(self)
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(n))
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"block indices out of range for {n:,} blocks")
        part, local = self.source_rows(rows.reshape(-1))
        out = torch.empty((rows.size, self.block_size), dtype=torch.int64)
        for k in np.unique(part):
            sel = np.flatnonzero(part == k)
            out[torch.from_numpy(sel)] = self.parts[k][torch.from_numpy(local[sel])]
        out = out.reshape(*rows.shape, self.block_size)
        return out[(..., key[1])] if len(key) > 1 else out


def _mixed_blocks(cfg: DataConfig, tokenizer, data_dir: Path | None, seed: int, num_proc: int | None) -> dict[str, Blocks]:
    """``data.mix``: each source's own shards, mixed by :class:`MixedBlocks`; validation from the first."""
    first, *rest = [p.strip() for p in cfg.train.split(",") if p.strip()]
    for spec in rest:
        if not is_local_spec(spec):
            raise DataError(f"data.mix: {spec!r} must be a local .txt/.jsonl file or folder (only the first source may be "
                            "the embedded corpus or a hub set)")
    out = load_blocks(dataclasses.replace(cfg, train=first, mix=[]), tokenizer, data_dir, seed, num_proc)
    # A further source is used whole for training: naming it as its own validation avoids a held-out cut.
    train = [out["train"]] + [load_blocks(dataclasses.replace(cfg, train=s, validation=s, mix=[]), tokenizer, data_dir,
                                          seed, num_proc)["train"] for s in rest]
    mixed = MixedBlocks([b.ids for b in train], cfg.mix)
    out["train"] = Blocks(mixed, fingerprint="mix:" + ";".join(f"{b.fingerprint}*{w:g}" for b, w in zip(train, cfg.mix)))
    log.info("data.mix: %s", ", ".join(f"{s} {c:,} blocks" for s, c in zip([first, *rest], mixed.counts)))
    return out


# --------------------------------------------------------------------------- sampling


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    # int32 holds the same permutation in half the memory (4 bytes per block: 0.8% of a uint16
    # token file at 256-token blocks); cached so a step costs O(batch), not O(n_blocks).
    dtype = torch.int32 if n_blocks < 2**31 else torch.int64
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch), dtype=dtype)


def batch_indices(n_blocks: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
    """Block indices of global micro-batch ``micro_step``: a seeded permutation per epoch.

    A pure function of the step, so a resumed run reads exactly the batches an uninterrupted run
    would have, with no sampler state to save.
    """
    per_epoch = max(1, n_blocks // batch_size)  # full batches only
    epoch, i = divmod(micro_step, per_epoch)
    return _epoch_permutation(n_blocks, seed, epoch)[i * batch_size:(i + 1) * batch_size].to(torch.int64, copy=True)
