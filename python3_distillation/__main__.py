"""python -m python3_distillation assets|prepare-data|teacher|distill|cache-teacher|report|quantize|export|prune|augment|infer|serve ...

The same commands as ``gpt2-distill`` (see :mod:`python3_distillation.cli`), for when the console
script is not on PATH, and for ``accelerate launch -m python3_distillation distill ...``.
"""

from python3_distillation.cli import main

raise SystemExit(main())
