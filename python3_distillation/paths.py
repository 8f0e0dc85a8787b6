"""Where the project keeps downloaded and built assets.

    python -m python3_distillation assets        # → data/ in a checkout, ~/.cache/python3_distillation installed
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from python3_distillation.errors import AssetError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir() -> Path:
    """Tokenizer, corpus, token shards, teacher caches: ``$DISTILL_DATA_DIR`` if set; else the
    checkout's ``data/`` when the package runs from a checkout (so `make` and a shell command, from
    any folder, share one copy); else ``$XDG_CACHE_HOME/python3_distillation`` (``~/.cache/…``)."""
    if env := os.environ.get("DISTILL_DATA_DIR"):
        return Path(env).expanduser()
    try:  # a source checkout: the folder above the package holds the project's pyproject.toml
        project = (PACKAGE_DIR.parent / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        project = ""
    if 'name = "python3-distillation"' in project:
        return PACKAGE_DIR.parent / "data"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "python3_distillation"


def download(cmd: list[str], folder: Path, name: str, what: str, hint: str, error: type[AssetError] = AssetError,
             failed: str | None = None, timeout: float | None = None) -> Path:
    """The last file in ``folder`` matching the glob ``name``, else the one ``cmd``, run in ``folder``,
    downloads there (``what``: what it fetches). A failure raises ``error``: what failed (``failed``,
    default the command), the tool's last line of output, then ``hint``, the way out."""
    folder = Path(folder)
    if found := sorted(folder.glob(name)):
        return found[-1]
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s with %s into %s", what, cmd[0], folder)
    try:
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise error(f"{cmd[0]} not found, cannot download {what}; {hint}") from None
    except subprocess.TimeoutExpired:
        raise error(f"{' '.join(cmd)} took over {timeout} s; {hint}") from None
    found = sorted(folder.glob(name))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise error(f"{failed or ' '.join(cmd) + ' failed'} ({tail[0]}); {hint}")
    return found[-1]


# The seed's folder names, inside the package so the entry scripts find them without flags; each
# trained model also has an int8 copy under "<name>_int8" (quantize.py) once it is quantized.
_TRAINED = {"teacher": "gpt2_teacher", "v1": "gpt2_student", "v2": "gpt2_student_v2",
            "v2_ce": "gpt2_student_v2_ce", "v2_narrow": "gpt2_student_v2_narrow"}
MODEL_DIRS = {**{k: PACKAGE_DIR / v for k, v in _TRAINED.items()},
              **{f"{k}_int8": PACKAGE_DIR / f"{v}_int8" for k, v in _TRAINED.items()}}


def model_dir(name: str) -> Path:
    """Folder of a named model (``teacher``, ``v1``, ``v2``, ``v2_ce``, ``v2_narrow``, ``<name>_int8``):
    ``python3_distillation/<folder>`` under the working directory, where training writes, when it exists (an
    installed package trained in a project folder), else the package's own (a checkout, run from anywhere)."""
    try:
        path = MODEL_DIRS[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(MODEL_DIRS)}") from None
    local = Path.cwd() / PACKAGE_DIR.name / path.name
    return local if path.parent == PACKAGE_DIR and local.is_dir() else path


def default_model_path(name: str) -> str:
    """A config's default folder for a named model, relative to the working directory (the project
    folder, where every documented command runs), so saved configs carry no machine paths."""
    return f"{PACKAGE_DIR.name}/{model_dir(name).name}"


def display_path(path: str | Path) -> str:
    """Relative to the working directory when inside it, so cards and reports carry no machine paths."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def model_arg(value: str) -> Path:
    """A ``--model`` value: a folder, or a model name (``v2``, ``v2_int8``, ``teacher`` …) that is not one."""
    path = Path(value).expanduser()
    return model_dir(value) if value in MODEL_DIRS and not path.exists() else path
