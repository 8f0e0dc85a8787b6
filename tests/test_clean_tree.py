"""The clean-tree check (clean_tree.py) fails a run that writes into the checkout, and only then.

    python -m pytest -q tests/test_clean_tree.py

Each case runs a two-test pytest session in a throwaway git repository whose conftest.py loads
the same two hooks as ours.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
INNER_TESTS = '''
from pathlib import Path

def test_reads():
    assert Path("conftest.py").exists()

def test_writes():
    if Path("WRITE_ME").exists():
        Path(Path("WRITE_ME").read_text().strip()).write_text("output")
'''


def run_inner(folder: Path, write: str | None, git: bool) -> subprocess.CompletedProcess:
    (folder / "conftest.py").write_text("from clean_tree import pytest_sessionfinish, pytest_sessionstart\n")
    (folder / "test_inner.py").write_text(INNER_TESTS)
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / ".gitignore").write_text("__pycache__/\n.pytest_cache/\n")
    if write:
        (folder / "WRITE_ME").write_text(write)
    if git:
        subprocess.run(["git", "init", "-q", str(folder)], check=True, timeout=60)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("write, git, status", [
    (None, True, 0),        # a run that writes nothing passes
    ("out.txt", True, 1),   # a new file in the checkout fails the run, though every test passed
    ("out.txt", False, 0),  # outside a git checkout there is nothing to compare
])
def test_the_run_fails_when_the_checkout_changes(tmp_path, write, git, status):
    proc = run_inner(tmp_path, write, git)
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout
    assert (f"+ ?? {write}" in proc.stdout) == bool(status)


def test_a_modified_tracked_file_is_caught(tmp_path):
    (tmp_path / "tracked.txt").write_text("committed\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, timeout=60)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "add", "tracked.txt"],
                   cwd=tmp_path, check=True, timeout=60)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "x"],
                   cwd=tmp_path, check=True, timeout=60)
    proc = run_inner(tmp_path, "tracked.txt", git=False)  # already a repository
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "+  M tracked.txt" in proc.stdout
