"""The lock is what gets installed, and the images' requirements are cut from it.

    python -m pytest -q tests/test_lock.py
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lock", REPO / "scripts" / "lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def test_backend_requirements_are_generated_from_the_lock():
    """requirements_v3_backend.txt is exactly what `make lock` derives: a hand edit, or a lock
    changed without re-deriving it, fails here."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "lock.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_subset_is_the_serving_closure_without_torch():
    entries = lock.parse_lock(lock.LOCK.read_text(encoding="utf-8"))
    subset = set(lock.serving_subset(entries))
    assert {"transformers", "flask", "gunicorn", "safetensors", "pydantic", "tokenizers"} <= subset
    # Every dependency edge the lock records from a served package stays inside the subset...
    for name, entry in entries.items():
        if entry["via"] & subset and name != "torch":
            assert name in subset, f"{name} is needed by {entry['via'] & subset} but not in the image"
    # ...while training/test tools and what only torch needs stay out.
    assert not subset & {"torch", "sympy", "mpmath", "networkx", "accelerate", "datasets", "pytest", "pip-tools"}
    for name in subset:
        assert entries[name]["hashes"], f"{name} has no hashes in the lock"


def test_a_lock_with_an_edge_through_torch_only_keeps_it_out():
    """The walk itself, on a hand-written lock: y is needed only by torch, z by a served package."""
    text = ("flask==1 \\\n    --hash=sha256:aa\n    # via python3-distillation\n\n"
            "y==2 \\\n    --hash=sha256:bb\n    # via torch\n\n"
            "z==3 \\\n    --hash=sha256:cc\n    # via\n    #   flask\n    #   torch\n")
    entries = lock.parse_lock(text)
    assert entries["z"]["via"] == {"flask", "torch"}
    roots = lock.serving_roots
    try:
        lock.serving_roots = lambda: {"flask"}
        assert lock.serving_subset(entries) == ["flask", "z"]
    finally:
        lock.serving_roots = roots


@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="only the project's own .venv (make setup) is installed from the lock")
def test_the_environment_is_the_lock():
    """`pip freeze` of .venv is the lock, torch and the package itself aside: nothing missing,
    nothing extra, no other version."""
    pins = {name: e["pin"].split("==")[1] for name, e in lock.parse_lock(lock.LOCK.read_text("utf-8")).items()}
    # What is installed in the venv's own site-packages: a package that vendors others (setuptools'
    # _vendor, put on sys.path once something imports setuptools) does not count.
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    installed = {lock.norm(d.metadata["Name"]): d.version for d in metadata.distributions()
                 if Path(d._path).resolve().parent in site}
    installed = {n: v for n, v in installed.items() if n not in {"torch", lock.PACKAGE}}
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v}
    extra = sorted(set(installed) - set(pins))
    assert not wrong, f"lock vs installed (run `make setup`): {wrong}"
    assert not extra, f"installed but not in the lock: {extra}"
    torch_pin = re.search(r"^TORCH := torch==(\S+)", (REPO / "Makefile").read_text("utf-8"), re.M).group(1)
    assert metadata.version("torch").split("+")[0] == torch_pin
