"""Crash-safe writes: a file or a whole folder appears complete or not at all.

    python -c "from python3_distillation.fsio import atomic_write_text; atomic_write_text('x.txt', 'hi')"

Every writer in the project goes through these functions. Design notes: docs/design/data.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from python3_distillation.errors import DataError, DiskFullError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync_path(path: Path) -> None:
    # Some file systems (and directories on some systems) refuse fsync; nothing more to do then.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_LIBC = None
with contextlib.suppress(OSError):
    if _name := ctypes.util.find_library("c"):
        _LIBC = ctypes.CDLL(_name, use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False when the system cannot (then nothing changed)."""
    fn = getattr(_LIBC, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def publish_dir(tmp: Path, dest: Path) -> None:
    """Make the finished folder ``tmp`` appear at ``dest`` (replacing any old one) in one step."""
    tmp, dest = Path(tmp), Path(dest)
    # The modes a plain mkdir/write would give (umask; mkdtemp makes 0700), so another user (a container's
    # non-root user, a server account) can read it all; fsynced, so the rename publishes durable data.
    umask = _umask()
    for f in [*tmp.rglob("*"), tmp]:
        if not f.is_symlink():
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        _fsync_path(f)
    if dest.is_dir() and not dest.is_symlink() and _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old content
    elif dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    _fsync_path(dest.parent)


def human_size(n: float) -> str:
    """Bytes in decimal units (``3.0 MB``), as the report's and the README's sizes are."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@contextlib.contextmanager
def reporting_disk_full(what: str, where: str | Path, need: int | None = None,
                        intact: str = "what was there before is unchanged") -> Iterator[None]:
    """Turn a full disk (or quota) inside the block into one line a user can act on: what was being
    written, where, about how much it needs and how much is free, and what is still intact."""
    try:
        yield
    except BaseException as e:
        # safetensors (a Rust I/O error) and torch's stream writer report the OS error only in the message.
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
                or any(s in str(e) for s in ("No space left on device", "StorageFull", "Disk quota exceeded")))
        if not (full or isinstance(e, DiskFullError)):  # the outermost report knows what is intact
            raise
        where = Path(where)
        probe = next((p for p in (where, *where.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(probe).free
        needs = f"needs about {human_size(need)}, " if need else ""
        raise DiskFullError(f"out of disk space writing {what} to {where} ({needs}{human_size(free)} free there); "
                            f"{intact}; free some space and run the command again") from None


@contextlib.contextmanager
def atomic_dir(dest: str | Path, what: str = "files", need: int | None = None) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp: write into tmp`` → on success ``tmp`` replaces ``out`` atomically;
    ``tmp`` sits beside ``dest`` (same file system: the rename is atomic) and is removed if the block raises."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-tmp-", dir=dest.parent))
    try:
        with reporting_disk_full(what, dest, need, f"{dest} is unchanged"):
            yield tmp
            publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: str | Path, what: str = "a file", need: int | None = None) -> Iterator[Path]:
    """``with atomic_file(out) as tmp: write the file tmp`` → on success ``tmp`` replaces ``out`` in one rename,
    for writers that want a path rather than bytes (GGUF, ONNX); ``tmp`` is removed if the block raises."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with reporting_disk_full(what, dest, need, f"{dest} is unchanged"):
            yield tmp
            _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(dest.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a synced temp file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``atomic_write_bytes`` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces (files here reach gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """Hex sha256 of ``obj`` as JSON with sorted keys: a key that does not depend on dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def read_rows(path: str | Path, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[i]`` = row ``rows[i]`` of a file of fixed-size rows (one row: ``out[0]``'s bytes), read with
    ``readinto`` at the row's offset, one read when the rows are consecutive; returns ``out``. Not a
    memory map (why: docs/design/data.md)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    row_bytes = out.nbytes // max(1, len(out))
    consecutive = rows.size > 0 and bool(np.all(np.diff(rows) == 1))
    with open(path, "rb", buffering=0) as f:
        for buf, row in ([(out, int(rows[0]))] if consecutive else zip(out, rows.tolist())):
            f.seek(row * row_bytes)
            view = memoryview(buf).cast("B")
            if f.readinto(view) != view.nbytes:
                raise DataError(f"{path}: shorter than its manifest records (truncated or changed while in use?)")
    return out

