"""The report: every model built (teacher, students, compressed variants) measured side by side, in one run.

    python -m python3_distillation report                       # → reports/report.md, .json, two PNGs
    python -m python3_distillation report --quick               # fewer blocks, tokens and rounds
    python -m python3_distillation report --models teacher,v2,my/folder,alt=other/folder

For every model present: parameters, size of the weights file, validation perplexity on the SAME
validation blocks (the teacher's data config), fidelity to the teacher (top-1 agreement and mean
KL(teacher‖model) per position), and greedy generation speed at batch 1 and batch 8 (fixed prompts
cut from the validation text; every model decodes exactly the same number of tokens; the models'
timing rounds are interleaved and the median is kept). It states whether KD v2 beat the CE-only
v2, marks the models on the Pareto front of perplexity against speed and against size, rewrites
each model folder's README.md card with the measured numbers, and plots the training curves.

A student is only put beside the teacher it was made from: each records its teacher's weights
hash (lineage.py), and a mismatch (the teacher was retrained after it) is an error naming both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from python3_distillation.config import ConfigError, DataConfig, RunConfig, saved_config
from python3_distillation.data import Blocks
from python3_distillation.evaluation import measure
from python3_distillation.evaluation.cards import fmt, markdown_table, model_card
from python3_distillation.evaluation.plots import plot_tradeoffs, plot_training_curves
from python3_distillation.fsio import atomic_write_text
from python3_distillation.generation import Generator
from python3_distillation.lineage import process_seconds, weights_sha256
from python3_distillation.models import (TRAINING_LOG, ModelError, count_parameters, is_model_dir, open_model,
                                         update_model_files)
from python3_distillation.paths import MODEL_DIRS, display_path, model_dir
from python3_distillation.precision import pick_device

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

    A bare folder is labelled with its config's ``name`` (so a folder trained with configs/v2.yaml is
    ``v2``). A missing teacher or v2 is an error; a missing v1 / v2_ce / other named model is skipped.
    """
    found, notes = [], []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
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
            if label in MODEL_DIRS:
                source = label.removesuffix("_int8")
                if label.endswith("_int8") and is_model_dir(model_dir(source)):
                    notes.append(f"{label} skipped: no model at {display_path(path)} (make it with `gpt2-distill quantize "
                                 f"{display_path(model_dir(source))}`)")
                elif not label.endswith("_int8"):
                    what = HOW_TO_BUILD.get(label, "")
                    notes.append(f"{label} skipped: no model at {display_path(path)}" + (f" ({what})" if what else ""))
                continue
            raise ModelError(f"{path}: not a model folder (no config.json)")
        if label in (f[0] for f in found):
            raise ConfigError(f"--models: label {label!r} given twice; use label=folder to tell them apart")
        found.append((label, path))
    if not found:
        raise ConfigError("--models: no model to report on")
    return found, notes


def load_entry(label: str, path: Path) -> Entry:
    model, tok, meta = open_model(path)
    return Entry(label, Path(path), model, tok, meta, saved_config(path))


def check_lineage(entries: list[Entry]) -> list[str]:
    """Refuse a student beside a teacher it was not distilled from; notes for what cannot be checked."""
    notes = []
    by_path = {e.path.resolve(): e for e in entries}
    for e in entries:  # an int8 copy must be of the model now in its source folder
        if e.meta.get("stage") != "quantize":
            continue
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


def eval_data_config(entries: list[Entry]) -> tuple[DataConfig, int]:
    """The teacher's data config and seed (else the first model's, else the defaults): one set of blocks for all.

    The seed matters when the validation split is a seeded hold-out of the training documents.
    """
    for e in sorted(entries, key=lambda e: e.label != "teacher"):
        if e.cfg is not None:
            return e.cfg.data, e.cfg.train.seed
    return DataConfig(), RunConfig().train.seed


def validation_blocks(entries: list[Entry], data_cfg: DataConfig, max_blocks: int, seed: int) -> Blocks:
    """The first ``max_blocks`` validation blocks (0 = all), as training's own evaluation reads them."""
    from python3_distillation.data import load_blocks

    ref = sorted(entries, key=lambda e: e.label != "teacher")[0]
    for e in entries:
        if e.model.config.vocab_size != ref.model.config.vocab_size:
            raise ModelError(f"{e.label} has a vocabulary of {e.model.config.vocab_size:,}, {ref.label} of "
                             f"{ref.model.config.vocab_size:,}: perplexities over different vocabularies do not compare")
        if data_cfg.block_size > e.model.config.n_positions:
            raise ConfigError(f"validation blocks of {data_cfg.block_size} tokens do not fit {e.label}'s context "
                              f"of {e.model.config.n_positions}")
    val = load_blocks(data_cfg, ref.tokenizer, seed=seed)["validation"]
    n = len(val) if not max_blocks else min(max_blocks, len(val))
    return Blocks(val.ids[:n])


