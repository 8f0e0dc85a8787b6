"""Training checkpoints that load nothing executable: safetensors for tensors, JSON for the rest.

    python -m python3_distillation.checkpoint runs/v2/checkpoint-200     # verify one, print its state

Explained in README.md, "Precision, resume and reproducibility"; design notes: docs/design/data.md.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from python3_distillation.errors import CheckpointError
from python3_distillation.resumable import MANIFEST, check_files, file_entries, read_manifest

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_GROUPS = "optimizer.safetensors", "optimizer.json"
FORMAT = 1


def rng_files(rank: int) -> tuple[str, str]:
    return f"rng-{rank}.safetensors", f"rng-{rank}.json"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders of a run, oldest first (temp folders of an interrupted write excluded)."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-[0-9]+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def save_model_weights(model: torch.nn.Module, folder: Path) -> None:
    save_model(model, str(Path(folder) / MODEL_FILE))  # drops tied duplicates (lm_head = wte)


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Per-parameter state as tensors ``"<param index>.<name>"``; param groups and scalars as JSON."""
    sd = optimizer.state_dict()
    items = {f"{pid}.{name}": value for pid, state in sd["state"].items() for name, value in state.items()}
    tensors = {key: v.detach().cpu().contiguous() for key, v in items.items() if torch.is_tensor(v)}
    scalars = {key: v for key, v in items.items() if not torch.is_tensor(v)}
    save_file(tensors, str(Path(folder) / OPTIMIZER_TENSORS))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    (Path(folder) / OPTIMIZER_GROUPS).write_text(json.dumps({"param_groups": groups, "scalars": scalars}))


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch (CPU and every CUDA device) as tensors, Python's and NumPy's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(state), gauss],
                     "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}


def save_rng(folder: Path, rank: int, states: tuple[dict[str, torch.Tensor], dict]) -> None:
    """Write process ``rank``'s RNG states as ``capture_rng`` returned them there (the main process writes all)."""
    t_name, j_name = rng_files(rank)
    save_file(states[0], str(Path(folder) / t_name))
    (Path(folder) / j_name).write_text(json.dumps(states[1]))


def write_state(folder: Path, state: dict) -> dict:
    """Write ``trainer_state.json``; returns the manifest of every file, written last (``WorkFolder.publish``)."""
    (Path(folder) / STATE_FILE).write_text(json.dumps(state, indent=1))
    return {"format": FORMAT, "files": file_entries(folder)}


def verify(folder: Path) -> dict:
    """Check every file against the manifest; returns the trainer state. Raises CheckpointError."""
    folder = Path(folder)
    try:
        listed = dict(read_manifest(folder)["files"])
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST} (the write did not finish)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: unreadable {MANIFEST} ({e})") from None
    if problem := check_files(folder, listed, complete=True):
        raise CheckpointError(f"{folder}: {problem}")
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        int(state["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable {STATE_FILE} ({e})") from None
    return state


def newest_valid(run_dir: Path, warn=None) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that verifies, and its state; each refused one is reported through ``warn``."""
    warn = warn or log.warning
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            return ckpt, verify(ckpt)
        except CheckpointError as e:
            warn(f"{e}; falling back to an earlier checkpoint")
    return None, None


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    missing, unexpected = load_model(model, str(Path(folder) / MODEL_FILE), strict=False)
    # Tied weights are stored once; the other name is reported missing by design.
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_optimizer_state(folder: Path) -> dict:
    folder = Path(folder)
    tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    extra = json.loads((folder / OPTIMIZER_GROUPS).read_text())
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(extra["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in extra["param_groups"]]
    return {"state": state, "param_groups": groups}


def restore_rng(folder: Path, rank: int) -> bool:
    """Restore this process's RNG states; False (states left as seeded) when the file is absent."""
    t_name, j_name = rng_files(rank)
    if not (Path(folder) / t_name).exists():
        return False
    tensors = load_file(str(Path(folder) / t_name))
    meta = json.loads((Path(folder) / j_name).read_text())
    torch.set_rng_state(tensors["torch_cpu"])
    # By device index: as text, torch_cuda_10 would sort before torch_cuda_2.
    cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        raise SystemExit(2)
    try:
        print(json.dumps(verify(Path(sys.argv[1])), indent=1))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
