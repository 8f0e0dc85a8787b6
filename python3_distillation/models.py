"""GPT-2 models: load a teacher, build a student from its layers, save folders transformers can open.

    python -c "from python3_distillation.models import load_model; print(load_model('python3_distillation/gpt2_teacher'))"

Every model is ``transformers``' own ``GPT2LMHeadModel`` saved with ``save_pretrained``
(safetensors), so it opens in ``AutoModelForCausalLM``, ``pipeline()`` and vLLM.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from python3_distillation.config import CONFIG_FILE, RunConfig, TeacherConfig

log = logging.getLogger(__name__)

META_FILE = "distill_meta.json"  # lineage: stage, base checkpoint, copied layers, measured numbers


class ModelError(ValueError):
    """A model folder is missing or incompatible with the tokenizer / the other model."""


def is_model_dir(path: Path) -> bool:
    return (Path(path) / "config.json").exists()


def load_model(spec: str | Path, dtype: torch.dtype | None = None) -> GPT2LMHeadModel:
    """A GPT-2 from a local folder, or a hub id when the hub is reachable."""
    from transformers import AutoModelForCausalLM

    from python3_distillation.tokenizer import hub_reachable

    path = Path(spec).expanduser()
    if path.exists():
        if not is_model_dir(path):
            raise ModelError(f"{path}: not a model folder (no config.json); train one first (`make run`)")
        source = str(path)
    elif hub_reachable():
        source = str(spec)
    else:
        raise ModelError(f"model {str(spec)!r}: no such folder, and the hub is not reachable "
                         "(offline: train the embedded teacher with `make run`)")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if not isinstance(model, GPT2LMHeadModel):
        raise ModelError(f"{spec}: a {type(model).__name__}, but this tool distils GPT-2 (GPT2LMHeadModel) models")
    return model


def read_meta(path: str | Path) -> dict:
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def new_gpt2(cfg: TeacherConfig, vocab_size: int) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of the teacher's from-scratch shape."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=50256, eos_token_id=50256)
    return GPT2LMHeadModel(config)


def check_vocab(tokenizer, model, what: str = "model") -> None:
    """Refuse a tokenizer whose vocabulary does not match the model's embedding table."""
    n_tok, n_model = len(tokenizer), model.config.vocab_size
    if n_tok != n_model:
        raise ModelError(f"tokenizer has {n_tok:,} tokens but the {what} has a vocabulary of {n_model:,}; "
                         "they must be the same GPT-2 vocabulary")


def check_same_vocab(teacher, student, teacher_tok=None, student_tok=None) -> None:
    """Teacher and student must share the vocabulary for the KL over their distributions to mean anything."""
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ModelError(f"teacher vocabulary ({teacher.config.vocab_size:,}) differs from the student's "
                         f"({student.config.vocab_size:,}); KL distillation needs the same vocabulary")
    if teacher_tok is not None and student_tok is not None and teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ModelError("teacher and student tokenizers differ; KL distillation needs the same tokenizer")


def spread_layers(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spread teacher blocks, first and last included: 12 → 6 gives DistilGPT2's 0,2,4,7,9,11."""
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def build_student(teacher: GPT2LMHeadModel, n_layer: int = 0, init: str = "teacher", layers: list[int] | None = None,
                  base: GPT2LMHeadModel | None = None) -> tuple[GPT2LMHeadModel, dict]:
    """A student of the teacher's width, vocabulary and context with ``n_layer`` blocks.

    ``init="teacher"`` copies token/position embeddings, the final norm and the chosen teacher
    blocks (the LM head is tied to the embeddings); ``"base"`` loads ``base`` (the GPT-2 the
    teacher was fine-tuned from) when given, else falls back to random; ``"random"`` is a fresh
    init. Returns the model and a description of the init for the report.
    """
    n_teacher = teacher.config.n_layer
    n_layer = n_layer or n_teacher
    config = copy.deepcopy(teacher.config)
    config.n_layer = n_layer
    student = GPT2LMHeadModel(config)
    info: dict = {"init": init, "n_layer": n_layer}
    if init == "teacher":
        layers = list(layers) if layers else spread_layers(n_teacher, n_layer)
        if len(layers) != n_layer or any(not 0 <= i < n_teacher for i in layers):
            raise ModelError(f"student.layers {layers}: need {n_layer} indices in [0, {n_teacher - 1}]")
        student.transformer.wte.load_state_dict(teacher.transformer.wte.state_dict())
        student.transformer.wpe.load_state_dict(teacher.transformer.wpe.state_dict())
        student.transformer.ln_f.load_state_dict(teacher.transformer.ln_f.state_dict())
        for dst, src in enumerate(layers):
            student.transformer.h[dst].load_state_dict(teacher.transformer.h[src].state_dict())
        student.tie_weights()
        info["layers"] = layers
    elif init == "base":
        if base is None:
            info.update(init="random", note="the teacher was trained from scratch: no base checkpoint, random init")
        else:
            if base.config.n_layer != n_layer or base.config.n_embd != config.n_embd:
                raise ModelError(f"base checkpoint has {base.config.n_layer} layers × {base.config.n_embd}, "
                                 f"the student needs {n_layer} × {config.n_embd}")
            student.load_state_dict(base.state_dict())
            info["base"] = getattr(base, "name_or_path", "")
    elif init != "random":
        raise ModelError(f"student.init {init!r}: expected teacher, base or random")
    return student, info


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (the tied LM head counted once, as transformers does)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def dir_size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_model(model, tokenizer, out_dir: str | Path, cfg: RunConfig | None = None, meta: dict | None = None,
               card: str | None = None) -> Path:
    """``save_pretrained`` model + tokenizer + resolved config + lineage, atomically (temp dir → rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model = getattr(model, "module", model)
        model.generation_config.pad_token_id = tokenizer.eos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if cfg is not None:
            (tmp / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
        if meta is not None:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        _make_readable(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the model the modes a plain mkdir/write would (umask), so
    another user (a container's non-root user, a server account) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def update_model_files(out_dir: str | Path, meta: dict | None = None, card: str | None = None) -> None:
    """Rewrite the lineage/card of a saved folder in place (each file replaced atomically)."""
    out_dir = Path(out_dir)
    for name, text in ((META_FILE, meta and json.dumps(meta, indent=2, ensure_ascii=False)), ("README.md", card)):
        if text is not None:
            tmp = out_dir / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out_dir / name)