def measure_perplexities(pairs: list[tuple[str, Path]], max_blocks: int | None = None) -> dict[str, float]:
    """Validation perplexity of each folder on the same blocks (the teacher's data config)."""
    entries = [load_entry(label, path) for label, path in pairs]
    data_cfg, seed = eval_data_config(entries)
    blocks = validation_blocks(entries, data_cfg, data_cfg.max_eval_blocks if max_blocks is None else max_blocks, seed)
    return {k: q["ppl"] for k, q in measure.quality({e.label: e.model for e in entries}, blocks).items()}


def training_log(entry: Entry) -> list[dict]:
    """The training curve saved in the model folder (else the run folder its config names, if here)."""
    candidates = [entry.path / TRAINING_LOG] + ([entry.cfg.run_dir / "metrics.jsonl"] if entry.cfg is not None else [])
    found = next((f for f in candidates if f.exists()), None)
    rows = []
    for line in found.read_text(encoding="utf-8", errors="replace").splitlines() if found else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return rows


# ------------------------------------------------------------------------------------------ report

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
    text = init.get("init", "?")
    if init.get("layers"):
        text += f" blocks {init['layers']}"
    return text


def _loss_text(m: dict) -> str:
    if m.get("stage") == "teacher":
        return "CE"
    if m.get("stage") == "quantize":
        return "none (post-training)"
    if m.get("stage") == "prune":
        return "none (pruned, not trained)"
    if not m.get("alpha_kd"):
        return "CE only"
    return f"{m['alpha_kd']}·T²·{m.get('loss') or 'KL'} (T={m.get('temperature')}) + {m.get('alpha_ce')}·CE"


