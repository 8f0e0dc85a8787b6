"""The report: teacher, v1, v2 and the CE-only v2 measured side by side, in one run, on one machine.

    python -m python3_distillation report                       # → reports/report.md, .json, two PNGs
    python -m python3_distillation report --quick               # fewer blocks, tokens and rounds
    python -m python3_distillation report --models teacher,v2,my/folder,alt=other/folder

For every model present: parameters, size of the weights file, validation perplexity on the SAME
validation blocks (the teacher's data config), and greedy generation speed at batch 1 and batch 8
(fixed prompts cut from the validation text; every model decodes exactly the same number of tokens;
the models' timing rounds are interleaved and the median is kept). It states whether KD v2 beat the
CE-only v2, rewrites each model folder's README.md card with the measured numbers, and plots the
training curves (``runs/<name>/metrics.jsonl``) and perplexity against speed.

The measuring helpers (``perplexity``, ``decode_speed``, ``forward_flops_per_token``) are reused by
``benchmarks/bench_distill.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from python3_distillation.config import CONFIG_FILE, ConfigError, DataConfig, RunConfig, config_from_dict
from python3_distillation.data import Blocks, DataError
from python3_distillation.models import ModelError, count_parameters, is_model_dir, load_model, read_meta
from python3_distillation.paths import MODEL_DIRS
from python3_distillation.tokenizer import AssetError

EXIT_BAD_INPUT = 2
REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = "teacher,v1,v2,v2_ce"
REQUIRED = ("teacher", "v2")  # without these the report has nothing to compare
PROMPT_TOKENS = 16  # length of each prompt cut from the validation text
EVAL_BATCH = 8


# ----------------------------------------------------------------------------------------- models

@dataclass
class Entry:
    """One model of the report: where it is, what it is, and (once measured) its numbers."""

    label: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    meta: dict
    cfg: RunConfig | None
    results: dict = field(default_factory=dict)


def _folder_config(path: Path) -> RunConfig | None:
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        return None
    try:
        return config_from_dict(yaml.safe_load(f.read_text(encoding="utf-8")) or {})
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"{f}: {e}") from None


def resolve_models(spec: str) -> tuple[list[tuple[str, Path]], list[str]]:
    """``"teacher,v1,v2,v2_ce"`` / folders / ``label=folder`` → [(label, folder)] present, and notes.

    A bare folder is labelled with its config's ``name`` (so a folder trained with configs/v2.yaml is
    ``v2``). A missing teacher or v2 is an error; a missing v1 / v2_ce / other folder is skipped.
    """
    found, notes = [], []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "=" in item:
            label, folder = (s.strip() for s in item.split("=", 1))
            path = Path(folder).expanduser()
        elif item in MODEL_DIRS:
            label, path = item, MODEL_DIRS[item]
        else:
            path = Path(item).expanduser()
            cfg = _folder_config(path) if path.is_dir() else None
            label = cfg.name if cfg else path.name
        if not is_model_dir(path):
            if label in REQUIRED:
                raise ModelError(f"{label} model not found at {path}; train it first with `make run`")
            if label in MODEL_DIRS:
                what = {"v1": "train it with `make distill-v1`", "v2_ce": "train it with `make distill-v2-ce`; "
                        "without it the KD-vs-CE comparison is not made"}.get(label, "")
                notes.append(f"{label} skipped: no model at {path}" + (f" ({what})" if what else ""))
                continue
            raise ModelError(f"{path}: not a model folder (no config.json)")
        if label in (f[0] for f in found):
            raise ConfigError(f"--models: label {label!r} given twice; use label=folder to tell them apart")
        found.append((label, path))
    if not found:
        raise ConfigError("--models: no model to report on")
    return found, notes


def load_entry(label: str, path: Path) -> Entry:
    from python3_distillation.tokenizer import is_local_tokenizer_dir, load_tokenizer

    model = load_model(path).eval()
    tok = load_tokenizer(path if is_local_tokenizer_dir(path) else "gpt2")
    return Entry(label, Path(path), model, tok, read_meta(path), _folder_config(path))


def weights_bytes(path: str | Path) -> int:
    """Size of the weights file(s) in a model folder (``*.safetensors``, else ``*.bin``)."""
    path = Path(path)
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


# ------------------------------------------------------------------------------------------- FLOPs

def non_embedding_params(n_layer: int, n_embd: int, n_inner: int | None = None) -> int:
    """GPT-2 parameters outside the token/position embeddings: blocks + final norm.

    Per block: attention qkv (d·3d + 3d) and output (d² + d), MLP (d·f + f, f·d + d), two norms (4d).
    """
    d, f = n_embd, n_inner or 4 * n_embd
    per_block = 3 * d * d + 3 * d + d * d + d + d * f + f + f * d + d + 4 * d
    return n_layer * per_block + 2 * d


def forward_flops_per_token(n_layer: int, n_embd: int, vocab: int, ctx: float, n_inner: int | None = None) -> float:
    """Forward FLOPs for one token at context ``ctx``: 2·(non-embedding params + LM head) + 2·n_layer·ctx·n_embd.

    The LM head (``n_embd × vocab``, tied to the token embedding) is a real matrix product per token,
    so it is counted; the embedding lookups are not. The last term is attention's QKᵀ and AV.
    """
    return 2.0 * (non_embedding_params(n_layer, n_embd, n_inner) + n_embd * vocab) + 2.0 * n_layer * ctx * n_embd


def model_flops_per_token(config, ctx: float) -> float:
    return forward_flops_per_token(config.n_layer, config.n_embd, config.vocab_size, ctx, getattr(config, "n_inner", None))


# ------------------------------------------------------------------------------------- measuring

def device_label(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    n = torch.get_num_threads()
    return f"CPU, {n} thread{'s' if n > 1 else ''} (torch {torch.__version__})"


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


def perplexity(model, blocks: Blocks, batch_size: int = EVAL_BATCH, device=None) -> tuple[float, float]:
    """(mean next-token loss in nats, its exp) over every block, fp32, no autocast."""
    from python3_distillation.train import evaluate_loss

    loss = evaluate_loss(model, blocks, batch_size, 0, device=device or next(model.parameters()).device)
    return loss, math.exp(min(loss, 50.0))


def validation_prompts(tokenizer, blocks: Blocks, n: int = 8, n_tokens: int = PROMPT_TOKENS) -> list[str]:
    """``n`` fixed prompts: the first ``n_tokens`` tokens of blocks spread over the validation set."""
    prompts = []
    for i in range(n):
        ids = blocks.ids[i * len(blocks) // n, :n_tokens].tolist()
        text = tokenizer.decode(ids)
        prompts.append(text if text.strip() else "It is a truth universally acknowledged")
    return prompts


def interleaved(jobs: dict, rounds: int) -> dict[object, list[float]]:
    """Seconds of each job (a no-argument callable) over ``rounds`` interleaved rounds.

    One untimed warm-up of each first; the order rotates every round so no job always runs first.
    """
    keys = list(jobs)
    for k in keys:
        jobs[k]()
    times: dict[object, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            _sync()
            t0 = time.perf_counter()
            jobs[k]()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return times


def decode_speed(generators: dict, prompts: dict[int, list[str]] | list[str], new_tokens: int,
                 rounds: int) -> dict:
    """Greedy generation tokens/s of every generator at every batch, interleaved rounds, median.

    ``prompts`` is one batch of prompts or ``{batch size: prompts}``; the result is keyed by name, or
    by ``(name, batch size)`` for a dict. EOS is ignored so every row of every model decodes exactly
    ``new_tokens`` tokens: the models do the same work.
    """
    from python3_distillation.generate import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    batches = prompts if isinstance(prompts, dict) else {None: prompts}
    counts: dict = {}

    def job(name, bs):
        def f():
            out = generators[name].generate(batches[bs], params, truncate=True)
            counts[name, bs] = sum(c.completion_tokens for c in out)
        return f

    jobs = {(n, bs): job(n, bs) for bs in batches for n in generators}
    saved = {n: g.eos_token_id for n, g in generators.items()}
    try:
        for g in generators.values():
            g.eos_token_id = None
        times = interleaved(jobs, rounds)
    finally:
        for n, g in generators.items():
            g.eos_token_id = saved[n]
    return {(k if isinstance(prompts, dict) else k[0]): counts[k] / statistics.median(v) for k, v in times.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_perplexities(pairs: list[tuple[str, Path]], max_blocks: int | None = None) -> dict[str, float]:
    """Validation perplexity of each folder on the same blocks (the teacher's data config)."""
    entries = [load_entry(label, path) for label, path in pairs]
    data_cfg, seed = eval_data_config(entries)
    blocks = validation_blocks(entries, data_cfg, data_cfg.max_eval_blocks if max_blocks is None else max_blocks, seed)
    return {e.label: perplexity(e.model, blocks)[1] for e in entries}


# ------------------------------------------------------------------------------------------- logs

def run_dir_of(entry: Entry) -> Path | None:
    if entry.cfg is None:
        return None
    d = entry.cfg.run_dir
    for candidate in ([d] if d.is_absolute() else [Path.cwd() / d, REPO / d]):
        if (candidate / "metrics.jsonl").exists():
            return candidate
    return None


def read_metrics(run_dir: Path | None) -> list[dict]:
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return []
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return rows


# ------------------------------------------------------------------------------------------ plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(curves: dict[str, list[dict]], out: Path) -> None:
    """Train cross-entropy (the students' total loss mixes in the KL, so CE is what compares) and
    validation loss against step, one colour per run."""
    plt = _pyplot()
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn = False
    for i, (label, rows) in enumerate(curves.items()):
        color = f"C{i}"
        train = [(r["step"], r.get("ce", r.get("loss"))) for r in rows if r.get("ce", r.get("loss")) is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if train:
            ax_t.plot(*zip(*train), color=color, label=label)
            drawn = True
        if val:
            ax_v.plot(*zip(*val), "o-", color=color, label=label)
            drawn = True
    for ax, title in ((ax_t, "train cross-entropy (nats/token)"), (ax_v, "validation loss (nats/token)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if not drawn:
        fig.text(0.5, 0.5, "no training logs found (runs/<name>/metrics.jsonl)", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_ppl_vs_speed(models: dict[str, dict], out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (label, m) in enumerate(models.items()):
        ax.scatter(m["tok_s_b1"], m["val_ppl"], s=60, color=f"C{i}")
        ax.annotate(f"{label} ({m['n_layer']}L)", (m["tok_s_b1"], m["val_ppl"]), textcoords="offset points",
                    xytext=(6, 6))
    ax.set_xlabel("greedy generation, batch 1 (tokens/s)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("perplexity vs speed (lower right is better)")
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


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
    if ratio < 1:
        verdict = (f"KD v2 beat CE-only v2 {steps}: validation perplexity {kd['val_ppl']:.2f} vs {ce['val_ppl']:.2f}, "
                   f"ratio {ratio:.3f} ({(1 - ratio) * 100:.1f}% lower).")
    else:
        verdict = (f"KD v2 did NOT beat CE-only v2 {steps}: validation perplexity {kd['val_ppl']:.2f} vs "
                   f"{ce['val_ppl']:.2f}, ratio {ratio:.3f} ({(ratio - 1) * 100:.1f}% higher).")
    return {"kd_beats_ce": ratio < 1, "ppl_ratio_kd_over_ce": ratio, "equal_steps": equal,
            "kd_steps": kd.get("train_steps"), "ce_steps": ce.get("train_steps"), "statement": verdict}


def _num(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _init_text(m: dict) -> str:
    init = m.get("init") or {}
    if m.get("stage") == "teacher":
        return m.get("teacher_init") or "teacher"
    text = init.get("init", "?")
    if init.get("layers"):
        text += f" blocks {init['layers']}"
    return text


def render_markdown(report: dict) -> str:
    models, s = report["models"], report["settings"]
    lines = [
        "# Distillation report",
        "",
        f"Measured {report['date']} on {report['device']}, all models in one run. Validation: "
        f"{s['eval_blocks']} blocks × {s['block_size']} tokens of `{s['data']}` (the teacher's data config; "
        f"the same blocks for every model), fp32. Speed: greedy, {s['new_tokens']} new tokens after "
        f"{PROMPT_TOKENS}-token prompts from the validation text, EOS ignored, median of {s['rounds']} "
        "interleaved rounds." + (" **Quick run** (fewer blocks, tokens and rounds)." if s.get("quick") else ""),
        "",
        "| model | layers | params | size MB | val ppl | ppl × teacher | tok/s b1 | tok/s b8 | speed-up vs teacher (b1 / b8) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in models.items():
        speed = (f"{m['speedup_b1']:.2f}× / {m['speedup_b8']:.2f}×" if m.get("speedup_b1") is not None else "n/a")
        lines.append(f"| {label} | {m['n_layer']} | {m['n_params'] / 1e6:.2f}M | {m['size_mb']:.1f} | "
                     f"{m['val_ppl']:.2f} | {_num(m.get('ppl_x_teacher'), '.3f')} | {m['tok_s_b1']:.1f} | "
                     f"{m['tok_s_b8']:.1f} | {speed} |")
    ideal = [f"{label} {m['ideal_speedup']:.2f}×" for label, m in models.items()
             if m.get("ideal_speedup") is not None and label != "teacher"]
    if ideal:
        lines += ["", "Ideal batch-1 speed-up from forward FLOPs per token (the 50k-vocabulary LM head stays in "
                  "every student): " + ", ".join(ideal) + "."]
    lines += ["", "## KD vs CE-only", ""]
    kc = report.get("kd_vs_ce")
    lines.append(kc["statement"] if kc else "Not compared: v2 and v2_ce are both needed.")
    lines += ["", "## Training", "", "| model | init | steps | tokens | seconds | loss |", "|---|---|---:|---:|---:|---|"]
    for label, m in models.items():
        loss = ("CE" if m.get("stage") == "teacher" else
                "CE only" if not m.get("alpha_kd") else
                f"{m['alpha_kd']}·T²·KL (T={m.get('temperature')}) + {m.get('alpha_ce')}·CE")
        lines.append(f"| {label} | {_init_text(m)} | {_num(m.get('train_steps'), ',')} | "
                     f"{_num(m.get('train_tokens'), ',')} | {_num(m.get('train_seconds'), '.0f')} | {loss} |")
    lines += ["", "![training curves](training_curves.png)", "", "![perplexity vs speed](ppl_vs_speed.png)", ""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def build_report(pairs: list[tuple[str, Path]], out_dir: Path, max_eval_blocks: int | None = None,
                 quick: bool = False, notes: list[str] | None = None, update_cards: bool = True) -> dict:
    """Measure every model side by side and write report.md / report.json / the two plots."""
    from python3_distillation.cards import model_card
    from python3_distillation.generate import Generator, default_device
    from python3_distillation.models import update_model_files

    notes = list(notes or [])
    device = default_device()
    entries = [load_entry(label, path) for label, path in pairs]
    data_cfg, seed = eval_data_config(entries)
    if max_eval_blocks is None:
        max_eval_blocks = min(data_cfg.max_eval_blocks or 32, 32) if quick else data_cfg.max_eval_blocks
    blocks = validation_blocks(entries, data_cfg, max_eval_blocks, seed)
    new_tokens, rounds = (16, 2) if quick else (32, 5)
    ctx = min(e.model.config.n_positions for e in entries)
    new_tokens = max(1, min(new_tokens, ctx - PROMPT_TOKENS))

    gens = {e.label: Generator(e.model, e.tokenizer, device=device, name=e.label) for e in entries}
    for e in entries:
        loss, ppl = perplexity(e.model, blocks, device=device)
        e.results.update(val_loss=loss, val_ppl=ppl)
        print(f"{e.label}: validation perplexity {ppl:.2f}", file=sys.stderr)
    prompts = validation_prompts(entries[0].tokenizer, blocks, 8)
    # One timing round holds every model at both batch sizes, so drift hits them all alike.
    speed = decode_speed(gens, {1: prompts[:1], 8: prompts}, new_tokens, rounds)

    teacher = next((e for e in entries if e.label == "teacher"), None)
    prompt_len = statistics.mean(len(e) for e in entries[0].tokenizer(prompts)["input_ids"])
    mean_ctx = prompt_len + new_tokens / 2
    models: dict[str, dict] = {}
    for e in entries:
        m, meta = e.model, e.meta
        row = {
            "path": str(e.path), "stage": meta.get("stage") or (e.cfg.stage if e.cfg else None),
            "n_layer": m.config.n_layer, "n_embd": m.config.n_embd, "n_params": count_parameters(m),
            "size_mb": weights_bytes(e.path) / 1e6,
            "val_loss": e.results["val_loss"], "val_ppl": e.results["val_ppl"],
            "tok_s_b1": speed[e.label, 1], "tok_s_b8": speed[e.label, 8],
            "flops_per_token": model_flops_per_token(m.config, mean_ctx),
            "init": meta.get("student_init"), "teacher_init": meta.get("init"),
            "train_steps": meta.get("train_steps"), "train_tokens": meta.get("train_tokens"),
            "train_seconds": meta.get("train_seconds"), "alpha_kd": meta.get("alpha_kd"),
            "alpha_ce": meta.get("alpha_ce"), "temperature": meta.get("temperature"),
        }
        models[e.label] = row
    if teacher is not None:
        t = models["teacher"]
        for row in models.values():
            row["ppl_x_teacher"] = row["val_ppl"] / t["val_ppl"]
            row["speedup_b1"] = row["tok_s_b1"] / t["tok_s_b1"]
            row["speedup_b8"] = row["tok_s_b8"] / t["tok_s_b8"]
            row["ideal_speedup"] = t["flops_per_token"] / row["flops_per_token"]
    else:
        notes.append("no teacher in --models: the × teacher columns are n/a")

    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_label(device),
        "settings": {"data": data_cfg.train, "block_size": data_cfg.block_size, "eval_blocks": len(blocks),
                     "eval_tokens": blocks.n_tokens, "new_tokens": new_tokens, "rounds": rounds,
                     "prompts": prompts, "quick": quick},
        "models": models,
        "kd_vs_ce": kd_vs_ce(models),
        "notes": notes,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {e.label: read_metrics(run_dir_of(e)) for e in entries}
    plot_training_curves({k: v for k, v in curves.items() if v}, out_dir / "training_curves.png")
    plot_ppl_vs_speed(models, out_dir / "ppl_vs_speed.png")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")

    if update_cards:
        for e in entries:
            row = models[e.label]
            measured = {"size_mb": row["size_mb"], "decode_tok_s_b1": row["tok_s_b1"],
                        "decode_tok_s_b8": row["tok_s_b8"], "device": report["device"]}
            # The card shows this report's perplexity (fp32, the shared blocks), not the bf16 training eval.
            meta = {**e.meta, "val_ppl": row["val_ppl"]}
            if "teacher" in models and e.label != "teacher":
                meta["teacher_val_ppl"] = models["teacher"]["val_ppl"]
            name = e.cfg.name if e.cfg else e.label
            update_model_files(e.path, card=model_card(name, meta, e.cfg, measured))
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
    try:
        if args.max_eval_blocks is not None and args.max_eval_blocks < 0:
            raise ConfigError("--max-eval-blocks must be ≥ 0 (0 = all)")
        pairs, notes = resolve_models(args.models)
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        report = build_report(pairs, Path(args.out), args.max_eval_blocks, args.quick, notes)
    except (ConfigError, DataError, ModelError, AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    text = render_markdown(report)
    print(text.split("\n## Training")[0].rstrip())
    print(f"\nwritten: {os.path.join(args.out, 'report.md')}, report.json, training_curves.png, ppl_vs_speed.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
