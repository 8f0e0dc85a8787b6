"""`make experiments`: the distillation recipes, each compared side by side at equal steps → reports/experiments.md.

    python -m python3_distillation.experiments                 # every question; run again after a kill to resume
    python -m python3_distillation.experiments --only losses   # one question

Results: README.md, "Experiments: pruning, teacher-generated data, the loss family"; design: docs/design/evaluation.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoConfig

from python3_distillation.augment import AugmentSettings, run_augment
from python3_distillation.config import RunConfig, load_config
from python3_distillation.device_plan import decide_for_run, pick_device
from python3_distillation.distill import run_distill
from python3_distillation.errors import EXIT_BAD_INPUT, BadInput, ConfigError, ModelError
from python3_distillation.evaluation import measure
from python3_distillation.evaluation.cards import markdown_table
from python3_distillation.evaluation.plots import bar_panels
from python3_distillation.evaluation.report import measure_side_by_side
from python3_distillation.fsio import atomic_write_text
from python3_distillation.lineage import weights_sha256
from python3_distillation.models import count_parameters, open_model, read_meta
from python3_distillation.prune import block_parameters, mlp_width, run_prune

QUESTIONS = ("pruning", "augmentation", "losses")
TARGETS = {25: 0.25, 50: 0.5}  # percent: the share of the teacher's block parameters pruning removes
DEFAULT_ROOT = Path("runs") / "experiments"


@dataclass
class Variant:
    """One trained model of the experiments: its config, its label in the tables, extra overrides."""

    config: str
    label: str
    questions: tuple[str, ...]
    overrides: list[str] = field(default_factory=list)


def variants(root: Path) -> list[Variant]:
    out = [Variant("exp_kd", "forward_kl (real text)", ("augmentation", "losses")),
           Variant("exp_kd_augmented", "forward_kl (real + teacher samples)", ("augmentation",)),
           Variant("exp_reverse_kl", "reverse_kl", ("losses",)),
           Variant("exp_jsd", "jsd (beta 0.5)", ("losses",)),
           Variant("exp_on_policy", "forward_kl, on-policy 0.5", ("losses",))]
    for pct in TARGETS:
        out.append(Variant(f"exp_prune{pct}", f"pruned {pct}% + KD recovery", ("pruning",),
                           [f"student.from_dir={root / f'pruned{pct}'}"]))
        out.append(Variant(f"exp_same{pct}", f"same-size student ({pct}%)", ("pruning",)))
    return out


def _one_precision(root: Path, cfg: RunConfig) -> list[str]:
    """``mixed_precision: auto`` decides per run from a timed probe, which a busy machine can tip either
    way; the variants compared must train alike, so it is decided once and kept for resumed runs."""
    if cfg.train.mixed_precision != "auto":
        return []
    f = root / "precision.json"
    if not f.exists():
        decided = decide_for_run("auto", cpu=cfg.train.cpu)
        atomic_write_text(f, json.dumps(decided.to_dict()) + "\n")
        tqdm.write(f"experiments: {decided.line()} (kept for every variant and for resumed runs)", file=sys.stderr)
    return [f"train.mixed_precision={json.loads(f.read_text())['mode']}"]


def _cfg(name: str, root: Path, overrides: list[str], extra: list[str] = ()) -> RunConfig:
    """The variant's config with its outputs under ``root`` (models/<name>, runs/<name>)."""
    return load_config([name], [*overrides, f"student.output_dir={root / 'models' / name}",
                                f"train.run_dir={root / 'runs' / name}", *extra])


def prune_stage(teacher_dir: Path, out: Path, target: float, batches: int) -> Path:
    """Prune the teacher unless ``out`` already holds this pruning of this teacher."""
    meta = read_meta(out) if out.exists() else {}
    if (meta.get("prune", {}).get("target") == target and meta["prune"].get("importance_blocks") == batches * 4
            and meta.get("source_sha256") == weights_sha256(open_model(teacher_dir).model)):
        tqdm.write(f"{out}: already pruned from this teacher", file=sys.stderr)
        return out
    return run_prune(teacher_dir, target, out, n_batches=batches, batch_size=4)


