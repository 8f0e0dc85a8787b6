"""The distillation targets: student decode speed against the FLOPs ideal, perplexity, training-step throughput.

    HF_HUB_OFFLINE=1 GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/bench_distill.py [--quick]

1. Batch-1 greedy decode, 6-layer student vs 12-layer teacher, through the project's ``Generator``,
   interleaved rounds, median. The ideal speed-up is the ratio of forward FLOPs per token
   (``evaluation.forward_flops_per_token``): the 50k-vocabulary LM head stays in the student, so
   halving the layers is ideally only ~1.5× at width 768 and ~1.3× at width 256. Measured for the
   trained teacher/v2 (when present) and for a GPT-2-small-shaped pair (12L d768 → 6L d768, random).
2. v2 perplexity vs the teacher's and vs the CE-only v2 (from ``reports/report.json`` when it is
   newer than the models, else measured here on the same validation blocks).
3. Distillation throughput: the training step exactly as ``train()`` runs it (accelerate with bf16
   autocast, ``make_distill_loss`` with the chunked ``kd_loss``, fused AdamW, grad clipping) against
   a naive step (fp32, ``F.kl_div`` over the full vocabulary + CE, default ``torch.optim.AdamW``),
   teacher 12L d256 → student 6L d256, batch 8 × 128, alternating steps, median; with a per-phase
   breakdown of both.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere without installing the package
    sys.path.insert(0, str(REPO))

from python3_distillation.evaluation import measure as ev  # noqa: E402
from python3_distillation.evaluation.report import measure_side_by_side  # noqa: E402
from python3_distillation.models import is_model_dir  # noqa: E402
from python3_distillation.paths import model_dir  # noqa: E402

PROMPT = "It is a truth universally acknowledged, that a single man"
DECODE_RATIO_OF_IDEAL = 0.90  # measured speed-up / FLOPs-ideal speed-up
GPT2_SMALL_SPEEDUP = 1.45  # 12L d768 → 6L d768 (ideal ≈ 1.52×)
PPL_X_TEACHER = 1.25
THROUGHPUT_SPEEDUP = 1.5


def _row(metric: str, value: float | None, unit: str, note: str = "", target: str | None = None,
         met: bool | None = None) -> dict:
    return {"metric": metric, "value": None if value is None else round(float(value), 4), "unit": unit,
            "target": target, "met": met, "note": note}


# ------------------------------------------------------------------------------------------ decode

def decode_pair(teacher_gen, student_gen, new_tokens: int, rounds: int, label: str) -> list[dict]:
    """Batch-1 greedy tokens/s of both (interleaved), the measured and the FLOPs-ideal speed-up."""
    speed = ev.decode_speed({"teacher": teacher_gen, "student": student_gen}, [PROMPT], new_tokens, rounds)
    ctx = len(teacher_gen.tokenizer.encode(PROMPT)) + new_tokens / 2  # mean context over the decode
    ideal = ev.model_flops_per_token(teacher_gen.model.config, ctx) / ev.model_flops_per_token(student_gen.model.config, ctx)
    measured = speed["student"] / speed["teacher"]
    t_cfg, s_cfg = teacher_gen.model.config, student_gen.model.config
    shape = f"{t_cfg.n_layer}L→{s_cfg.n_layer}L d{t_cfg.n_embd}"
    how = f"batch 1, greedy, {new_tokens} new tokens, median of {rounds} interleaved rounds"
    rows = [
        _row(f"{label}: teacher decode", speed["teacher"], "tok/s", f"{shape}; {how}"),
        _row(f"{label}: student decode", speed["student"], "tok/s", how),
        _row(f"{label}: ideal speed-up (FLOPs/token)", ideal, "×",
             f"2·(non-embedding params + n_embd·vocab) + 2·n_layer·ctx·n_embd at mean ctx {ctx:.0f}"),
        _row(f"{label}: measured speed-up", measured, "×", "student tok/s ÷ teacher tok/s",
             *((f">= {GPT2_SMALL_SPEEDUP}", measured >= GPT2_SMALL_SPEEDUP) if t_cfg.n_embd == 768
               and t_cfg.n_layer == 12 and s_cfg.n_layer == 6 else (None, None))),
        _row(f"{label}: measured / ideal", measured / ideal, "", "share of the FLOPs-ideal speed-up reached",
             f">= {DECODE_RATIO_OF_IDEAL:.0%}", measured / ideal >= DECODE_RATIO_OF_IDEAL),
    ]
    return rows


def decode_rows(quick: bool) -> list[dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from python3_distillation.generation import Generator
    from python3_distillation.models import build_student
    from python3_distillation.device_plan import pick_device
    from python3_distillation.tokenizer import load_tokenizer

    new_tokens, rounds = (8, 2) if quick else (64, 5)
    rows = []
    if is_model_dir(model_dir("teacher")) and is_model_dir(model_dir("v2")):
        rows += decode_pair(Generator.from_pretrained(model_dir("teacher")), Generator.from_pretrained(model_dir("v2")),
                            new_tokens, rounds, "trained teacher → v2")
    else:
        rows.append(_row("trained teacher → v2: measured / ideal", None, "",
                         "not measured: no trained teacher/v2 (run `make run`)", f">= {DECODE_RATIO_OF_IDEAL:.0%}"))
    tok = load_tokenizer("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=len(tok),
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    teacher = GPT2LMHeadModel(config).eval()
    student, _ = build_student(teacher, 6, "teacher")
    rows += decode_pair(Generator(teacher, tok, device=pick_device()),
                        Generator(student.eval(), tok, device=next(teacher.parameters()).device),
                        new_tokens, rounds, "GPT-2-small shape (random)")
    return rows


# -------------------------------------------------------------------------------------- perplexity

def _fresh_report(names: list[str]) -> dict | None:
    """``reports/report.json`` when it covers ``names`` and is newer than every one of their weights."""
    f = REPO / "reports" / "report.json"
    if not f.exists():
        return None
    newest = max(p.stat().st_mtime for n in names for p in model_dir(n).glob("*.safetensors"))
    if f.stat().st_mtime <= newest:
        return None
    report = json.loads(f.read_text())
    return report if all(n in report.get("models", {}) for n in names) else None


def perplexity_rows(quick: bool) -> list[dict]:
    from python3_distillation.models import read_meta

    if not (is_model_dir(model_dir("teacher")) and is_model_dir(model_dir("v2"))):
        return [_row("v2 ppl ÷ teacher ppl", None, "×", "not measured: no trained teacher/v2 (run `make run`)",
                     f"<= {PPL_X_TEACHER}"),
                _row("KD v2 ppl ÷ CE-only v2 ppl", None, "×", "not measured: no trained models", "< 1")]
    names = ["teacher", "v2"] + (["v2_ce"] if is_model_dir(model_dir("v2_ce")) else [])
    report = _fresh_report(names)
    if report is not None:
        ppl = {n: report["models"][n]["val_ppl"] for n in names}
        source = f"reports/report.json ({report['settings']['eval_blocks']} validation blocks)"
    else:
        max_blocks = 32 if quick else None
        ppl = {n: q["ppl"] for n, q in measure_side_by_side([(n, model_dir(n)) for n in names], max_blocks)[3].items()}
        source = "measured here" + (" (quick: 32 validation blocks)" if quick else " (the teacher's data.max_eval_blocks)")
    r = ppl["v2"] / ppl["teacher"]
    rows = [_row("v2 ppl ÷ teacher ppl", r, "×", f"v2 {ppl['v2']:.2f}, teacher {ppl['teacher']:.2f}; {source}",
                 f"<= {PPL_X_TEACHER}", r <= PPL_X_TEACHER)]
    if "v2_ce" in ppl:
        k = ppl["v2"] / ppl["v2_ce"]
        s_kd, s_ce = read_meta(model_dir("v2")).get("train_steps"), read_meta(model_dir("v2_ce")).get("train_steps")
        steps = f"equal steps ({s_kd})" if s_kd == s_ce else f"UNEQUAL steps (KD {s_kd}, CE {s_ce})"
        rows.append(_row("KD v2 ppl ÷ CE-only v2 ppl", k, "×", f"KD {ppl['v2']:.2f}, CE-only {ppl['v2_ce']:.2f}; {steps}",
                         "< 1", k < 1 and s_kd == s_ce))
    else:
        rows.append(_row("KD v2 ppl ÷ CE-only v2 ppl", None, "×", "no CE-only v2 (make distill-v2-ce)", "< 1"))
    return rows


# --------------------------------------------------------------------------------------- throughput

class _Phases:
    """Forward times of the student and the teacher inside a step, from module hooks."""

    def __init__(self, student, teacher):
        self.t: dict[str, float] = {}
        self.handles = []
        for name, m in (("student fwd", student), ("teacher fwd", teacher)):
            self.handles.append(m.register_forward_pre_hook(lambda *_, n=name: self._start(n)))
            self.handles.append(m.register_forward_hook(lambda *_, n=name: self._stop(n)))

    def _start(self, name):
        ev.sync()
        self.t[name] = -time.perf_counter()

    def _stop(self, name):
        ev.sync()
        self.t[name] += time.perf_counter()

    def remove(self):
        for h in self.handles:
            h.remove()


def _clock() -> float:
    ev.sync()
    return time.perf_counter()


def throughput_rows(quick: bool) -> list[dict]:
    from accelerate import Accelerator

    from python3_distillation.config import TeacherConfig, load_config
    from python3_distillation.distill import make_distill_loss
    from python3_distillation.models import build_student, new_gpt2, open_model
    from python3_distillation.device_plan import decide, pick_device
    from python3_distillation.train import make_optimizer

    cfg = load_config(["v2"])
    tc, dc = cfg.train, cfg.distill
    trained = is_model_dir(model_dir("teacher"))
    teacher = open_model(model_dir("teacher")).model if trained else new_gpt2(TeacherConfig(), 50257, seed=0)
    teacher.eval()
    torch.manual_seed(0)
    student0, _ = build_student(teacher, cfg.student.n_layer, "teacher")
    batch_size, seq, rounds = (2, 64, 2) if quick else (tc.batch_size, cfg.data.block_size, 5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, teacher.config.vocab_size, (batch_size, seq), generator=g)
    temp = dc.temperature

    # Ours: train()'s step, line for line (accelerate, autocast as `auto` decides here, backward, clip,
    # fused AdamW). On a CPU without native bf16, auto is fp32 and both sides run in fp32.
    precision = decide(tc.mixed_precision, pick_device(cpu=tc.cpu))
    acc = Accelerator(mixed_precision=precision.mode, gradient_accumulation_steps=tc.grad_accum, cpu=tc.cpu)
    ours_student = copy.deepcopy(student0).train()
    ours_model, ours_opt = acc.prepare(ours_student, make_optimizer(ours_student, tc))
    teacher.to(acc.device)
    loss_fn = make_distill_loss(teacher, dc)
    batch = {"input_ids": ids.to(acc.device), "attention_mask": torch.ones_like(ids).to(acc.device),
             "labels": ids.to(acc.device)}
    phases: dict[str, list[dict]] = {"ours": [], "naive": []}

    def ours_step():
        hooks = _Phases(ours_model, teacher)
        t0 = _clock()
        with acc.accumulate(ours_model), acc.autocast():
            loss, _ = loss_fn(ours_model, batch)
            t1 = _clock()
            acc.backward(loss)
            t2 = _clock()
            if acc.sync_gradients and tc.grad_clip > 0:
                acc.clip_grad_norm_(ours_model.parameters(), tc.grad_clip)
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)
        t3 = _clock()
        hooks.remove()
        phases["ours"].append(_split(hooks.t, t0, t1, t2, t3))

    # Naive: fp32, the KL as an autograd graph over the full vocabulary, default AdamW.
    naive_model = copy.deepcopy(student0).train().to(acc.device)
    naive_opt = torch.optim.AdamW(naive_model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  weight_decay=tc.weight_decay)
    ids_d = batch["input_ids"]

    def naive_step():
        hooks = _Phases(naive_model, teacher)
        t0 = _clock()
        s = naive_model(input_ids=ids_d).logits
        with torch.no_grad():
            t = teacher(input_ids=ids_d).logits
        v = s.shape[-1]
        kl = F.kl_div(F.log_softmax(s.reshape(-1, v) / temp, -1), F.softmax(t.reshape(-1, v) / temp, -1),
                      reduction="batchmean") * temp**2
        ce = F.cross_entropy(s[:, :-1].reshape(-1, v), ids_d[:, 1:].reshape(-1))
        loss = dc.alpha_kd * kl + dc.alpha_ce * ce
        t1 = _clock()
        loss.backward()
        t2 = _clock()
        torch.nn.utils.clip_grad_norm_(naive_model.parameters(), tc.grad_clip)
        naive_opt.step()
        naive_opt.zero_grad(set_to_none=True)
        t3 = _clock()
        hooks.remove()
        phases["naive"].append(_split(hooks.t, t0, t1, t2, t3))

    times = ev.interleaved({"naive": naive_step, "ours": ours_step}, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = batch_size * seq
    speedup = med["naive"] / med["ours"]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    setup = (f"{'trained' if trained else 'random'} teacher {teacher.config.n_layer}L d{teacher.config.n_embd} → "
             f"{student0.config.n_layer}L, batch {batch_size}×{seq}, median of {rounds} alternating steps, "
             f"GLIBC_TUNABLES={tunables or 'unset (make bench sets it)'}")
    breakdown = {k: {p: statistics.median(d[p] for d in v[1:]) for p in v[0]} for k, v in phases.items()}
    total = sum(breakdown["ours"].values())
    shares = ", ".join(f"{p} {v / total:.0%}" for p, v in sorted(breakdown["ours"].items(), key=lambda kv: -kv[1]))
    note = ("ratio of median step times" if speedup >= THROUGHPUT_SPEEDUP else
            f"TARGET NOT MET; where our step's time goes: {shares} (phase rows below, naive beside each)")
    rows = [
        _row("distill step, ours", tokens / med["ours"], "tok/s",
             f"precision {precision.label} ({tc.mixed_precision}: {precision.reason}), accelerate, chunked "
             f"kd_loss, fused AdamW; {setup}"),
        _row("distill step, naive", tokens / med["naive"], "tok/s",
             "precision fp32, F.kl_div over the full vocab + CE, default AdamW"),
        _row("distill throughput ours ÷ naive", speedup, "×", note, f">= {THROUGHPUT_SPEEDUP}", speedup >= THROUGHPUT_SPEEDUP),
    ]
    for p in breakdown["ours"]:
        rows.append(_row(f"phase: {p} (ours)", breakdown["ours"][p] * 1e3, "ms",
                         f"naive {breakdown['naive'][p] * 1e3:.0f} ms"))
    return rows


def _split(fwd: dict[str, float], t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    """Phases of one step: student forward, teacher forward, loss terms, backward, clip + optimizer."""
    s, t = fwd.get("student fwd", 0.0), fwd.get("teacher fwd", 0.0)
    return {"student fwd": s, "teacher fwd": t, "loss terms": max(0.0, t1 - t0 - s - t), "backward": t2 - t1,
            "clip + optimizer": t3 - t2}


# ------------------------------------------------------------------------------------------- run

def run(quick: bool = False) -> dict:
    rows = decode_rows(quick) + perplexity_rows(quick) + throughput_rows(quick)
    return {"section": "Distillation (students vs teacher)", "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 new tokens, 2 rounds, a 2×64 training batch")
    args = ap.parse_args(argv)
    print(json.dumps(run(quick=args.quick), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
