"""Distil the v2 student (6 layers) → python3_distillation/gpt2_student_v2/

    python python3_distillation/distill_training_v2.py [--resume] [section.key=value ...]

Thin entry point: the `v2` config (configs/v2.yaml) and the shared distillation code.
"""

import sys
from pathlib import Path

# Run as a file, Python puts this folder first on sys.path, where config.py or data.py could shadow
# other packages; the repo root takes its place so the package imports as a package.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from python3_distillation.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["distill", "--config", "v2", *sys.argv[1:]]))