def measure_models(teacher_dir: Path, models: dict[str, Path], eval_blocks: int) -> tuple[dict, dict]:
    """Perplexity, top-1 agreement and KL(teacher ‖ ·) of every model, by the report's ``measure_side_by_side``."""
    entries, data_cfg, blocks, scores, _ = measure_side_by_side([("teacher", teacher_dir), *models.items()],
                                                                eval_blocks, progress="measuring")
    results = {}
    for e in entries:
        m, q = e.model.config, scores[e.label]
        results[e.label] = {
            "path": str(e.path), "val_loss": q["loss"], "val_ppl": q["ppl"],
            "top1_teacher": q["top1"], "kl_teacher": max(0.0, q["kl"]),
            "n_layer": m.n_layer, "n_inner": mlp_width(m), "n_params": count_parameters(e.model),
            "block_params": block_parameters(e.model), "train_steps": e.meta.get("train_steps"),
            "train_seconds": e.meta.get("train_seconds"), "loss": e.meta.get("loss"), "data": e.meta.get("data"),
            "init": e.meta.get("student_init"), "stage": e.meta.get("stage"),
        }
    return results, {"data": data_cfg.train, "block_size": data_cfg.block_size, "eval_blocks": len(blocks),
                     "eval_tokens": blocks.n_tokens}


def _equal_steps(rows: list[dict]) -> str:
    steps = {r["train_steps"] for r in rows if r.get("train_steps") is not None}
    return f"at equal steps ({steps.pop()})" if len(steps) == 1 else f"at UNEQUAL steps ({sorted(steps)})"


def _fidelity(r: dict) -> list[str]:
    return [f"{r['val_ppl']:.2f}", f"{r['top1_teacher']:.3f}", f"{r['kl_teacher']:.3f}"]


