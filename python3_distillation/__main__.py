"""python -m python3_distillation teacher|distill|infer|serve|evaluate ..."""

from python3_distillation.cli import main

raise SystemExit(main())
