"""Distil the v1 student (12 layers, teacher-sized) → python3_distillation/gpt2_student/

    python python3_distillation/distill_training.py [--resume] [section.key=value ...]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repo root, not this folder (whose modules would shadow others)
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != here]

from python3_distillation.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["distill", "--config", "v1", *sys.argv[1:]]))