def render(results: dict, settings: dict, questions: list[str], out_dir: Path, meta: dict) -> str:
    t = results["teacher"]
    lines = ["# Distillation experiments", "",
             f"Measured {meta['date']} on {meta['device']}; this run took {meta['minutes']:.1f} min"
             + (" (resumed: earlier runs did part of the work)" if meta.get("resumed") else "") + ". "
             f"Every variant trained in {meta['precision']} with seed and schedule alike. "
             f"Every model on the same {settings['eval_blocks']} validation blocks × {settings['block_size']} tokens "
             f"of `{settings['data']}` ({settings['eval_tokens']:,} tokens), fp32: perplexity, the share of positions "
             "where the model's most likely next token is the teacher's (top-1), and the mean KL(teacher ‖ model) "
             f"per position. Teacher: perplexity {t['val_ppl']:.2f}.", ""]
    if "pruning" in questions:
        rows, chart = [], []
        for pct in TARGETS:
            labels = (f"pruned {pct}%", f"pruned {pct}% + KD recovery", f"same-size student ({pct}%)")
            pruned, rec, same = (results[k] for k in labels)
            removed = 1 - pruned["block_params"] / t["block_params"]
            for label, r in zip(labels, (pruned, rec, same)):
                how = f"{r['train_steps']} steps" if r is not pruned else "no training"
                rows.append([label, f"{r['n_layer']} × {r['n_inner']}", f"{r['block_params'] / 1e6:.2f}M",
                             f"{removed:.1%}", how, *_fidelity(r)])
            chart.append((f"{pct}% fewer block parameters", "validation perplexity (log scale)",
                          {"right after pruning": pruned["val_ppl"], "pruned + KD recovery": rec["val_ppl"],
                           "same-size student + KD": same["val_ppl"], "teacher": t["val_ppl"]}))
        bar_panels(chart, "Pruning, then KD recovery, against a same-size student",
                   out_dir / "experiments_pruning.png", log=True)
        lines += ["## 1. Structured pruning, then KD recovery from the unpruned teacher", "",
                  f"Teacher: {t['n_layer']} blocks × {t['n_inner']} MLP neurons, {t['block_params'] / 1e6:.2f}M block "
                  "parameters. The pruner keeps whole blocks and the same number of MLP neurons in each (what a stock "
                  "GPT-2 config can express), chosen by measured importance on training blocks; the same-size student "
                  "has the pruned model's shape, built from evenly spread teacher blocks and each block's largest "
                  "neurons by weight norm. Recovery and the same-size student are trained "
                  f"{_equal_steps([results[k] for k in results if 'KD recovery' in k or 'same-size' in k])}.", ""]
        lines += [*markdown_table(["model", "blocks × MLP", "block params", "removed", "training", "val ppl", "top-1",
                                   "KL(teacher‖·)"], rows), "", "![pruning](experiments_pruning.png)", ""]
    if "augmentation" in questions:
        real, aug = results["forward_kl (real text)"], results["forward_kl (real + teacher samples)"]
        rows = [[label, f"`{r['data']}`", str(r["train_steps"]), *_fidelity(r)]
                for label, r in (("forward_kl (real text)", real), ("forward_kl (real + teacher samples)", aug))]
        pair = {"real text": real, "real + teacher samples": aug}
        bar_panels([("perplexity", "validation perplexity", {k: r["val_ppl"] for k, r in pair.items()}),
                    ("fidelity", "top-1 agreement with the teacher", {k: r["top1_teacher"] for k, r in pair.items()})],
                   "KD on real text vs real + teacher samples", out_dir / "experiments_augmentation.png")
        lines += ["## 2. Teacher-generated data (sequence-level KD) mixed into the real text", "",
                  f"Both {_equal_steps([real, aug])}. The augmented run draws {meta.get('mix', '')} of its blocks "
                  f"from {meta.get('augment_samples', 'n/a')} teacher continuations of training-text prompts "
                  f"(`gpt2-distill augment`: {meta.get('augment_settings', '')}).", ""]
        lines += [*markdown_table(["model", "data", "steps", "val ppl", "top-1", "KL(teacher‖·)"], rows), "",
                  "![augmentation](experiments_augmentation.png)", ""]
    if "losses" in questions:
        labels = ["forward_kl (real text)", "reverse_kl", "jsd (beta 0.5)", "forward_kl, on-policy 0.5"]
        rows = [[label, f"`{results[label]['loss']}`", str(results[label]["train_steps"]),
                 f"{results[label]['train_seconds'] or 0:.0f}", *_fidelity(results[label])] for label in labels]
        bar_panels([("perplexity", "validation perplexity", {k: results[k]["val_ppl"] for k in labels}),
                    ("fidelity", "KL(teacher ‖ model), nats/position", {k: results[k]["kl_teacher"] for k in labels}),
                    ("fidelity", "top-1 agreement with the teacher", {k: results[k]["top1_teacher"] for k in labels})],
                   "The kd term's divergence, and on-policy batches", out_dir / "experiments_losses.png")
        lines += ["## 3. The divergence, and on-policy batches", "",
                  f"Same student (v2's: 6 teacher blocks), same α and T, {_equal_steps([results[k] for k in labels])}; "
                  "only `distill.loss` / `distill.on_policy_fraction` differ.", ""]
        lines += [*markdown_table(["model", "distill.loss", "steps", "train s", "val ppl", "top-1", "KL(teacher‖·)"],
                                  rows), "", "![losses](experiments_losses.png)", ""]
    return "\n".join(lines)


