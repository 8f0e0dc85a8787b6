"""Distillation stage: a student learns the teacher's soft targets (KL×T²) plus the labels (CE).

    python -m python3_distillation distill --config v2     # 6-layer student → gpt2_student_v2/
    python -m python3_distillation distill --config v1     # 12-layer student → gpt2_student/

loss = alpha_kd · T² · D(teacher_T, student_T) + alpha_ce · CE(labels) [+ alpha_cos · (1 − cos)], D as
``distill.loss`` (losses.kd_loss), optionally on the student's own samples (``OnPolicySampler``) or from
a teacher cache (teacher_cache.py). Explained in README.md, "Training", "Experiments: pruning,
teacher-generated data, the loss family" and "Cached teacher logits (offline KD)".
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from python3_distillation.config import ConfigError, DistillConfig, RunConfig
from python3_distillation.data import load_blocks
from python3_distillation.evaluation.cards import model_card
from python3_distillation.generation import Generator, RowInput, SamplingParams, complete_rows
from python3_distillation.lineage import data_fingerprint, weights_sha256
from python3_distillation.losses import hidden_cosine_loss, kd_loss, lm_loss
from python3_distillation.models import (ModelError, build_student, check_same_vocab, check_vocab, open_model,
                                         save_model, stage_tokenizer)
from python3_distillation.paths import display_path
from python3_distillation.teacher import check_block_size, trained_meta
from python3_distillation.teacher_cache import TeacherCache
from python3_distillation.train import training_log_text, train

log = logging.getLogger(__name__)


def loss_name(dc: DistillConfig) -> str:
    """The kd term in words, for the model's lineage and the report: ``jsd(beta=0.5), on-policy 0.5``."""
    name = f"jsd(beta={dc.jsd_beta:g})" if dc.loss == "jsd" else dc.loss
    return name + (f", on-policy {dc.on_policy_fraction:g}" if dc.on_policy_fraction else "")


def _batch_digest(ids: torch.Tensor, seed: int, *salt: int) -> bytes:
    h = hashlib.sha256(f"{seed}|{tuple(ids.shape)}|{salt}|".encode())
    h.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.digest()