def render_markdown(report: dict) -> str:
    models, s = report["models"], report["settings"]
    lines = [
        "# Distillation report",
        "",
        f"Measured {report['date']} on {report['device']}, all models in one run. Validation: "
        f"{s['eval_blocks']} blocks × {s['block_size']} tokens of `{s['data']}` (the teacher's data config; "
        f"the same blocks for every model), fp32 (int8 models in their own kernels). Fidelity: on the same "
        f"blocks, the share of positions where the model's most likely next token is the teacher's, and the "
        f"mean KL(teacher ‖ model) per position. Speed: greedy, {s['new_tokens']} new tokens after "
        f"{measure.PROMPT_TOKENS}-token prompts from the validation text, EOS ignored, median of {s['rounds']} "
        "interleaved rounds." + (" **Quick run** (fewer blocks, tokens and rounds)." if s.get("quick") else ""),
        "",
    ]
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
    lines += ["", "## KD vs CE-only", ""]
    kc = report.get("kd_vs_ce")
    lines.append(kc["statement"] if kc else "Not compared: v2 and v2_ce are both needed.")
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
                 quick: bool = False, notes: list[str] | None = None, update_cards: bool = True) -> dict:
    """Measure every model side by side and write report.md / report.json / the two plots."""
    notes = list(notes or [])
    device = pick_device()
    print("precision: fp32 — the report measures every model in fp32 (int8 models in their own kernels)",
          file=sys.stderr)
    entries = [load_entry(label, path) for label, path in pairs]
    notes += check_lineage(entries)
    data_cfg, seed = eval_data_config(entries)
    if max_eval_blocks is None:
        max_eval_blocks = min(data_cfg.max_eval_blocks or 32, 32) if quick else data_cfg.max_eval_blocks
    blocks = validation_blocks(entries, data_cfg, max_eval_blocks, seed)
    new_tokens, rounds = (16, 2) if quick else (32, 5)
    ctx = min(e.model.config.n_positions for e in entries)
    new_tokens = max(1, min(new_tokens, ctx - measure.PROMPT_TOKENS))

    teacher = next((e for e in entries if e.label == "teacher"), None)
    for e in entries:
        e.model.to(device)
    scores = measure.quality({e.label: e.model for e in entries}, blocks, teacher.label if teacher else None)
    for label, q in scores.items():
        print(f"{label}: validation perplexity {q['ppl']:.2f}", file=sys.stderr)
    gens = {e.label: Generator(e.model, e.tokenizer, device=device, name=e.label) for e in entries}
    prompts = measure.validation_prompts(entries[0].tokenizer, blocks, 8)
    # One timing round holds every model at both batch sizes, so drift hits them all alike.
    speed = measure.decode_speed(gens, {1: prompts[:1], 8: prompts}, new_tokens, rounds)

    prompt_len = statistics.mean(len(ids) for ids in entries[0].tokenizer(prompts)["input_ids"])
    mean_ctx = prompt_len + new_tokens / 2
    models: dict[str, dict] = {}
    for e in entries:
        m, meta, q = e.model, e.meta, scores[e.label]
        quant = meta.get("quantization") or {}
        models[e.label] = {
            "path": str(e.path), "stage": meta.get("stage") or (e.cfg.stage if e.cfg else None),
            "precision_label": quant.get("scheme", "fp32"), "source": meta.get("source"),
            "n_layer": m.config.n_layer, "n_embd": m.config.n_embd,
            "n_params": meta.get("n_params") or count_parameters(m),
            "size_mb": measure.weights_bytes(e.path) / 1e6,
            "val_loss": q["loss"], "val_ppl": q["ppl"], "top1_teacher": q.get("top1"), "kl_teacher": q.get("kl"),
            "tok_s_b1": speed[e.label, 1], "tok_s_b8": speed[e.label, 8],
            "flops_per_token": measure.model_flops_per_token(m.config, mean_ctx),
            "init": meta.get("student_init"), "teacher_init": meta.get("init"),
            "train_steps": meta.get("train_steps"), "train_tokens": meta.get("train_tokens"),
            "train_seconds": meta.get("train_seconds"), "stage_seconds": meta.get("stage_seconds"),
            "alpha_kd": meta.get("alpha_kd"),
            "alpha_ce": meta.get("alpha_ce"), "temperature": meta.get("temperature"), "loss": meta.get("loss"),
            "train_precision": (meta.get("precision") or {}).get("label"),
        }
    if teacher is not None:
        t = models["teacher"]
        for row in models.values():
            row["ppl_x_teacher"] = row["val_ppl"] / t["val_ppl"]
            row["speedup_b1"] = row["tok_s_b1"] / t["tok_s_b1"]
            row["speedup_b8"] = row["tok_s_b8"] / t["tok_s_b8"]
            row["ideal_speedup"] = t["flops_per_token"] / row["flops_per_token"]
    else:
        notes.append("no teacher in --models: the × teacher and fidelity columns are n/a")

    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": measure.device_label(device),
        "settings": {"data": data_cfg.train, "block_size": data_cfg.block_size, "eval_blocks": len(blocks),
                     "eval_tokens": blocks.n_tokens, "new_tokens": new_tokens, "rounds": rounds,
                     "prompts": prompts, "quick": quick},
        "models": models,
        "kd_vs_ce": kd_vs_ce(models),
        "pareto": plot_tradeoffs(models, out_dir / "tradeoffs.png"),
        "notes": notes,
    }
    curves = {e.label: training_log(e) for e in entries}
    plot_training_curves({k: v for k, v in curves.items() if v}, out_dir / "training_curves.png")
    report["report_seconds"] = process_seconds()
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write_text(out_dir / "report.md", render_markdown(report))

    if update_cards:
        for e in entries:
            row = models[e.label]
            measured = {"size_mb": row["size_mb"], "decode_tok_s_b1": row["tok_s_b1"],
                        "decode_tok_s_b8": row["tok_s_b8"], "top1_teacher": row["top1_teacher"],
                        "kl_teacher": row["kl_teacher"], "device": report["device"]}
            # The card shows this report's perplexity (fp32, the shared blocks), not the training eval.
            meta = {**e.meta, "val_ppl": row["val_ppl"]}
            if teacher is not None and e is not teacher:
                meta["teacher_val_ppl"] = models["teacher"]["val_ppl"]
            name = e.cfg.name if e.cfg else e.label
            update_model_files(e.path, card=model_card(name, meta, e.cfg, measured, folder=e.path.name))
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
    text = render_markdown(report)
    print(text.split("\n## KD vs CE-only")[0].rstrip())
    print(f"\nwritten: {os.path.join(args.out, 'report.md')}, report.json, training_curves.png, tradeoffs.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