def run_experiments(only: list[str] | None = None, root: Path = DEFAULT_ROOT, out_dir: Path = Path("reports"),
                    overrides: list[str] = (), eval_blocks: int = 64, prune_batches: int = 4,
                    augment: AugmentSettings | None = None) -> dict:
    """Run (or resume) every stage of the chosen questions, measure, write ``experiments.md``/``.json``/charts."""
    questions = [q for q in QUESTIONS if not only or q in only]
    augment = augment or AugmentSettings()
    root, out_dir = Path(root), Path(out_dir)
    overrides = list(overrides) + _one_precision(root, load_config(["exp_kd"], list(overrides)))
    base = _cfg("exp_kd", root, overrides)
    teacher_dir = Path(base.teacher.path)
    if not (teacher_dir / "config.json").exists():
        raise ModelError(f"no teacher at {teacher_dir}: train it first (`make teacher`, or `make run`)")
    samples = root / "teacher_samples.jsonl"
    chosen = [v for v in variants(root) if set(v.questions) & set(questions)]

    stages = [(f"prune{pct}", lambda t=t, pct=pct: prune_stage(teacher_dir, root / f"pruned{pct}", t, prune_batches))
              for pct, t in TARGETS.items() if "pruning" in questions]
    if "augmentation" in questions:  # appends what is missing, checks what is there
        stages.append(("augment", lambda: run_augment(base, samples, augment)))
    mixed_data = f"data.train={base.data.train},{samples}"
    mix = _cfg("exp_kd_augmented", root, list(overrides), [mixed_data]).data.mix
    for v in chosen:
        def train_variant(v=v):
            extra = list(v.overrides)
            if v.config.startswith("exp_same"):  # the pruned model's shape, without pruning
                c = AutoConfig.from_pretrained(root / f"pruned{v.config.removeprefix('exp_same')}")
                extra += [f"student.n_layer={c.n_layer}", f"student.n_inner={mlp_width(c)}"]
            if v.config == "exp_kd_augmented":
                extra.append(mixed_data)
            return run_distill(_cfg(v.config, root, list(overrides), extra), resume=True)
        stages.append((v.config, train_variant))

    t0 = time.perf_counter()
    resumed = (root / "models").exists()
    with tqdm(stages, desc="experiments", unit="stage", dynamic_ncols=True) as bar:
        for name, fn in bar:
            bar.set_postfix_str(name)
            fn()

    models = {**{f"pruned {pct}%": root / f"pruned{pct}" for pct in TARGETS if "pruning" in questions},
              **{v.label: root / "models" / v.config for v in chosen}}
    results, settings = measure_models(teacher_dir, models, eval_blocks)
    minutes = (time.perf_counter() - t0) / 60
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": measure.device_label(pick_device()), "minutes": minutes, "resumed": resumed,
            "precision": {"no": "fp32"}.get(base.train.mixed_precision, base.train.mixed_precision),
            "mix": " / ".join(f"{w:g}" for w in mix) if mix else "", "augment_samples": augment.n_samples,
            "augment_settings": f"{augment.prompt_tokens}-token prompts, up to {augment.new_tokens} new tokens, "
                                f"temperature {augment.temperature:g}, top-p {augment.top_p:g}"}
    text = render(results, settings, questions, out_dir, meta)
    atomic_write_text(out_dir / "experiments.md", text)
    report = {**meta, "settings": settings, "questions": questions, "models": results}
    atomic_write_text(out_dir / "experiments.json", json.dumps(report, indent=2, ensure_ascii=False))
    print(text)
    print(f"\nwritten: {out_dir / 'experiments.md'}, experiments.json and one chart per question "
          f"({minutes:.1f} min)", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m python3_distillation.experiments", description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=QUESTIONS, help="run only this question (repeatable)")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help=f"where models and runs go (default {DEFAULT_ROOT})")
    p.add_argument("--out", default="reports", help="where experiments.md goes (default reports/)")
    p.add_argument("--eval-blocks", type=int, default=64, help="validation blocks every model is measured on (default 64)")
    p.add_argument("--prune-batches", type=int, default=4, help="batches of 4 blocks that score the units (default 4)")
    p.add_argument("--augment-samples", type=int, default=AugmentSettings().n_samples,
                   help="teacher continuations to sample (default %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="applied to every variant, e.g. train.max_steps=50 (steps stay equal across variants)")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.eval_blocks < 1 or args.prune_batches < 1:
            raise ConfigError("--eval-blocks and --prune-batches must be ≥ 1")
        run_experiments(args.only, Path(args.root), Path(args.out), args.overrides, args.eval_blocks,
                        args.prune_batches, AugmentSettings(n_samples=args.augment_samples))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
