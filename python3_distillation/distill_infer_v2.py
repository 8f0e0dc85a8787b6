"""Generate with the v2 student (6 layers): thin entry point over python3_distillation.infer.

    HF_HUB_OFFLINE=1 python python3_distillation/distill_infer_v2.py "It is a truth" --max-new-tokens 40 --seed 1

Run `python python3_distillation/distill_infer_v2.py --help` for every option (batch files, streaming, --compare).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: Python put this folder first on sys.path, where its modules could shadow
    # top-level ones; put the repository root there instead so the package imports without install.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

from python3_distillation import infer  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(infer.main(default_model="v2"))
