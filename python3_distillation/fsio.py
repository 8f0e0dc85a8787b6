"""Crash-safe writes: a file or a whole folder appears complete or not at all.

    python -c "from python3_distillation.fsio import atomic_write_text; atomic_write_text('x.txt', 'hi')"

Every writer in the project (model folders, checkpoints, token caches, the corpus, the rebuilt
tokenizer) goes through these two helpers, so a kill at any moment leaves either the old content or
the new one, never a half-written mix, and a folder being replaced is never missing: on Linux the
new folder is swapped in with ``renameat2(RENAME_EXCHANGE)``, one atomic step; where that call is
missing (other systems, old kernels, some file systems) the old folder is renamed aside first, a
window of two ``rename`` calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_write_text", "atomic_write_bytes", "fsync_tree", "sha256_file"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and directories on some systems) refuse fsync; nothing more to do
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (and itself), so a rename publishes durable data."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root) / name)
        for name in dirs:
            _fsync_path(Path(root) / name)
    _fsync_path(folder)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


_LIBC = _libc()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False when the system cannot (then nothing changed)."""
    fn = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give it the modes a plain mkdir/write would (umask), so another
    user (a container's non-root user, a server account) can read what was written."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        if not f.is_symlink():
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def publish_dir(tmp: Path, dest: Path) -> None:
    """Make the finished folder ``tmp`` appear at ``dest`` (replacing any old one) in one step."""
    tmp, dest = Path(tmp), Path(dest)
    _make_readable(tmp)
    fsync_tree(tmp)
    if dest.exists() or dest.is_symlink():
        if dest.is_dir() and not dest.is_symlink() and _exchange(tmp, dest):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old content
        else:
            old = dest.with_name(f".{dest.name}-old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    _fsync_path(dest.parent)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp: write into tmp`` → on success ``tmp`` replaces ``out`` atomically.

    The temporary folder sits beside ``dest`` (same file system, so the rename is atomic) and is
    removed if the block raises; ``dest`` is untouched until the block has finished.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-tmp-", dir=dest.parent))
    try:
        yield tmp
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a synced temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent)
    return path


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