class OnPolicySampler:
    """On-policy batches for distillation: the student continues prompts cut from the real batch.

    Which batches, and each row's sampling seed, hash the batch's tokens with ``train.seed`` (a pure
    function of the step: a resumed run repeats them with no sampler state saved). The ``Generator``
    (per-row seeded, EOS ignored so rows keep the block's length) runs on the student being trained,
    in eval mode; its ``hf`` backend uses the model's own modules, so no weight copy goes stale.
    """

    def __init__(self, tokenizer, dc: DistillConfig, seed: int):
        if tokenizer is None:
            raise ValueError("on-policy distillation samples text: pass the tokenizer")
        self.tokenizer, self.fraction, self.seed = tokenizer, dc.on_policy_fraction, seed
        self.prompt, self.temperature = dc.on_policy_prompt, dc.on_policy_temperature
        self._generator = None

    def chosen(self, ids: torch.Tensor) -> bool:
        """Whether this batch goes on-policy: a uniform number from the seeded batch hash below λ."""
        return self.fraction >= 1.0 or int.from_bytes(_batch_digest(ids, self.seed)[:8], "big") / 2**64 < self.fraction

    def prompt_length(self, block: int) -> int:
        p = self.prompt or block // 2
        if not 1 <= p < block:
            raise ConfigError(f"distill.on_policy_prompt={self.prompt} leaves nothing to sample in blocks of {block} tokens")
        return p

    def row_seeds(self, ids: torch.Tensor) -> list[int]:
        return [int.from_bytes(_batch_digest(ids, self.seed, row)[:8], "big") for row in range(ids.shape[0])]

    def sample(self, model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, kd mask, labels): each row's first p tokens, then the student's continuation.

        The kd mask keeps the positions that predict the student's tokens (p−1 onwards); the labels
        keep the real prompt only (−100 elsewhere), so CE never trains on the student's own samples.
        """
        n_rows, block = ids.shape
        p = self.prompt_length(block)
        net = getattr(model, "module", model)  # the model itself under DistributedDataParallel
        was_training = net.training
        if self._generator is None or self._generator.model is not net:
            self._generator = Generator(net, self.tokenizer, backend="hf")
        rows = [RowInput(r, "", ids[r, :p].tolist(),
                         SamplingParams(max_new_tokens=block - p, temperature=self.temperature, seed=s,
                                        ignore_eos=True))
                for r, s in enumerate(self.row_seeds(ids))]
        try:
            net.eval()
            done = complete_rows(self._generator, rows)
        finally:
            net.train(was_training)
        sampled = torch.tensor([done[r].token_ids for r in range(n_rows)], dtype=ids.dtype, device=ids.device)
        new_ids = torch.cat([ids[:, :p], sampled], dim=1)
        kd_mask = torch.zeros_like(new_ids)
        kd_mask[:, p - 1:] = 1
        labels = new_ids.clone()
        labels[:, p:] = -100
        return new_ids, kd_mask, labels


def make_distill_loss(teacher: torch.nn.Module | None, dc: DistillConfig, tokenizer=None, seed: int = 0,
                      cache=None):
    """The batch loss for ``train``: returns (weighted total, each term for the log).

    ``tokenizer`` and ``seed`` (``train.seed``) are needed for on-policy batches only. ``cache`` (a
    ``teacher_cache.TeacherCache``) replaces the live teacher as the source of the kd term: its rows
    are looked up by the batch's ``block_index`` (``teacher`` may then be None).
    """
    if cache is None:
        teacher.eval().requires_grad_(False)
    need_hidden = dc.alpha_cos > 0
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": dc.jsd_beta}[dc.loss]  # kd_loss's beta
    on_policy = OnPolicySampler(tokenizer, dc, seed) if dc.on_policy_fraction > 0 else None

    def loss_fn(model, batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        terms: dict[str, torch.Tensor] = {}
        kd_mask = mask
        if on_policy is not None:
            chosen = on_policy.chosen(ids)
            if chosen:
                ids, kd_mask, labels = on_policy.sample(model, ids)
            terms["on_policy"] = torch.tensor(float(chosen))  # logged: the share of on-policy batches
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden)
        total = out.logits.new_zeros((), dtype=torch.float32)
        if (dc.alpha_kd > 0 and cache is None) or need_hidden:
            with torch.no_grad():
                t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden)
        if dc.alpha_kd > 0:
            if cache is not None:  # config.py allows a cache with forward KL and off-policy batches only
                terms["kd"] = cache.kd_loss(out.logits, batch["block_index"], kd_mask, dc.kd_chunk_rows or None)
            else:
                terms["kd"] = kd_loss(out.logits, t_out.logits, kd_mask, dc.temperature, dc.kd_chunk_rows or None,
                                      beta=beta)
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


def load_pruned_student(cfg: RunConfig) -> tuple[torch.nn.Module, dict]:
    """``student.init=pruned``: the model in ``student.from_dir``, whose shape is its own; a shape
    field set to something else is an error rather than silently ignored."""
    sc = cfg.student
    student, _, meta = open_model(sc.from_dir)
    c = student.config
    shape = {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "n_inner": c.n_inner or 4 * c.n_embd}
    for key, have in shape.items():
        asked = getattr(sc, key)
        if asked and asked != have:
            raise ConfigError(f"student.{key}={asked}, but the model in student.from_dir ({sc.from_dir}) has "
                              f"{key}={have}: with student.init=pruned the shape is the folder's (set student.{key}=0)")
    if sc.layers:
        raise ConfigError("student.layers picks teacher blocks; with student.init=pruned the blocks are the folder's")
    info = {"init": "pruned", "from": display_path(sc.from_dir), "n_layer": c.n_layer, "n_inner": shape["n_inner"]}
    pruned = meta.get("student_init") or {}
    return student, info | {k: pruned[k] for k in ("layers", "target", "block_params_removed") if k in pruned}


def run_distill(cfg: RunConfig, resume: bool = False, **train_kwargs) -> Path:
    """Build the student from the teacher, distil it, save it to ``cfg.student.output_dir``."""
    sc, dc, teacher_dir = cfg.student, cfg.distill, Path(cfg.teacher.path)
    teacher, teacher_tok, teacher_meta = open_model(teacher_dir, tokenizer=cfg.tokenizer)
    tokenizer = stage_tokenizer(cfg, "distill")
    if not teacher_dir.is_dir():  # a hub teacher is its own base checkpoint
        teacher_meta = {"base_checkpoint": str(teacher_dir)}

    base = None
    inputs = {"teacher": weights_sha256(teacher)}
    if sc.init == "base" and teacher_meta.get("base_checkpoint"):
        base = open_model(teacher_meta["base_checkpoint"]).model
        inputs["base"] = weights_sha256(base)
    if sc.init == "pruned":
        student, init_info = load_pruned_student(cfg)
        inputs["student_init"] = weights_sha256(student)
    else:
        student, init_info = build_student(teacher, sc.n_layer, sc.init, sc.layers, base, seed=cfg.train.seed,
                                           n_embd=sc.n_embd, n_head=sc.n_head, width_init=sc.width_init,
                                           n_inner=sc.n_inner)
    # Checked before step 1: the KL compares distributions over one shared vocabulary.
    check_same_vocab(teacher, student, teacher_tok, tokenizer)
    check_vocab(tokenizer, student, "student")
    check_block_size(cfg, student.config.n_positions, "student")
    if dc.alpha_cos > 0 and student.config.n_embd != teacher.config.n_embd:
        # A learned projection would add weights trained only for the loss and thrown away after;
        # for a narrower student the KL and CE terms carry the signal, so the cosine term is refused.
        raise ModelError(f"distill.alpha_cos compares hidden states of equal width, but the student is "
                         f"{student.config.n_embd} wide and the teacher {teacher.config.n_embd}: set distill.alpha_cos=0")
    blocks = load_blocks(cfg.data, tokenizer, seed=cfg.train.seed)
    inputs["data"] = data_fingerprint(blocks)
    log.info("student: %d layers, init %s", student.config.n_layer, init_info)

    cache = None
    if dc.teacher_cache.strip():
        cache = TeacherCache.open(dc.teacher_cache).check(
            teacher_sha256=inputs["teacher"], data=inputs["data"], n_blocks=len(blocks["train"]),
            temperature=dc.temperature, top_k=dc.cache_top_k)
        inputs["teacher_cache"] = cache.key  # a re-made cache (other k, T, teacher) is another input
        teacher = base = None  # the student is built: from here on the cache stands in for the teacher
    loss_fn = make_distill_loss(teacher, dc, tokenizer, seed=cfg.train.seed, cache=cache)
    if dc.on_policy_fraction > 0:
        OnPolicySampler(tokenizer, dc, cfg.train.seed).prompt_length(cfg.data.block_size)  # fail before step 1
    student, result = train(student, loss_fn, blocks, cfg, resume=resume, inputs=inputs,
                            extra_modules=[teacher] if teacher is not None else [], **train_kwargs)
    if not result.main:  # another process of a multi-process launch: the main one saves the model
        return Path(sc.output_dir)
    meta = trained_meta(student, result, cfg, stage="distill", teacher=display_path(teacher_dir),
                        student_init=init_info, temperature=dc.temperature, alpha_kd=dc.alpha_kd,
                        alpha_ce=dc.alpha_ce, alpha_cos=dc.alpha_cos, loss=loss_name(dc),
                        teacher_val_ppl=teacher_meta.get("val_ppl"), teacher_sha256=inputs["teacher"])
    if cache is not None:  # offline KD: the kd term came from this cache, not from the live teacher
        meta["teacher_cache"] = {"key": cache.key, "top_k": cache.top_k, "temperature": cache.temperature}
    out = save_model(student, tokenizer, sc.output_dir, cfg, meta, model_card(cfg.name, meta, cfg),
                     training_log_text(cfg.run_dir))
    print(f"student saved to {out}: {meta['n_params'] / 1e6:.1f}M parameters, {meta['n_layer']} layers, "
          f"validation perplexity {result.val_ppl:.2f}")
    return out
