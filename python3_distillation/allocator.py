"""tcmalloc under the training stages: the same arithmetic, about twice the steps per second.

    LD_PRELOAD="$(python -m python3_distillation.allocator)" python -m python3_distillation teacher

Prints the library's path for ``LD_PRELOAD``, or nothing (the reason on stderr) when it cannot be had.
``DISTILL_MALLOC=glibc`` opts out. Design notes (why, measured): docs/design/data.md.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

from python3_distillation.errors import AssetError
from python3_distillation.paths import data_dir

PACKAGE = "libtcmalloc-minimal4"
LIBRARY = "libtcmalloc_minimal.so.4"
# The regular file behind the .so.4 link: libtcmalloc_minimal.so.4.5.10 in Debian 12.
IN_PACKAGE = re.compile(r"/libtcmalloc_minimal\.so\.4(\.\d+)*$")


def unpacked(root: Path) -> Path:
    """``root/malloc/libtcmalloc_minimal.so.4``, from the package's .deb on first use, checked to load."""
    lib = root / "malloc" / LIBRARY
    if not lib.is_file():
        from python3_distillation.corpus import fetch_deb, read_deb_member
        from python3_distillation.fsio import atomic_write_bytes

        deb = fetch_deb(PACKAGE, root / "downloads", "set DISTILL_MALLOC=glibc to train without it")
        atomic_write_bytes(lib, read_deb_member(deb, IN_PACKAGE))
    # A child Python allocating with it preloaded (a running process cannot swap its allocator).
    probe = subprocess.run([sys.executable, "-c", "b = [bytearray(1 << 20) for _ in range(64)]"],
                           env={**os.environ, "LD_PRELOAD": str(lib)}, capture_output=True, timeout=60)
    if probe.returncode != 0 or probe.stderr.strip():
        raise AssetError(f"{lib} does not load into Python here (another architecture?); "
                         "delete it to fetch it again, or set DISTILL_MALLOC=glibc")
    return lib


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("DISTILL_MALLOC", "tcmalloc") == "glibc":
        return 0
    # An installed library, else the one unpacked under <data dir>/malloc (fetched once).
    installed = sorted(glob.glob(f"/usr/lib/*/{LIBRARY}")) + sorted(glob.glob(f"/usr/lib/{LIBRARY}"))
    try:
        print(installed[0] if installed else unpacked(data_dir()))
    except AssetError as e:
        print(f"allocator: glibc malloc (tcmalloc unavailable: {e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
