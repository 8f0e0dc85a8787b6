"""`make experiments`: the distillation recipes, each compared side by side at equal steps → reports/experiments.md.

    python -m python3_distillation.experiments                 # every question; run again after a kill to resume
    python -m python3_distillation.experiments --only losses   # one question

Three questions, every variant a config diff in ``configs/`` (``exp_*.yaml``) distilling the
embedded teacher with the same student recipe, steps and seed:

1. **pruning** — the teacher pruned by 25% and 50% of its block parameters (``gpt2-distill prune``):
   right after pruning, after KD recovery from the unpruned teacher (``exp_prune25``/``exp_prune50``,
   ``student.init=pruned``), and a student of the same shape built from teacher blocks and the
   largest MLP neurons without pruning's measurements (``exp_same25``/``exp_same50``; the shape is
   set here to the pruned model's), equal steps;
2. **augmentation** — KD on the real text (``exp_kd``) against KD on real text mixed with
   teacher-sampled continuations (``gpt2-distill augment``; ``exp_kd_augmented``, ``data.mix``);
3. **losses** — forward KL (``exp_kd``), reverse KL, GKD's generalised JSD, and forward KL with half
   the batches on-policy (``exp_reverse_kl``, ``exp_jsd``, ``exp_on_policy``).

Every stage resumes (pruning and sampling are redone only when their inputs changed; training runs
with ``--resume``). The models are then measured side by side on the same validation blocks with the
report's helpers: perplexity, top-1 agreement with the teacher and KL(teacher ‖ model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from python3_distillation.augment import AugmentSettings
from python3_distillation.config import RunConfig, load_config
from python3_distillation.errors import EXIT_BAD_INPUT, BadInput, ModelError

QUESTIONS = ("pruning", "augmentation", "losses")
TARGETS = (0.25, 0.5)
DEFAULT_ROOT = Path("runs") / "experiments"


@dataclass
class Variant:
    """One trained model of the experiments: its config, its label in the tables, extra overrides."""

    config: str
    label: str
    questions: tuple[str, ...]
    overrides: list[str] = field(default_factory=list)
    after: str = ""  # a stage that must run first (pruning, sampling)


def variants(root: Path) -> list[Variant]:
    out = [Variant("exp_kd", "forward_kl (real text)", ("augmentation", "losses")),
           Variant("exp_kd_augmented", "forward_kl (real + teacher samples)", ("augmentation",), after="augment"),
           Variant("exp_reverse_kl", "reverse_kl", ("losses",)),
           Variant("exp_jsd", "jsd (beta 0.5)", ("losses",)),
           Variant("exp_on_policy", "forward_kl, on-policy 0.5", ("losses",))]
    for t in TARGETS:
        pct = round(t * 100)
        out.append(Variant(f"exp_prune{pct}", f"pruned {pct}% + KD recovery", ("pruning",),
                           [f"student.from_dir={root / f'pruned{pct}'}"], after=f"prune{pct}"))
        out.append(Variant(f"exp_same{pct}", f"same-size student ({pct}%)", ("pruning",), after=f"prune{pct}"))
    return out


def _one_precision(root: Path, cfg: RunConfig) -> list[str]:
    """``mixed_precision: auto`` decides per run from a timed probe, which a busy machine can tip either
    way; the variants compared must train alike, so it is decided once and kept for resumed runs."""
    if cfg.train.mixed_precision != "auto":
        return []
    from python3_distillation.precision import decide_for_run

    f = root / "precision.json"
    if f.exists():
        mode = json.loads(f.read_text())["mode"]
    else:
        decided = decide_for_run("auto", cpu=cfg.train.cpu)
        mode = decided.mode
        root.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(decided.to_dict()) + "\n")
        tqdm.write(f"experiments: {decided.line()} (kept for every variant and for resumed runs)", file=sys.stderr)
    return [f"train.mixed_precision={mode}"]


def _cfg(name: str, root: Path, overrides: list[str], extra: list[str] = ()) -> RunConfig:
    """The variant's config with its outputs under ``root`` (models/<name>, runs/<name>)."""
    return load_config([name], [*overrides, f"student.output_dir={root / 'models' / name}",
                                f"train.run_dir={root / 'runs' / name}", *extra])


