"""Serve the v1 (12-layer) student: web page and API on http://127.0.0.1:6006.

    python python3_distillation/distill_api_server.py [--port 6006] [--compare python3_distillation/gpt2_teacher]

The production server (gunicorn, as in the Docker images); ``--help`` lists the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: its own folder on sys.path would let package modules shadow top-level
    # ones, so put the repository root there instead.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

from python3_distillation.serving.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], default_model="v1"))
