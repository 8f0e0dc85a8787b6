"""A full disk costs the user nothing already written, and they get one line saying what to do.

    python -m pytest -q tests/test_disk_full.py

The real cases run on a small tmpfs (skipped where mounting is not allowed).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from conftest import tiny_overrides
from python3_distillation.errors import EXIT_BAD_INPUT, DiskFullError
from python3_distillation.fsio import atomic_dir, reporting_disk_full


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs: room for one checkpoint of the tiny teacher (~19 MB with its AdamW state), not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_becomes_one_line_and_other_errors_pass(tmp_path):
    with pytest.raises(DiskFullError) as e:
        with reporting_disk_full("the model", tmp_path / "out", 3_000_000, "out is unchanged"):
            raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"out of disk space writing the model to {tmp_path / 'out'}")
    assert "needs about 3.0 MB" in msg and "free there" in msg and "out is unchanged" in msg
    # safetensors reports the OS error inside its own exception's message
    with pytest.raises(DiskFullError):
        with reporting_disk_full("x", tmp_path):
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                               'message: "No space left on device" })')
    with pytest.raises(PermissionError):
        with reporting_disk_full("x", tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied")
    # Nested (a progress record written inside a cache's writer): the outer report says what is intact.
    with pytest.raises(DiskFullError) as e:
        with reporting_disk_full("the teacher cache", tmp_path, None, "2 finished shard(s) are kept"):
            with reporting_disk_full("a file", tmp_path / "progress.json"):
                raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value).startswith("out of disk space writing the teacher cache") and "2 finished shard(s)" in str(e.value)


def test_a_model_that_does_not_fit_leaves_the_old_one(small_disk):
    old = small_disk / "model"
    old.mkdir()
    (old / "weights").write_bytes(b"old")
    with pytest.raises(DiskFullError, match="writing the model to"):
        with atomic_dir(old, "the model") as tmp:
            (tmp / "weights").write_bytes(os.urandom(1 << 20) * 30)
    assert (old / "weights").read_bytes() == b"old"
    assert [p.name for p in small_disk.iterdir()] == ["model"]  # the half-written folder is gone


def test_training_on_a_full_disk_names_the_last_good_checkpoint(small_disk, tmp_path, text_corpus, capsys):
    from python3_distillation.checkpoint import verify
    from python3_distillation.cli import main

    run_dir = small_disk / "run"
    args = tiny_overrides(tmp_path, text_corpus, train={"save_every": 2, "keep_checkpoints": 2,
                                                        "run_dir": run_dir})
    assert main(["teacher", *args]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: out of disk space writing checkpoint-4 to {run_dir} (needs about "), err
    assert f"the last good checkpoint is {run_dir / 'checkpoint-2'}" in err
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-2"]
    assert verify(run_dir / "checkpoint-2")["step"] == 2