# ------------------------------------------------------------------------------------------ stages


def prune_stage(teacher_dir: Path, out: Path, target: float, batches: int) -> Path:
    """Prune the teacher unless ``out`` already holds this pruning of this teacher."""
    from python3_distillation.lineage import weights_sha256
    from python3_distillation.models import load_model, read_meta
    from python3_distillation.prune import run_prune

    meta = read_meta(out) if out.exists() else {}
    if (meta.get("prune", {}).get("target") == target and meta["prune"].get("importance_blocks") == batches * 4
            and meta.get("source_sha256") == weights_sha256(load_model(teacher_dir))):
        tqdm.write(f"{out}: already pruned from this teacher", file=sys.stderr)
        return out
    return run_prune(teacher_dir, target, out, n_batches=batches, batch_size=4)


def augment_stage(cfg: RunConfig, out: Path, settings: AugmentSettings) -> Path:
    from python3_distillation.augment import run_augment

    return run_augment(cfg, out, settings)  # appends what is missing, checks what is there


def train_stage(cfg: RunConfig) -> Path:
    from python3_distillation.distill import run_distill

    return run_distill(cfg, resume=True)


def same_size_overrides(pruned_dir: Path) -> list[str]:
    """The pruned model's shape, for the student that gets it without pruning."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(pruned_dir)
    return [f"student.n_layer={c.n_layer}", f"student.n_inner={c.n_inner or 4 * c.n_embd}"]


# ----------------------------------------------------------------------------------------- measure


class _TeacherLogits(torch.nn.Module):
    """Stands in for the teacher in ``measure.fidelity``: the logits of the batch, computed once for
    every model measured against them (the teacher's forward is most of a small model's cost)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits, persistent=False)

    def forward(self, input_ids):  # noqa: ARG002 (the batch these logits were computed for)
        return SimpleNamespace(logits=self.logits)


def measure_models(teacher_dir: Path, models: dict[str, Path], eval_blocks: int) -> tuple[dict, dict]:
    """Validation perplexity, top-1 agreement and KL(teacher ‖ ·) of every model on the same blocks,
    with the report's helpers (``measure.perplexity``, ``measure.fidelity``), one batch at a time."""
    from python3_distillation.data import Blocks
    from python3_distillation.evaluation import measure
    from python3_distillation.evaluation.report import check_lineage, eval_data_config, load_entry, validation_blocks
    from python3_distillation.models import count_parameters
    from python3_distillation.prune import block_parameters

    entries = [load_entry("teacher", teacher_dir)] + [load_entry(label, path) for label, path in models.items()]
    check_lineage(entries)  # every model here was made from this teacher
    data_cfg, seed = eval_data_config(entries)
    blocks = validation_blocks(entries, data_cfg, eval_blocks, seed)
    teacher = entries[0]
    sums = {e.label: {"loss": 0.0, "top1": 0.0, "kl": 0.0} for e in entries}
    starts = range(0, len(blocks), measure.EVAL_BATCH)
    for start in tqdm(starts, desc="measuring", unit="batch", dynamic_ncols=True):
        batch = Blocks(blocks.ids[start:start + measure.EVAL_BATCH])
        share = len(batch) / len(blocks)  # equal-length blocks: a batch's mean weighs by its block count
        with torch.no_grad():
            reference = _TeacherLogits(teacher.model(input_ids=batch.ids).logits.float())
        for e in entries:
            sums[e.label]["loss"] += measure.perplexity(e.model, batch)[0] * share
            fid = measure.fidelity(e.model, reference, batch) if e is not teacher else {"top1": 1.0, "kl": 0.0}
            sums[e.label]["top1"] += fid["top1"] * share
            sums[e.label]["kl"] += fid["kl"] * share
    results = {}
    for e in entries:
        m, r = e.model.config, sums[e.label]
        results[e.label] = {
            "path": str(e.path), "val_loss": r["loss"], "val_ppl": math.exp(min(r["loss"], 50.0)),
            "top1_teacher": r["top1"], "kl_teacher": max(0.0, r["kl"]),
            "n_layer": m.n_layer, "n_inner": m.n_inner or 4 * m.n_embd, "n_params": count_parameters(e.model),
            "block_params": block_parameters(e.model), "train_steps": e.meta.get("train_steps"),
            "train_seconds": e.meta.get("train_seconds"), "loss": e.meta.get("loss"), "data": e.meta.get("data"),
            "init": e.meta.get("student_init"), "stage": e.meta.get("stage"),
        }
    settings = {"data": data_cfg.train, "block_size": data_cfg.block_size, "eval_blocks": len(blocks),
                "eval_tokens": blocks.n_tokens}
    return results, settings


