"""Measuring and reporting: ``measure`` (perplexity, fidelity, speed, FLOPs), ``report`` (the side-by-side
report and its CLI), ``plots`` (charts), ``cards`` (the README.md of every model folder).

    python -m python3_distillation report
"""
