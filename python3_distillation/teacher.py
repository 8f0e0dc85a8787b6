"""Teacher stage: fine-tune a GPT-2 checkpoint, or train one from scratch on the embedded corpus.

    python -m python3_distillation teacher                          # embedded default (no hub)
    python -m python3_distillation teacher teacher.init_from=gpt2   # fine-tune GPT-2 (hub or folder)
"""

from __future__ import annotations

import math
from pathlib import Path

from python3_distillation.config import ConfigError, RunConfig
from python3_distillation.data import load_blocks
from python3_distillation.evaluation.cards import model_card
from python3_distillation.lineage import data_fingerprint, process_seconds, weights_sha256
from python3_distillation.models import check_vocab, count_parameters, new_gpt2, open_model, save_model, stage_tokenizer
from python3_distillation.train import training_log_text, lm_loss_fn, train


def check_block_size(cfg: RunConfig, n_positions: int, what: str) -> None:
    if cfg.data.block_size > n_positions:
        raise ConfigError(f"data.block_size={cfg.data.block_size} is larger than the {what}'s context "
                          f"(n_positions={n_positions})")


def trained_meta(model, result, cfg: RunConfig, **stage) -> dict:
    """The lineage every trained model records (distill_meta.json): ``stage``'s fields, shape, run, weights hash."""
    return {**stage, "n_params": count_parameters(model), "n_layer": model.config.n_layer,
            "n_embd": model.config.n_embd, "val_loss": result.val_loss, "val_ppl": result.val_ppl,
            "train_steps": result.step, "train_tokens": result.tokens, "train_seconds": round(result.seconds, 1),
            "stage_seconds": process_seconds(), "data": cfg.data.train, "seed": cfg.train.seed,
            "precision": result.precision, "fingerprint": result.fingerprint, "weights_sha256": weights_sha256(model)}


def run_teacher(cfg: RunConfig, resume: bool = False, **train_kwargs) -> Path:
    """Train the teacher and save it to ``cfg.teacher.path``; returns that folder."""
    tc = cfg.teacher
    inputs: dict = {}
    if tc.init_from:
        model, tokenizer, _ = open_model(tc.init_from, tokenizer=cfg.tokenizer)
        inputs["init_from"] = weights_sha256(model)
    else:
        tokenizer = stage_tokenizer(cfg)
        model = new_gpt2(tc, vocab_size=len(tokenizer), seed=cfg.train.seed)
    check_vocab(tokenizer, model, "teacher")
    check_block_size(cfg, model.config.n_positions, "teacher")
    blocks = load_blocks(cfg.data, tokenizer, seed=cfg.train.seed)  # data errors surface before any writing
    inputs["data"] = data_fingerprint(blocks)

    model, result = train(model, lm_loss_fn, blocks, cfg, resume=resume, inputs=inputs, **train_kwargs)
    if not result.main:  # another process of a multi-process launch: the main one saves the model
        return Path(tc.path)
    meta = trained_meta(model, result, cfg, stage="teacher", base_checkpoint=tc.init_from or None,
                        init=f"fine-tuned from {tc.init_from}" if tc.init_from else "trained from scratch")
    out = save_model(model, tokenizer, tc.path, cfg, meta, model_card("teacher", meta, cfg),
                     training_log_text(cfg.run_dir))
    ppl = f"{result.val_ppl:.2f}" if result.val_ppl is not None and math.isfinite(result.val_ppl) else "n/a"
    print(f"teacher saved to {out}: {meta['n_params'] / 1e6:.1f}M parameters, validation perplexity {ppl}")
    return out
