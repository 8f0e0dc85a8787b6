"""What a stage was built from: fingerprints of its inputs and its config, compared on resume and in the report.

    python -c "from python3_distillation.models import open_model; from python3_distillation.lineage import weights_sha256; \
print(weights_sha256(open_model('python3_distillation/gpt2_teacher').model))"

Explained in README.md, "Precision, resume and reproducibility"; design notes: docs/design/data.md.
"""

from __future__ import annotations

import hashlib
import json
import time

import torch
import yaml

from python3_distillation.config import RunConfig

# Keys that change where results go or how often they are logged, not what is trained.
VOLATILE = {
    ("name",), ("train", "max_steps"), ("train", "eval_every"), ("train", "save_every"),
    ("train", "keep_checkpoints"), ("train", "log_every"), ("train", "run_dir"),
    ("teacher", "path"), ("student", "output_dir"), ("data", "max_eval_blocks"),
    ("distill", "teacher_cache"),  # where the cache lies; its identity is an input (teacher_cache.py)
    ("train", "compile"),  # how the same graph runs (device_plan.py); a run may resume either way
}


def process_seconds() -> float | None:
    """Wall seconds since this process started (interpreter, imports and set-up included): what a
    stage of `make run` costs, recorded as ``stage_seconds`` beside ``train_seconds``."""
    try:
        import psutil
    except ImportError:
        return None
    return round(time.time() - psutil.Process().create_time(), 1)


def _hash_tensor(h, t: torch.Tensor, label: str = "") -> None:
    """Feed ``label``, the dtype, the shape and the bytes of ``t`` to the hash ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{label}{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's unique tensors by name (dtype, shape, bytes): file-format independent."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        if t.data_ptr() not in seen or not t.numel():  # a tied weight (lm_head = wte) is counted once
            seen.add(t.data_ptr())
            _hash_tensor(h, t, f"{name}|")
    return h.hexdigest()


def stage_fingerprint(cfg: RunConfig, inputs: dict) -> dict:
    d = yaml.safe_load(cfg.to_yaml())  # paths as saved: relative to the working directory
    for path in VOLATILE:
        node = d
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return {"inputs": dict(inputs), "config": d}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences(old: dict, new: dict) -> list[str]:
    """``"key: old → new"`` for every differing leaf of two nested dicts."""
    a, b = _flatten(old or {}), _flatten(new or {})
    return [f"{key}: {_short(a.get(key, '(unset)'))} → {_short(b.get(key, '(unset)'))}"
            for key in sorted(set(a) | set(b))
            if json.dumps(a.get(key), sort_keys=True) != json.dumps(b.get(key), sort_keys=True)]


def _short(v) -> str:
    s = str(v)
    return s[:12] + "…" if len(s) == 64 and all(c in "0123456789abcdef" for c in s) else s


def data_fingerprint(blocks: dict) -> str:
    """The token data's identity: the cache key when the blocks carry one, else a hash of the tokens."""
    if key := getattr(blocks["train"], "fingerprint", None):
        return str(key)
    h = hashlib.sha256()
    for split in ("train", "validation"):
        _hash_tensor(h, torch.as_tensor(blocks[split].ids[:]))
    return h.hexdigest()