# ------------------------------------------------------------------------------------------ report


def _equal_steps(rows: list[dict]) -> str:
    steps = {r["train_steps"] for r in rows if r.get("train_steps") is not None}
    return f"at equal steps ({steps.pop()})" if len(steps) == 1 else f"at UNEQUAL steps ({sorted(steps)})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _fidelity(r: dict) -> list[str]:
    return [f"{r['val_ppl']:.2f}", f"{r['top1_teacher']:.3f}", f"{r['kl_teacher']:.3f}"]


def _bar_panels(panels: list[tuple[str, str, dict[str, float]]], title: str, out: Path, log: bool = False) -> None:
    """One chart, one panel per ``(panel title, y label, {bar label: value})``, each on its own axis."""
    from python3_distillation.evaluation.plots import _pyplot

    plt = _pyplot()
    width = max(len(values) for _, _, values in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + len(panels) * (1.0 + 0.9 * width), 4.6), squeeze=False)
    for ax, (name, ylabel, values) in zip(axes[0], panels):
        labels, ys = list(values), list(values.values())
        bars = ax.bar(range(len(labels)), ys, color=[f"C{i % 10}" for i in range(len(labels))])
        ax.bar_label(bars, labels=[f"{y:.3g}" if y < 10 else f"{y:,.1f}" for y in ys], fontsize=8, padding=2)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


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
        for pct in (round(x * 100) for x in TARGETS):
            pruned, rec, same = (results[k] for k in (f"pruned {pct}%", f"pruned {pct}% + KD recovery",
                                                      f"same-size student ({pct}%)"))
            removed = 1 - pruned["block_params"] / t["block_params"]
            for label, r, how in ((f"pruned {pct}%", pruned, "no training"),
                                  (f"pruned {pct}% + KD recovery", rec, f"{rec['train_steps']} steps"),
                                  (f"same-size student ({pct}%)", same, f"{same['train_steps']} steps")):
                rows.append([label, f"{r['n_layer']} × {r['n_inner']}", f"{r['block_params'] / 1e6:.2f}M",
                             f"{removed:.1%}", how, *_fidelity(r)])
            chart.append((f"{pct}% fewer block parameters", "validation perplexity (log scale)",
                          {"right after pruning": pruned["val_ppl"], "pruned + KD recovery": rec["val_ppl"],
                           "same-size student + KD": same["val_ppl"], "teacher": t["val_ppl"]}))
        _bar_panels(chart, "Pruning, then KD recovery, against a same-size student",
                    out_dir / "experiments_pruning.png", log=True)
        lines += ["## 1. Structured pruning, then KD recovery from the unpruned teacher", "",
                  f"Teacher: {t['n_layer']} blocks × {t['n_inner']} MLP neurons, {t['block_params'] / 1e6:.2f}M block "
                  "parameters. The pruner keeps whole blocks and the same number of MLP neurons in each (what a stock "
                  "GPT-2 config can express), chosen by measured importance on training blocks; the same-size student "
                  "has the pruned model's shape, built from evenly spread teacher blocks and each block's largest "
                  "neurons by weight norm. Recovery and the same-size student are trained "
                  f"{_equal_steps([results[k] for k in results if 'KD recovery' in k or 'same-size' in k])}.", ""]
        lines += _table(["model", "blocks × MLP", "block params", "removed", "training", "val ppl", "top-1",
                         "KL(teacher‖·)"], rows)
        lines += ["", "![pruning](experiments_pruning.png)", ""]
    if "augmentation" in questions:
        rows = []
        for label in ("forward_kl (real text)", "forward_kl (real + teacher samples)"):
            r = results[label]
            rows.append([label, f"`{r['data']}`", str(r["train_steps"]), *_fidelity(r)])
        real, aug = results["forward_kl (real text)"], results["forward_kl (real + teacher samples)"]
        pair = {"real text": real, "real + teacher samples": aug}
        _bar_panels([("perplexity", "validation perplexity", {k: r["val_ppl"] for k, r in pair.items()}),
                     ("fidelity", "top-1 agreement with the teacher", {k: r["top1_teacher"] for k, r in pair.items()})],
                    "KD on real text vs real + teacher samples", out_dir / "experiments_augmentation.png")
        lines += ["## 2. Teacher-generated data (sequence-level KD) mixed into the real text", "",
                  f"Both {_equal_steps([real, aug])}. The augmented run draws {meta.get('mix', '')} of its blocks "
                  f"from {meta.get('augment_samples', 'n/a')} teacher continuations of training-text prompts "
                  f"(`gpt2-distill augment`: {meta.get('augment_settings', '')}).", ""]
        lines += _table(["model", "data", "steps", "val ppl", "top-1", "KL(teacher‖·)"], rows)
        lines += ["", "![augmentation](experiments_augmentation.png)", ""]
    if "losses" in questions:
        labels = ["forward_kl (real text)", "reverse_kl", "jsd (beta 0.5)", "forward_kl, on-policy 0.5"]
        rows = [[label, f"`{results[label]['loss']}`", str(results[label]["train_steps"]),
                 f"{results[label]['train_seconds'] or 0:.0f}", *_fidelity(results[label])] for label in labels]
        _bar_panels([("perplexity", "validation perplexity", {k: results[k]["val_ppl"] for k in labels}),
                     ("fidelity", "KL(teacher ‖ model), nats/position", {k: results[k]["kl_teacher"] for k in labels}),
                     ("fidelity", "top-1 agreement with the teacher", {k: results[k]["top1_teacher"] for k in labels})],
                    "The kd term's divergence, and on-policy batches", out_dir / "experiments_losses.png")
        lines += ["## 3. The divergence, and on-policy batches", "",
                  f"Same student (v2's: 6 teacher blocks), same α and T, {_equal_steps([results[k] for k in labels])}; "
                  "only `distill.loss` / `distill.on_policy_fraction` differ.", ""]
        lines += _table(["model", "distill.loss", "steps", "train s", "val ppl", "top-1", "KL(teacher‖·)"], rows)
        lines += ["", "![losses](experiments_losses.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- run


def run_experiments(only: list[str] | None = None, root: Path = DEFAULT_ROOT, out_dir: Path = Path("reports"),
                    overrides: list[str] = (), eval_blocks: int = 64, prune_batches: int = 4,
                    augment: AugmentSettings | None = None) -> dict:
    """Run (or resume) every stage of the chosen questions, measure, write ``experiments.md``/``.json``/charts."""
    # Every stage's code is imported now, once: a long run uses one version of it throughout.
    from python3_distillation import augment as _augment, distill as _distill, prune as _prune  # noqa: F401
    from python3_distillation.evaluation import measure, report as _report  # noqa: F401
    from python3_distillation.generation import default_device

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

    stages: list[tuple[str, object]] = []
    for t in TARGETS if "pruning" in questions else ():
        pct = round(t * 100)
        stages.append((f"prune{pct}", lambda t=t, pct=pct: prune_stage(teacher_dir, root / f"pruned{pct}", t, prune_batches)))
    if "augmentation" in questions:
        stages.append(("augment", lambda: augment_stage(base, samples, augment)))
    mixed_data = f"data.train={base.data.train},{samples}"
    mix = _cfg("exp_kd_augmented", root, list(overrides), [mixed_data]).data.mix
    for v in chosen:
        def train_variant(v=v):
            extra = list(v.overrides)
            if v.config.startswith("exp_same"):
                extra += same_size_overrides(root / f"pruned{v.config.removeprefix('exp_same')}")
            if v.config == "exp_kd_augmented":
                extra.append(mixed_data)
            return train_stage(_cfg(v.config, root, list(overrides), extra))
        stages.append((v.config, train_variant))

    t0 = time.perf_counter()
    resumed = (root / "models").exists()
    bar = tqdm(stages, desc="experiments", unit="stage", dynamic_ncols=True)
    for name, fn in bar:
        bar.set_postfix_str(name)
        fn()
    bar.close()

    models: dict[str, Path] = {}
    for t in TARGETS if "pruning" in questions else ():
        models[f"pruned {round(t * 100)}%"] = root / f"pruned{round(t * 100)}"
    for v in chosen:
        models[v.label] = root / "models" / v.config
    results, settings = measure_models(teacher_dir, models, eval_blocks)
    minutes = (time.perf_counter() - t0) / 60
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": measure.device_label(default_device()), "minutes": minutes, "resumed": resumed,
            "precision": {"no": "fp32"}.get(base.train.mixed_precision, base.train.mixed_precision),
            "mix": " / ".join(f"{w:g}" for w in mix) if mix else "", "augment_samples": augment.n_samples,
            "augment_settings": f"{augment.prompt_tokens}-token prompts, up to {augment.new_tokens} new tokens, "
                                f"temperature {augment.temperature:g}, top-p {augment.top_p:g}"}
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render(results, settings, questions, out_dir, meta)
    (out_dir / "experiments.md").write_text(text, encoding="utf-8")
    report = {**meta, "settings": settings, "questions": questions, "models": results}
    (out_dir / "experiments.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(text)
    print(f"\nwritten: {out_dir / 'experiments.md'}, experiments.json and one chart per question "
          f"({minutes:.1f} min)", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    import logging
    import os

    p = argparse.ArgumentParser(prog="python -m python3_distillation.experiments", description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=QUESTIONS, help="run only this question (repeatable)")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help=f"where models and runs go (default {DEFAULT_ROOT})")
    p.add_argument("--out", default="reports", help="where experiments.md goes (default reports/)")
    p.add_argument("--eval-blocks", type=int, default=64, help="validation blocks every model is measured on (default 64)")
    p.add_argument("--prune-batches", type=int, default=4, help="batches of 4 blocks that score the units (default 4)")
    p.add_argument("--augment-samples", type=int, default=AugmentSettings.n_samples,
                   help=f"teacher continuations to sample (default {AugmentSettings.n_samples})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="applied to every variant, e.g. train.max_steps=50 (steps stay equal across variants)")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.eval_blocks < 1 or args.prune_batches < 1:
            from python3_distillation.errors import ConfigError

            raise ConfigError("--eval-blocks and --prune-batches must be ≥ 1")
        run_experiments(args.only, Path(args.root), Path(args.out), args.overrides, args.eval_blocks,
                        args.prune_batches, AugmentSettings(n_samples=args.augment_samples))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
