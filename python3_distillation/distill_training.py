"""Distil the v1 student (12 layers, teacher-sized) → python3_distillation/gpt2_student/

    python python3_distillation/distill_training.py [--resume] [section.key=value ...]

Thin entry point: the `v1` config (configs/v1.yaml) and the shared distillation code.
"""

import sys
from pathlib import Path

# Run as a file, Python puts this folder first on sys.path, where config.py or data.py could shadow
# other packages; the repo root takes its place so the package imports as a package.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from python3_distillation.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["distill", "--config", "v1", *sys.argv[1:]]))
