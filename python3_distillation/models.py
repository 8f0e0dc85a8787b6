"""GPT-2 models: open a model folder, build a student from the teacher's layers, save folders transformers can open.

    python -c "from python3_distillation.models import open_model as o; print(o('python3_distillation/gpt2_teacher').meta)"

``open_model`` is the one way the project opens a model for use: fp32 and int8 folders (int8.py) alike, with
the folder's tokenizer and lineage. Design notes: docs/design/training.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from python3_distillation import int8
from python3_distillation.config import CONFIG_FILE, RunConfig, TeacherConfig
from python3_distillation.errors import ModelError
from python3_distillation.fsio import atomic_dir, atomic_write_text
from python3_distillation.tokenizer import hub_reachable, is_local_tokenizer_dir, load_tokenizer

log = logging.getLogger(__name__)

META_FILE = "distill_meta.json"  # lineage: stage, base checkpoint, copied layers, measured numbers
TRAINING_LOG = "training_log.jsonl"  # the run's metrics, kept with the model so its curve travels with it


class OpenModel(NamedTuple):
    model: GPT2LMHeadModel
    tokenizer: Any
    meta: dict


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").exists()


def read_meta(path: str | Path) -> dict:
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def tokenizer_source(folder: str | Path, default: str = "gpt2") -> str:
    """The tokenizer rule: the one saved in a model folder, else ``default`` (``cfg.tokenizer``: GPT-2's)."""
    path = Path(folder).expanduser()
    return str(path) if is_local_tokenizer_dir(path) else default


def stage_tokenizer(cfg: RunConfig, stage: str | None = None):
    """The tokenizer ``stage`` (default: ``cfg.stage``) trains with, its token shards keyed by it: a
    teacher fine-tuned from a folder uses that folder's; a student the teacher folder's, unless
    ``cfg.tokenizer`` names another than GPT-2's; else ``cfg.tokenizer``."""
    if (stage or cfg.stage) == "teacher":
        spec = tokenizer_source(cfg.teacher.init_from, cfg.tokenizer) if cfg.teacher.init_from else cfg.tokenizer
    else:
        spec = tokenizer_source(cfg.teacher.path, cfg.tokenizer) if cfg.tokenizer == "gpt2" else cfg.tokenizer
    return load_tokenizer(spec)


def open_model(spec: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               tokenizer: str = "gpt2") -> OpenModel:
    """(model in eval mode, its tokenizer, its lineage) from a model folder, or a hub id when the hub is reachable.

    An int8 folder keeps its int8 layers (int8.py) when ``dtype`` is None; a ``dtype`` given for one
    dequantizes it once, into a plain GPT-2 in that dtype. The tokenizer is the folder's own, else
    ``tokenizer`` (``tokenizer_source``); a hub id gets ``tokenizer`` and no lineage.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not is_model_dir(path):
            raise ModelError(f"{path}: not a model folder (no config.json); train one first (`make run`)")
    elif not hub_reachable():
        raise ModelError(f"model {str(spec)!r}: no such folder, and the hub is not reachable "
                         "(offline: train the embedded teacher with `make run`)")
    if path.exists() and int8.is_int8_dir(path):
        try:
            model = int8.load_int8(path)
            if dtype is not None:
                model = int8.dequantize(model, dtype)
        except ValueError as e:
            raise ModelError(str(e)) from None
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else str(spec), dtype=dtype)
        if not isinstance(model, GPT2LMHeadModel):
            raise ModelError(f"{spec}: a {type(model).__name__}, but this tool distils GPT-2 (GPT2LMHeadModel) models")
    if device is not None:
        model = model.to(torch.device(device))
    tok = load_tokenizer(tokenizer_source(path, tokenizer) if path.exists() else tokenizer)
    return OpenModel(model.eval(), tok, read_meta(path) if path.exists() else {})


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's RNG seeded from ``seed`` and put the previous state back afterwards:
    every random initialisation (a from-scratch teacher, a random student, new projections) is then a
    function of the config's ``train.seed`` alone, whatever ran before in the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def new_gpt2(cfg: TeacherConfig, vocab_size: int, seed: int) -> GPT2LMHeadModel:
    """A GPT-2 of the teacher's from-scratch shape, randomly initialised from ``seed``."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=50256, eos_token_id=50256)
    with seeded(seed):
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
                  base: GPT2LMHeadModel | None = None, seed: int = 0, n_embd: int = 0, n_head: int = 0,
                  width_init: str = "truncate", n_inner: int = 0) -> tuple[GPT2LMHeadModel, dict]:
    """A student with the teacher's vocabulary and context, ``n_layer`` blocks, ``n_embd`` wide, with
    ``n_inner`` MLP neurons per block (0: the teacher's, scaled with the width).

    ``init="teacher"`` copies token/position embeddings, the final norm and the chosen teacher blocks
    (the LM head is tied to the embeddings); a narrower student gets them through ``narrow_init`` (a
    narrower MLP alone too, with the identity basis: every other weight copied exactly). ``"base"``
    loads ``base`` (the GPT-2 the teacher was fine-tuned from), random without one; ``"random"`` is a
    fresh init (from ``seed``). Returns the model and a description of the init for the report.
    """
    n_teacher, d_teacher = teacher.config.n_layer, teacher.config.n_embd
    n_layer, n_embd = n_layer or n_teacher, n_embd or d_teacher
    head_size = d_teacher // teacher.config.n_head
    n_head = n_head or (teacher.config.n_head if n_embd == d_teacher else max(1, n_embd // head_size))
    if n_embd > d_teacher:
        raise ModelError(f"student.n_embd={n_embd} is wider than the teacher ({d_teacher})")
    if n_embd % n_head:
        raise ModelError(f"student.n_embd={n_embd} is not divisible by {n_head} heads (set student.n_head)")
    config = copy.deepcopy(teacher.config)
    config.n_layer, config.n_embd, config.n_head = n_layer, n_embd, n_head
    config.n_inner = None if teacher.config.n_inner is None else teacher.config.n_inner * n_embd // d_teacher
    inner_teacher = teacher.config.n_inner or 4 * d_teacher
    if n_inner:
        if n_inner > inner_teacher:
            raise ModelError(f"student.n_inner={n_inner} is wider than the teacher's MLP ({inner_teacher})")
        config.n_inner = n_inner
    with seeded(seed):  # whatever is not copied from the teacher starts from the config's seed
        student = GPT2LMHeadModel(config)
    info: dict = {"init": init, "n_layer": n_layer}
    if n_embd != d_teacher:
        info["n_embd"] = n_embd
    narrower_mlp = bool(n_inner) and n_inner != inner_teacher * n_embd // d_teacher
    if narrower_mlp:
        info["n_inner"] = n_inner
    if init == "teacher":
        layers = list(layers) if layers else spread_layers(n_teacher, n_layer)
        if len(layers) != n_layer or any(not 0 <= i < n_teacher for i in layers):
            raise ModelError(f"student.layers {layers}: need {n_layer} indices in [0, {n_teacher - 1}]")
        if n_embd == d_teacher and not narrower_mlp:
            for name in ("wte", "wpe", "ln_f"):
                getattr(student.transformer, name).load_state_dict(getattr(teacher.transformer, name).state_dict())
            for dst, src in enumerate(layers):
                student.transformer.h[dst].load_state_dict(teacher.transformer.h[src].state_dict())
        elif n_embd == d_teacher:  # the MLP alone is narrower: identity basis, largest neurons kept
            narrow_init(student, teacher, layers, "truncate")
        else:
            narrow_init(student, teacher, layers, width_init)
            info["width_init"] = width_init
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


def residual_basis(teacher: GPT2LMHeadModel, width: int, rule: str = "truncate") -> torch.Tensor:
    """[d_teacher, width] orthonormal columns spanning the student's residual stream inside the teacher's.

    ``pca``: the top principal directions of the teacher's token embedding rows (where the
    embedding, and so the start of every residual stream, has the most variance); ``truncate``: the
    first ``width`` coordinates.
    """
    d = teacher.config.n_embd
    if rule == "truncate":
        return torch.eye(d)[:, :width]
    if rule != "pca":
        raise ModelError(f"student.width_init {rule!r}: expected pca or truncate")
    e = teacher.transformer.wte.weight.detach().double()
    _, _, vh = torch.linalg.svd(e - e.mean(0), full_matrices=False)
    return vh[:width].t().float().contiguous()


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (keeps GPT-2's head/neuron order)."""
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def narrow_init(student: GPT2LMHeadModel, teacher: GPT2LMHeadModel, layers: list[int], rule: str = "truncate") -> None:
    """Start a narrower student from the teacher: every residual-stream weight is projected onto the
    basis P (``residual_basis``), and each block keeps its largest heads and MLP neurons (the algebra:
    docs/design/training.md)."""
    t, s = teacher.transformer, student.transformer
    d_t, d_s = teacher.config.n_embd, student.config.n_embd
    hs = d_t // teacher.config.n_head
    keep_heads, inner_s = student.config.n_head, student.transformer.h[0].mlp.c_fc.weight.shape[1]
    if d_s // keep_heads != hs:
        raise ModelError(f"a narrower student keeps the teacher's head size ({hs}): use student.n_head={d_s // hs}")
    p = residual_basis(teacher, d_s, rule)

    def norm(dst, src):
        dst.weight.copy_((p * p * src.weight[:, None]).sum(0))
        dst.bias.copy_(src.bias @ p)

    s.wte.weight.copy_(t.wte.weight @ p)
    s.wpe.weight.copy_(t.wpe.weight @ p)
    norm(s.ln_f, t.ln_f)
    for dst_i, src_i in enumerate(layers):
        a, b = t.h[src_i], s.h[dst_i]
        norm(b.ln_1, a.ln_1)
        norm(b.ln_2, a.ln_2)
        w_qkv, b_qkv, w_o = a.attn.c_attn.weight, a.attn.c_attn.bias, a.attn.c_proj.weight  # Conv1D: [in, out]
        per_head = torch.stack([
            sum(w_qkv[:, j * d_t + h * hs:j * d_t + (h + 1) * hs].norm() ** 2 for j in range(3))
            + w_o[h * hs:(h + 1) * hs].norm() ** 2 for h in range(teacher.config.n_head)])
        heads = _top(per_head, keep_heads)
        cols = torch.cat([torch.arange(h * hs, (h + 1) * hs) for h in heads.tolist()])
        qkv_cols = torch.cat([cols + j * d_t for j in range(3)])
        b.attn.c_attn.weight.copy_(p.t() @ w_qkv[:, qkv_cols])
        b.attn.c_attn.bias.copy_(b_qkv[qkv_cols])
        b.attn.c_proj.weight.copy_(w_o[cols] @ p)
        b.attn.c_proj.bias.copy_(a.attn.c_proj.bias @ p)
        w_fc, w_pr = a.mlp.c_fc.weight, a.mlp.c_proj.weight
        neurons = _top(w_fc.norm(dim=0) * w_pr.norm(dim=1), inner_s)
        b.mlp.c_fc.weight.copy_(p.t() @ w_fc[:, neurons])
        b.mlp.c_fc.bias.copy_(a.mlp.c_fc.bias[neurons])
        b.mlp.c_proj.weight.copy_(w_pr[neurons] @ p)
        b.mlp.c_proj.bias.copy_(a.mlp.c_proj.bias @ p)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (the tied LM head counted once, as transformers does)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def write_config(folder: str | Path, config: dict) -> None:
    """``config.json`` plus ``n_ctx``, which llama.cpp's converter needs and transformers 5 no longer writes (why:
    docs/design/training.md)."""
    config = dict(config)
    if "n_positions" in config:
        config.setdefault("n_ctx", config["n_positions"])
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model(model, tokenizer, out_dir: str | Path, cfg: RunConfig | None = None, meta: dict | None = None,
               card: str | None = None, training_log: str | None = None, copy_from: str | Path | None = None) -> Path:
    """``save_pretrained`` model + tokenizer + resolved config + lineage (+ the training log), atomically.

    An int8 model (int8.py) is written in int8.py's format. ``copy_from``: a folder whose saved config
    and training log come along (an int8 copy keeps its source's).
    """
    out_dir = Path(out_dir)
    model = getattr(model, "module", model)
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    with atomic_dir(out_dir, "the model", need) as tmp:
        model.generation_config.pad_token_id = tokenizer.eos_token_id
        if any(isinstance(m, int8.Int8Linear) for m in model.modules()):
            int8.save_int8_weights(model, tmp)
            write_config(tmp, int8.int8_config(model, head=isinstance(model.transformer.wte, int8.Int8Embedding)))
            model.generation_config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            write_config(tmp, json.loads((tmp / "config.json").read_text()))
        tokenizer.save_pretrained(tmp)
        for name in (CONFIG_FILE, TRAINING_LOG) if copy_from else ():
            if (Path(copy_from) / name).exists():
                shutil.copy2(Path(copy_from) / name, tmp / name)
        texts = {CONFIG_FILE: None if cfg is None else cfg.to_yaml((meta or {}).get("precision")),
                 META_FILE: None if meta is None else json.dumps(meta, indent=2, ensure_ascii=False),
                 "README.md": card, TRAINING_LOG: training_log or None}
        for name, text in texts.items():
            if text is not None:  # None: not given (the copied config and training log stay)
                (tmp / name).write_text(text, encoding="utf-8")
    return out_dir


def update_model_files(out_dir: str | Path, meta: dict | None = None, card: str | None = None) -> None:
    """Rewrite the lineage/card of a saved folder in place (each file replaced atomically)."""
    out_dir = Path(out_dir)
    if meta is not None:
        atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False))
    if card is not None:
        atomic_write_text(out_dir / "README.md", card)
