"""The report: every model built (teacher, students, compressed variants) measured side by side, in one run.

    python -m python3_distillation report                       # → reports/report.md, .json, two PNGs
    python -m python3_distillation report --quick               # fewer blocks, tokens and rounds
    python -m python3_distillation report --models teacher,v2,my/folder,alt=other/folder

Results: README.md, "Results on the embedded default"; what is measured, the lineage check: docs/design/evaluation.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from python3_distillation.config import ConfigError, DataConfig, RunConfig, saved_config
from python3_distillation.data import Blocks, load_blocks
from python3_distillation.device_plan import pick_device
from python3_distillation.evaluation import measure
from python3_distillation.evaluation.cards import fmt, markdown_table, model_card
from python3_distillation.evaluation.plots import plot_tradeoffs, plot_training_curves
from python3_distillation.fsio import atomic_write_text
from python3_distillation.generation import Generator
from python3_distillation.lineage import process_seconds, weights_sha256
from python3_distillation.models import (TRAINING_LOG, ModelError, count_parameters, is_model_dir, open_model,
                                         update_model_files)
from python3_distillation.paths import MODEL_DIRS, display_path, model_dir

DEFAULT_MODELS = "teacher,v1,v2,v2_ce,v2_narrow,v1_int8,v2_int8,v2_narrow_int8"
REQUIRED = ("teacher", "v2")  # without these the report has nothing to compare
HOW_TO_BUILD = {"v1": "train it with `make distill-v1`",
                "v2_ce": "train it with `make distill-v2-ce`; without it the KD-vs-CE comparison is not made",
                "v2_narrow": "train it with `make distill-v2-narrow`"}


@dataclass
class Entry:
    """One model of the report: its label, folder, model, tokenizer, lineage and training config."""

    label: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    meta: dict
    cfg: RunConfig | None


def resolve_models(spec: str) -> tuple[list[tuple[str, Path]], list[str]]:
    """``"teacher,v1,v2,v2_ce"`` / folders / ``label=folder`` → [(label, folder)] present, and notes.

    A bare folder is labelled with its config's ``name`` (configs/v2.yaml → ``v2``). A missing teacher
    or v2 is an error; a missing v1 / v2_ce / other named model is skipped."""
    found, notes = [], []
    for item in filter(None, map(str.strip, spec.split(","))):
        if "=" in item:
            label, folder = (s.strip() for s in item.split("=", 1))
            path = Path(folder).expanduser()
        elif item in MODEL_DIRS:
            label, path = item, model_dir(item)
        else:
            path = Path(item).expanduser()
            cfg = saved_config(path) if path.is_dir() else None
            label = cfg.name if cfg else path.name
        if not is_model_dir(path):
            if label in REQUIRED:
                raise ModelError(f"{label} model not found at {path}; train it first with `make run`")
            if label not in MODEL_DIRS:
                raise ModelError(f"{path}: not a model folder (no config.json)")
            source = model_dir(label.removesuffix("_int8"))
            if not label.endswith("_int8"):
                what = HOW_TO_BUILD.get(label)
                notes.append(f"{label} skipped: no model at {display_path(path)}" + (f" ({what})" if what else ""))
            elif is_model_dir(source):
                notes.append(f"{label} skipped: no model at {display_path(path)} (make it with `gpt2-distill quantize "
                             f"{display_path(source)}`)")
            continue
        if label in (f[0] for f in found):
            raise ConfigError(f"--models: label {label!r} given twice; use label=folder to tell them apart")
        found.append((label, path))
    if not found:
        raise ConfigError("--models: no model to report on")
    return found, notes


def load_entry(label: str, path: Path) -> Entry:
    return Entry(label, Path(path), *open_model(path), saved_config(path))


def check_lineage(entries: list[Entry]) -> list[str]:
    """Refuse a student beside a teacher it was not distilled from; notes for what cannot be checked."""
    notes = []
    by_path = {e.path.resolve(): e for e in entries}
    # An int8 copy must be of the model now in its source folder.
    for e in (q for q in entries if q.meta.get("stage") == "quantize"):
        source = by_path.get(Path(e.meta.get("source", "")).resolve())
        if source is not None and weights_sha256(source.model) != e.meta.get("source_sha256"):
            raise ModelError(f"{e.label} ({e.path}) is an int8 copy of an earlier {source.label}: {source.path} has "
                             f"changed since; quantize it again (`gpt2-distill quantize {display_path(source.path)}`)")
    teacher = next((e for e in entries if e.label == "teacher"), None)
    if teacher is None:
        return notes
    actual = weights_sha256(teacher.model)
    for e in entries:
        if e is teacher or e.meta.get("stage") in ("teacher", "quantize"):
            continue
        recorded = e.meta.get("teacher_sha256")
        if recorded is None:
            notes.append(f"{e.label}: its folder does not record which teacher it came from (lineage not checked)")
        elif recorded != actual:
            raise ModelError(
                f"{e.label} ({e.path}) was distilled from a teacher whose weights hash is {recorded[:12]}…, but the "
                f"teacher at {teacher.path} hashes to {actual[:12]}… (retrained since?); distil {e.label} again "
                f"(e.g. `make run`) or leave it out with --models")
    return notes


def held_out(entries: list[Entry], max_blocks: int | None = None, quick: bool = False) -> tuple[DataConfig, Blocks]:
    """The data config and first ``max_blocks`` validation blocks (0 = all; default ``max_eval_blocks``, at
    most 32 when ``quick``) every model is measured on, read as training reads them with the teacher's
    config and seed (else the first model's, else the defaults; the seed picks a seeded hold-out)."""
    teacher_first = sorted(entries, key=lambda e: e.label != "teacher")
    ref, vocab = teacher_first[0], teacher_first[0].model.config.vocab_size
    cfg = next((e.cfg for e in teacher_first if e.cfg is not None), RunConfig())
    for e in entries:
        if e.model.config.vocab_size != vocab:
            raise ModelError(f"{e.label} has a vocabulary of {e.model.config.vocab_size:,}, {ref.label} of {vocab:,}: "
                             "perplexities over different vocabularies do not compare")
        if cfg.data.block_size > e.model.config.n_positions:
            raise ConfigError(f"validation blocks of {cfg.data.block_size} tokens do not fit {e.label}'s context "
                              f"of {e.model.config.n_positions}")
    if max_blocks is None:
        max_blocks = min(cfg.data.max_eval_blocks or 32, 32) if quick else cfg.data.max_eval_blocks
    val = load_blocks(cfg.data, ref.tokenizer, seed=cfg.train.seed)["validation"]
    return cfg.data, Blocks(val.ids[:max_blocks or len(val)])


def measure_side_by_side(pairs: list[tuple[str, Path]], max_blocks: int | None = None, quick: bool = False,
                         device: torch.device | None = None, progress: str | None = None):
    """Load ``pairs``, check their lineage, and score them all on the same ``held_out`` blocks (on ``device``,
    else where they load) by ``measure.quality``. Returns (entries, data config, blocks, scores, notes)."""
    entries = [load_entry(label, path) for label, path in pairs]
    notes = check_lineage(entries)
    data_cfg, blocks = held_out(entries, max_blocks, quick)
    if device is not None:
        for e in entries:
            e.model.to(device)
    reference = "teacher" if any(e.label == "teacher" for e in entries) else None
    scores = measure.quality({e.label: e.model for e in entries}, blocks, reference, progress=progress)
    return entries, data_cfg, blocks, scores, notes


def training_log(entry: Entry) -> list[dict]:
    """The training curve saved in the model folder (else the run folder its config names, if here)."""
    candidates = [entry.path / TRAINING_LOG] + ([entry.cfg.run_dir / "metrics.jsonl"] if entry.cfg is not None else [])
    found = next((f for f in candidates if f.exists()), None)
    rows = []
    for line in found.read_text(encoding="utf-8", errors="replace").splitlines() if found else []:
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
            rows.append(json.loads(line))
    return rows


def kd_vs_ce(models: dict[str, dict]) -> dict | None:
    """Did the KD student beat the CE-only one, and by how much (perplexity ratio)?"""
    if "v2" not in models or "v2_ce" not in models:
        return None
    kd, ce = models["v2"], models["v2_ce"]
    ratio = kd["val_ppl"] / ce["val_ppl"]
    equal = kd.get("train_steps") == ce.get("train_steps")
    steps = (f"at equal steps ({kd.get('train_steps')})" if equal else
             f"at UNEQUAL steps (KD {kd.get('train_steps')}, CE {ce.get('train_steps')}), so this is not a fair test")
    verdict = (f"KD v2 {'beat' if ratio < 1 else 'did NOT beat'} CE-only v2 {steps}: validation perplexity "
               f"{kd['val_ppl']:.2f} vs {ce['val_ppl']:.2f}, ratio {ratio:.3f} ({abs(1 - ratio) * 100:.1f}% "
               f"{'lower' if ratio < 1 else 'higher'}).")
    return {"kd_beats_ce": ratio < 1, "ppl_ratio_kd_over_ce": ratio, "equal_steps": equal,
            "kd_steps": kd.get("train_steps"), "ce_steps": ce.get("train_steps"), "statement": verdict}


def _init_text(m: dict) -> str:
    init = m.get("init") or {}
    if m.get("stage") == "teacher":
        return m.get("teacher_init") or "teacher"
    if m.get("stage") == "quantize":
        return f"{m.get('precision_label')} of {m.get('source')}"
    return init.get("init", "?") + (f" blocks {init['layers']}" if init.get("layers") else "")


def _loss_text(m: dict) -> str:
    by_stage = {"teacher": "CE", "quantize": "none (post-training)", "prune": "none (pruned, not trained)"}
    if m.get("stage") in by_stage:
        return by_stage[m["stage"]]
    if not m.get("alpha_kd"):
        return "CE only"
    return f"{m['alpha_kd']}·T²·{m.get('loss') or 'KL'} (T={m.get('temperature')}) + {m.get('alpha_ce')}·CE"


def render_markdown(report: dict) -> str:
    models, s = report["models"], report["settings"]
    lines = ["# Distillation report", "",
             f"Measured {report['date']} on {report['device']}, all models in one run. Validation: "
             f"{s['eval_blocks']} blocks × {s['block_size']} tokens of `{s['data']}` (the teacher's data config; "
             f"the same blocks for every model), fp32 (int8 models in their own kernels). Fidelity: on the same "
             f"blocks, the share of positions where the model's most likely next token is the teacher's, and the "
             f"mean KL(teacher ‖ model) per position. Speed: greedy, {s['new_tokens']} new tokens after "
             f"{measure.PROMPT_TOKENS}-token prompts from the validation text, EOS ignored, median of {s['rounds']} "
             "interleaved rounds." + (" **Quick run** (fewer blocks, tokens and rounds)." if s.get("quick") else ""),
             ""]
    front = set(report.get("pareto", {}).get("speed", [])) | set(report.get("pareto", {}).get("size", []))
    lines += markdown_table(
        ["model", "precision", "layers × width", "params", "size MB", "val ppl", "ppl × teacher", "top-1 = teacher",
         "KL(teacher‖·)", "tok/s b1", "tok/s b8", "speed-up b1 / b8"],
        [[f"**{label}**" if label in front else label, m.get("precision_label", "fp32"),
          f"{m['n_layer']} × {m['n_embd']}", f"{m['n_params'] / 1e6:.2f}M", f"{m['size_mb']:.1f}",
          f"{m['val_ppl']:.2f}",
          fmt(m.get("ppl_x_teacher"), ".3f"), fmt(m.get("top1_teacher"), ".3f"), fmt(m.get("kl_teacher"), ".3f"),
          f"{m['tok_s_b1']:.1f}", f"{m['tok_s_b8']:.1f}",
          f"{m['speedup_b1']:.2f}× / {m['speedup_b8']:.2f}×" if m.get("speedup_b1") is not None else "n/a"]
         for label, m in models.items()], "ll" + "r" * 10)
    if front:
        lines += ["", "**Bold**: on the Pareto front (no other model is both faster and lower in perplexity: "
                  f"{', '.join(report['pareto'].get('speed', []))}; or both smaller and lower: "
                  f"{', '.join(report['pareto'].get('size', []))})."]
    ideal = [f"{label} {m['ideal_speedup']:.2f}×" for label, m in models.items()
             if m.get("ideal_speedup") is not None and label != "teacher" and m.get("stage") != "quantize"]
    if ideal:
        lines += ["", "Ideal batch-1 speed-up from forward FLOPs per token (the 50k-vocabulary LM head stays in "
                  "every student): " + ", ".join(ideal) + "."]
    kc = report.get("kd_vs_ce")
    lines += ["", "## KD vs CE-only", "", kc["statement"] if kc else "Not compared: v2 and v2_ce are both needed."]
    lines += ["", "## Training", "", "Seconds: the training loop's, and the whole stage's (the command that made "
              "the model, start to finish: imports, data, evaluation and saving included).", ""]
    lines += markdown_table(
        ["model", "init", "steps", "tokens", "loop s", "stage s", "precision", "loss"],
        [[label, _init_text(m), fmt(m.get("train_steps"), ","), fmt(m.get("train_tokens"), ","),
          fmt(m.get("train_seconds"), ".0f"), fmt(m.get("stage_seconds"), ".0f"), m.get("train_precision") or "n/a",
          _loss_text(m)] for label, m in models.items()], "llrrrrll")
    if report.get("report_seconds") is not None:
        lines.append(f"\nThis report took {report['report_seconds']:.0f} s.")
    lines += ["", "![training curves](training_curves.png)", "", "![perplexity vs speed and size](tradeoffs.png)", ""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def build_report(pairs: list[tuple[str, Path]], out_dir: Path, max_eval_blocks: int | None = None,
                 quick: bool = False, notes: list[str] | None = None) -> dict:
    """Measure every model side by side, write report.md / report.json / the two plots, rewrite the cards."""
    device = pick_device()
    print("precision: fp32 — the report measures every model in fp32 (int8 models in their own kernels)",
          file=sys.stderr)
    entries, data_cfg, blocks, scores, lineage = measure_side_by_side(pairs, max_eval_blocks, quick, device)
    notes = [*(notes or []), *lineage]
    new_tokens, rounds = (16, 2) if quick else (32, 5)
    new_tokens = max(1, min(new_tokens, min(e.model.config.n_positions for e in entries) - measure.PROMPT_TOKENS))
    for label, q in scores.items():
        print(f"{label}: validation perplexity {q['ppl']:.2f}", file=sys.stderr)
    gens = {e.label: Generator(e.model, e.tokenizer, device=device, name=e.label) for e in entries}
    prompts = measure.validation_prompts(entries[0].tokenizer, blocks, 8)
    # One timing round holds every model at both batch sizes, so drift hits them all alike.
    speed = measure.decode_speed(gens, {1: prompts[:1], 8: prompts}, new_tokens, rounds)

    mean_ctx = statistics.mean(len(ids) for ids in entries[0].tokenizer(prompts)["input_ids"]) + new_tokens / 2
    models: dict[str, dict] = {}
    for e in entries:
        m, meta, q = e.model, e.meta, scores[e.label]
        models[e.label] = {
            "path": str(e.path), "stage": meta.get("stage") or (e.cfg.stage if e.cfg else None),
            "precision_label": (meta.get("quantization") or {}).get("scheme", "fp32"), "source": meta.get("source"),
            "n_layer": m.config.n_layer, "n_embd": m.config.n_embd,
            "n_params": meta.get("n_params") or count_parameters(m),
            "size_mb": measure.weights_bytes(e.path) / 1e6,
            "val_loss": q["loss"], "val_ppl": q["ppl"], "top1_teacher": q.get("top1"), "kl_teacher": q.get("kl"),
            "tok_s_b1": speed[e.label, 1], "tok_s_b8": speed[e.label, 8],
            "flops_per_token": measure.model_flops_per_token(m.config, mean_ctx),
            "init": meta.get("student_init"), "teacher_init": meta.get("init"),
            **{k: meta.get(k) for k in ("train_steps", "train_tokens", "train_seconds", "stage_seconds", "alpha_kd",
                                        "alpha_ce", "temperature", "loss")},
            "train_precision": (meta.get("precision") or {}).get("label"),
        }
    if "teacher" in models:
        t = models["teacher"]
        for row in models.values():
            row.update(ppl_x_teacher=row["val_ppl"] / t["val_ppl"], speedup_b1=row["tok_s_b1"] / t["tok_s_b1"],
                       speedup_b8=row["tok_s_b8"] / t["tok_s_b8"],
                       ideal_speedup=t["flops_per_token"] / row["flops_per_token"])
    else:
        notes.append("no teacher in --models: the × teacher and fidelity columns are n/a")

    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": measure.device_label(device),
              "settings": {"data": data_cfg.train, "block_size": data_cfg.block_size, "eval_blocks": len(blocks),
                           "eval_tokens": blocks.n_tokens, "new_tokens": new_tokens, "rounds": rounds,
                           "prompts": prompts, "quick": quick},
              "models": models, "kd_vs_ce": kd_vs_ce(models),
              "pareto": plot_tradeoffs(models, out_dir / "tradeoffs.png"), "notes": notes}
    plot_training_curves({e.label: rows for e in entries if (rows := training_log(e))}, out_dir / "training_curves.png")
    report["report_seconds"] = process_seconds()
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write_text(out_dir / "report.md", render_markdown(report))

    for e in entries:  # the card shows this report's perplexity (fp32, the shared blocks), not the training eval
        meta = {**e.meta, "val_ppl": models[e.label]["val_ppl"]}
        if "teacher" in models and e.label != "teacher":
            meta["teacher_val_ppl"] = models["teacher"]["val_ppl"]
        update_model_files(e.path, card=model_card(e.cfg.name if e.cfg else e.label, meta, e.cfg,
                                                   {**models[e.label], "device": report["device"]}, folder=e.path.name))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpt2-distill report", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated names ({', '.join(MODEL_DIRS)}), folders, or label=folder "
                        f"(default: {DEFAULT_MODELS})")
    p.add_argument("--out", default="reports", help="output folder (default: reports/)")
    p.add_argument("--max-eval-blocks", type=int, default=None,
                   help="validation blocks for perplexity (default: the teacher's data.max_eval_blocks; 0 = all)")
    p.add_argument("--quick", action="store_true", help="at most 32 blocks, 16 new tokens, 2 timing rounds")
    args = p.parse_args(argv)
    if args.max_eval_blocks is not None and args.max_eval_blocks < 0:
        raise ConfigError("--max-eval-blocks must be ≥ 0 (0 = all)")
    pairs, notes = resolve_models(args.models)  # input errors: one line and exit 2 by cli.run_guarded
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    report = build_report(pairs, Path(args.out), args.max_eval_blocks, args.quick, notes)
    print(render_markdown(report).split("\n## KD vs CE-only")[0].rstrip())
    print(f"\nwritten: {os.path.join(args.out, 'report.md')}, report.json, training_curves.png, tradeoffs.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
