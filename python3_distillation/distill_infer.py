"""Generate with the v1 student (12 layers): thin entry point over python3_distillation.infer.

    HF_HUB_OFFLINE=1 python python3_distillation/distill_infer.py "It is a truth" --max-new-tokens 40 --seed 1
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repo root, not this folder (whose modules would shadow others)
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != here]

from python3_distillation import infer  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(infer.main(default_model="v1"))
