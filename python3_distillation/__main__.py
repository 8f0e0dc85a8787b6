"""``gpt2-distill`` as a module: for when the console script is not on PATH, and for ``accelerate launch``.

    python -m python3_distillation infer "It is a truth"      # any command of cli.py; --help lists them
    accelerate launch -m python3_distillation distill --config v2
"""

from python3_distillation.cli import main

raise SystemExit(main())
