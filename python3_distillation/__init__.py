"""GPT-2 distillation toolkit: teacher → v1/v2 students → inference → serving.

    python -m python3_distillation --help
"""

__version__ = "3.0.0"
