"""tcmalloc for the stages: fetched without installing anything, and the same numbers.

    python -m pytest -q tests/test_allocator.py
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from python3_distillation import allocator
from python3_distillation.errors import AssetError

# A few training steps' worth of float work whose result depends on every element.
WORK = ("import torch, hashlib; torch.manual_seed(0); m = torch.nn.Linear(256, 50257); x = torch.randn(64, 256)\n"
        "for _ in range(3):\n"
        "    loss = torch.log_softmax(m(x), -1).mean(); loss.backward()\n"
        "    with torch.no_grad():\n"
        "        for p in m.parameters(): p -= 0.1 * p.grad; p.grad = None\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(hashlib.sha256(m.weight.detach().numpy().tobytes()).hexdigest(), 'tcmalloc' in maps)")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The library unpacked from the package's .deb, as a machine without it installed gets it."""
    root = tmp_path_factory.mktemp("alloc")
    try:
        return allocator.unpacked(root)
    except AssetError as e:
        pytest.skip(f"apt-get download {allocator.PACKAGE} is not possible here: {e}")


def run(env: dict) -> tuple[str, bool]:
    out = subprocess.run([sys.executable, "-c", WORK], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0], out[1] == "True"


def test_unpacked_from_the_deb_and_preloaded_it_computes_the_same(library):
    assert library.name == "libtcmalloc_minimal.so.4" and library.stat().st_size > 100_000
    plain, plain_uses = run({"LD_PRELOAD": ""})
    preloaded, uses = run({"LD_PRELOAD": str(library)})
    assert uses and not plain_uses  # the preload really replaced the allocator
    assert preloaded == plain


def test_the_command_prints_a_path_or_nothing(tmp_path):
    def cmd(**env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "python3_distillation.allocator"], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "DISTILL_DATA_DIR": str(tmp_path), **env})

    assert cmd(DISTILL_MALLOC="glibc").stdout == ""
    out = cmd()
    assert out.returncode == 0
    if out.stdout.strip():
        assert out.stdout.strip().endswith("libtcmalloc_minimal.so.4")
    else:  # no library to be had: the stages run on glibc, and it says why
        assert "glibc malloc" in out.stderr


def test_a_library_that_does_not_load_is_refused(tmp_path):
    lib = tmp_path / "malloc" / allocator.LIBRARY
    lib.parent.mkdir()
    lib.write_bytes(b"not an ELF file")
    with pytest.raises(AssetError, match="does not load"):
        allocator.unpacked(tmp_path)
