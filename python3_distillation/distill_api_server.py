"""Serve the v1 (12-layer) student: web page and API on http://127.0.0.1:6006.

    python python3_distillation/distill_api_server.py [--port 6006] [--compare python3_distillation/gpt2_teacher]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repo root, not this folder (whose modules would shadow others)
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != here]

from python3_distillation.serving.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], default_model="v1"))
