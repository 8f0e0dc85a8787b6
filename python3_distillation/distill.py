"""Distillation stage: a student learns the teacher's soft targets (KL×T²) plus the labels (CE).

    python -m python3_distillation distill --config v2     # 6-layer student → gpt2_student_v2/
    python -m python3_distillation distill --config v1     # 12-layer student → gpt2_student/

loss = alpha_kd · T² · KL(teacher_T ‖ student_T) + alpha_ce · CE(labels) [+ alpha_cos · (1 − cos)]
The teacher runs in eval mode under ``no_grad``; the KL is computed in row chunks (losses.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from python3_distillation.evaluation.cards import model_card
from python3_distillation.config import DistillConfig, RunConfig
from python3_distillation.data import load_blocks
from python3_distillation.lineage import data_fingerprint, weights_sha256
from python3_distillation.losses import hidden_cosine_loss, kd_loss, lm_loss
from python3_distillation.models import (ModelError, build_student, check_same_vocab, check_vocab, count_parameters,
                                         load_model, read_meta, save_model)
from python3_distillation.teacher import check_block_size
from python3_distillation.tokenizer import load_tokenizer
from python3_distillation.train import training_log_text, train

log = logging.getLogger(__name__)


def _display_path(path: Path) -> str:
    """Relative to the working directory when inside it, so cards don't carry build-machine paths."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def make_distill_loss(teacher: torch.nn.Module, dc: DistillConfig):
    """The batch loss for ``train``: returns (weighted total, each term for the log)."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    need_hidden = dc.alpha_cos > 0

    def loss_fn(model, batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden)
        terms: dict[str, torch.Tensor] = {}
        total = out.logits.new_zeros((), dtype=torch.float32)
        if dc.alpha_kd > 0 or need_hidden:
            with torch.no_grad():
                t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden)
        if dc.alpha_kd > 0:
            terms["kd"] = kd_loss(out.logits, t_out.logits, mask, dc.temperature, dc.kd_chunk_rows or None)
            total = total + dc.alpha_kd * terms["kd"]
        if dc.alpha_ce > 0:
            terms["ce"] = lm_loss(out.logits, labels)
            total = total + dc.alpha_ce * terms["ce"]
        else:
            with torch.no_grad():  # logged either way: it is the number the perplexity comes from
                terms["ce"] = lm_loss(out.logits, labels)
        if need_hidden:
            terms["cos"] = hidden_cosine_loss(out.hidden_states[-1], t_out.hidden_states[-1], mask)
            total = total + dc.alpha_cos * terms["cos"]
        return total, {k: v.detach() for k, v in terms.items()}

    return loss_fn


def run_distill(cfg: RunConfig, resume: bool = False, **train_kwargs) -> Path:
    """Build the student from the teacher, distil it, save it to ``cfg.student.output_dir``."""
    teacher_dir = Path(cfg.teacher.path)
    teacher = load_model(teacher_dir)
    teacher_tok = load_tokenizer(teacher_dir) if teacher_dir.is_dir() else load_tokenizer(cfg.tokenizer)
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer != "gpt2" else teacher_tok
    teacher_meta = read_meta(teacher_dir) if teacher_dir.is_dir() else {"base_checkpoint": str(teacher_dir)}

    base = None
    inputs = {"teacher": weights_sha256(teacher)}
    if cfg.student.init == "base" and teacher_meta.get("base_checkpoint"):
        base = load_model(teacher_meta["base_checkpoint"])
        inputs["base"] = weights_sha256(base)
    student, init_info = build_student(teacher, cfg.student.n_layer, cfg.student.init, cfg.student.layers, base,
                                       seed=cfg.train.seed)
    # Checked before step 1: the KL compares distributions over one shared vocabulary.
    check_same_vocab(teacher, student, teacher_tok, tokenizer)
    check_vocab(tokenizer, student, "student")
    check_block_size(cfg, student.config.n_positions, "student")
    if cfg.distill.alpha_cos > 0 and student.config.n_embd != teacher.config.n_embd:
        raise ModelError("distill.alpha_cos needs equal hidden widths for teacher and student")
    blocks = load_blocks(cfg.data, tokenizer, seed=cfg.train.seed)
    inputs["data"] = data_fingerprint(blocks)
    log.info("student: %d layers, init %s", student.config.n_layer, init_info)

    loss_fn = make_distill_loss(teacher, cfg.distill)
    student, result = train(student, loss_fn, blocks, cfg, resume=resume, extra_modules=[teacher], inputs=inputs,
                            **train_kwargs)
    meta = {
        "stage": "distill",
        "teacher": _display_path(teacher_dir),
        "student_init": init_info,
        "n_params": count_parameters(student),
        "n_layer": student.config.n_layer,
        "n_embd": student.config.n_embd,
        "temperature": cfg.distill.temperature,
        "alpha_kd": cfg.distill.alpha_kd,
        "alpha_ce": cfg.distill.alpha_ce,
        "alpha_cos": cfg.distill.alpha_cos,
        "val_loss": result.val_loss,
        "val_ppl": result.val_ppl,
        "teacher_val_ppl": teacher_meta.get("val_ppl"),
        "train_steps": result.step,
        "train_tokens": result.tokens,
        "train_seconds": round(result.seconds, 1),
        "data": cfg.data.train,
        "seed": cfg.train.seed,
        "precision": result.precision,
        "teacher_sha256": inputs["teacher"],
        "fingerprint": result.fingerprint,
        "weights_sha256": weights_sha256(student),
    }
    out = save_model(student, tokenizer, cfg.student.output_dir, cfg, meta, model_card(cfg.name, meta, cfg),
                     training_log_text(cfg.run_dir))
    print(f"student saved to {out}: {meta['n_params'] / 1e6:.1f}M parameters, {meta['n_layer']} layers, "
          f"validation perplexity {result.val_ppl:.2f}")
    return out
