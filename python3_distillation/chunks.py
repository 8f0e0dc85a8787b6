"""Row chunks run on CPU worker threads that each run torch single-threaded, results in chunk order.

    python -c "import torch; from python3_distillation.chunks import map_chunks; \
print(map_chunks(lambda i, j: (i, j), 10, 4, torch.device('cpu')))"

Used by the chunked KD loss (losses.py); design notes: docs/design/data.md.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

# One process-wide pool of CPU workers, each running torch single-threaded (see map_chunks).
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _drop_pool_after_fork() -> None:
    global _POOL, _POOL_SIZE
    _POOL, _POOL_SIZE = None, 0  # threads do not survive fork(); a child builds its own pool


os.register_at_fork(after_in_child=_drop_pool_after_fork)


def _single_threaded_worker(barrier: threading.Barrier) -> None:
    torch.get_num_threads()  # let torch initialise this thread's OpenMP setting now ...
    torch.set_num_threads(1)  # ... then override it: OpenMP thread counts are per calling thread
    barrier.wait()  # hold every worker until all exist, so each runs this exactly once


def _pool(workers: int) -> ThreadPoolExecutor:
    """``workers`` threads whose torch ops run single-threaded; the caller's thread count is kept."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="kd-loss")
            barrier = threading.Barrier(workers)
            for future in [pool.submit(_single_threaded_worker, barrier) for _ in range(workers)]:
                future.result()
            # set_num_threads(1) in the workers also changed torch's process-wide default that new
            # threads start from; restore it (the calling thread's own count never changed).
            torch.set_num_threads(workers)
            _POOL, _POOL_SIZE = pool, workers
        return _POOL


def map_chunks(fn: Callable[[int, int], object], n: int, chunk_rows: int, device: torch.device) -> list:
    """``[fn(i, j) for each chunk [i, j) of range(n)]``, in chunk order: on CPU on ``torch.get_num_threads()``
    single-threaded workers (why: docs/design/data.md), so results depend neither on scheduling nor on the
    thread count; CUDA tensors run inline."""
    bounds = [(i, min(i + chunk_rows, n)) for i in range(0, n, chunk_rows)]

    def run(part: list[tuple[int, int]]) -> list:
        # Worker threads do not inherit the caller's no-grad or autocast state; pin both.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return [fn(i, j) for i, j in part]

    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads <= 1 or not bounds:
        return run(bounds)
    # Even a single chunk goes to a worker: inline it would run multi-threaded, whose reductions
    # may round differently, and the bits would then depend on the thread count.
    workers = min(threads, len(bounds))
    pool = _pool(threads)
    futures = [pool.submit(run, bounds[w::workers]) for w in range(workers)]
    parts = [f.result() for f in futures]
    return [parts[k % workers][k // workers] for k in range(len(bounds))]
