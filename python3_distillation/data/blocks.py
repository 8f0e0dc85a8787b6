"""The views training reads: a token file as ``(n_blocks, block_size)`` rows on disk, mixtures, and batch order.

    python -c "from python3_distillation.data import batch_indices; print(batch_indices(100, 4, 0, seed=0))"

Block ``i`` of a split is ``tokens[i·B:(i+1)·B]`` for any block size ``B`` (README.md, "Data at scale").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from python3_distillation.fsio import read_rows


class _Rows:
    """A read-only ``(n_blocks, block_size)`` int64 tensor whose rows are produced on access (``_read``).

    Indexing works like a tensor's (``ids[idx]`` with a LongTensor, ``ids[i, :n]``, ``ids[:n]``, a
    boolean row mask) and returns int64 tensors holding just the rows asked for.
    """

    n_blocks: int
    block_size: int

    def __len__(self) -> int:
        return self.n_blocks

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.block_size)

    def numel(self) -> int:
        return len(self) * self.block_size

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
        raise NotImplementedError

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


class TokenBlocks(_Rows):
    """A flat token file as ``(n_blocks, block_size)`` rows that stay on disk, read for each access
    (``fsio.read_rows``) and never kept; the tail shorter than a block is not a row."""

    def __init__(self, path: str | Path, dtype: str, block_size: int):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.block_size = int(block_size)
        self.n_blocks = self.path.stat().st_size // (self.dtype.itemsize * self.block_size)

    def __repr__(self) -> str:
        return f"TokenBlocks({self.path}, {len(self):,} blocks of {self.block_size}, {self.dtype})"

    def _read(self, rows: np.ndarray) -> np.ndarray:
        return read_rows(self.path, rows, np.empty((rows.size, self.block_size), dtype=self.dtype))


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


class MixedBlocks(_Rows):
    """Several sources' training blocks as one ``(n, block_size)`` set, source k a share ``weights[k]``.

    The first source appears once, row for row; source k gets ``n·weights[k]`` rows after it, its own
    rows repeated or evenly thinned to that count. ``batch_indices`` permutes them per epoch like any
    set's, so each epoch draws exactly the configured shares (``DataConfig.mix``).
    """

    def __init__(self, parts: list, weights: list[float]):
        self.parts, self.block_size = parts, int(parts[0].shape[1])
        self.counts = [len(parts[0])] + [max(1, round(len(parts[0]) * x / weights[0])) for x in weights[1:]]
        self.starts = np.cumsum([0] + self.counts)
        self.n_blocks = int(self.starts[-1])

    def _read(self, rows: np.ndarray) -> np.ndarray:
        part = np.searchsorted(self.starts, rows, side="right") - 1  # the source of each row, and its row there
        local = rows - self.starts[part]
        sizes, counts = np.array([len(p) for p in self.parts])[part], np.array(self.counts)[part]
        local = np.where(counts <= sizes, local * sizes // counts, local % sizes)
        out = np.empty((rows.size, self.block_size), dtype=np.int64)
        for k in np.unique(part):
            sel = np.flatnonzero(part == k)
            out[sel] = np.asarray(self.parts[k][torch.from_numpy(local[sel])])
        return out


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
