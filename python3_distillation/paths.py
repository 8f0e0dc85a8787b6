"""Where the project keeps downloaded and built assets.

    DISTILL_DATA_DIR=./data python -m python3_distillation assets
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir() -> Path:
    """``$DISTILL_DATA_DIR``, else ``~/.cache/python3_distillation`` (tokenizer, corpus, token caches)."""
    env = os.environ.get("DISTILL_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "python3_distillation"


# The seed's folder names, inside the package so the entry scripts find them without flags.
MODEL_DIRS = {
    "teacher": PACKAGE_DIR / "gpt2_teacher",
    "v1": PACKAGE_DIR / "gpt2_student",
    "v2": PACKAGE_DIR / "gpt2_student_v2",
    "v2_ce": PACKAGE_DIR / "gpt2_student_v2_ce",
}


def model_dir(name: str) -> Path:
    """Default output/input folder of a named model (``teacher``, ``v1``, ``v2``, ``v2_ce``)."""
    try:
        return MODEL_DIRS[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(MODEL_DIRS)}") from None


def default_model_path(name: str) -> str:
    """A config's default folder for a named model, relative to the working directory (the project
    folder, where every documented command runs), so saved configs carry no machine paths."""
    return f"{PACKAGE_DIR.name}/{model_dir(name).name}"
