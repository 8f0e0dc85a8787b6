"""Offline KD: distilling from the cached teacher (``distill.teacher_cache``) vs the live teacher.

    HF_HUB_OFFLINE=1 GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/bench_cache.py [--quick]

Teacher: the embedded one (``python3_distillation/gpt2_teacher``, 12L d256) when ``make run`` has
trained it, else a 4-layer d128 GPT-2 trained here first on the same text (the note says which).
Data: the first ~1 MB of the Austen training novels (~0.25M tokens; the quick run ~128 kB) and the
first 96 kB of *Persuasion* for validation, 256-token blocks; student: v2's recipe (half the
teacher's blocks, T = 2, 0.5·KL·T² + 0.5·CE), top-64 cache.

1. ``cache-teacher`` once: seconds, tokens/s, and the cache's size per million tokens.
2. Step throughput: the training step of ``train()`` (accelerate autocast, backward, clip, fused
   AdamW) with the kd term from the live teacher and from the cache, alternating steps in one
   process, median.
3. Two real ``distill`` runs of equal steps, each in its own process (live, cache; then a CE-only
   run for what KD buys): peak RSS over the training steps (``VmHWM`` reset after step 1, read at
   the last step; on CUDA also ``max_memory_allocated``) and the student's validation perplexity.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere without installing the package
    sys.path.insert(0, str(REPO))

TOP_K = 64
TRAIN_BYTES, QUICK_TRAIN_BYTES, VAL_BYTES = 1 << 20, 128 << 10, 96 << 10
STEPS, QUICK_STEPS = 120, 12  # distillation steps of each end-to-end run
SPEEDUP = 1.2  # cached ÷ live step throughput wanted: the teacher's forward is skipped
PPL_RATIO = 1.05  # cached-KD student perplexity within 5% of the live-KD student's
SMALL_TEACHER = {"n_layer": 4, "n_embd": 128, "n_head": 4}
SMALL_TEACHER_STEPS, QUICK_TEACHER_STEPS = 300, 30


def _row(metric: str, value, unit: str, note: str = "", target: str | None = None, met: bool | None = None) -> dict:
    return {"metric": metric, "value": None if value is None else round(float(value), 4), "unit": unit,
            "target": target, "met": met, "note": note}


def _head(src: Path, dest: Path, n_bytes: int) -> Path:
    """The first whole lines (paragraphs) of ``src`` up to ``n_bytes``."""
    out, size = [], 0
    for line in src.read_text(encoding="utf-8").splitlines(keepends=True):
        if size + len(line.encode()) > n_bytes:
            break
        out.append(line)
        size += len(line.encode())
    dest.write_text("".join(out), encoding="utf-8")
    return dest


def _config(work: Path, teacher: Path, quick: bool, name: str, *extra: str):
    from python3_distillation.config import load_config

    steps = QUICK_STEPS if quick else STEPS
    n_teacher = json.loads((Path(teacher) / "config.json").read_text())["n_layer"]
    return load_config(["v2"], [
        f"name={name}", f"teacher.path={teacher}", f"student.n_layer={n_teacher // 2}", f"student.output_dir={work / 'students' / name}",
        f"train.run_dir={work / 'runs' / name}", f"data.train={work / 'train.txt'}",
        f"data.validation={work / 'validation.txt'}", f"train.max_steps={steps}", "train.eval_every=0",
        "train.save_every=0", f"train.warmup_steps={max(1, steps // 10)}", "data.max_eval_blocks=0",
        f"distill.cache_top_k={TOP_K}", f"distill.teacher_cache={work / 'cache'}", *extra])


def _teacher(work: Path, quick: bool) -> tuple[Path, str]:
    from python3_distillation.config import load_config
    from python3_distillation.models import is_model_dir, read_meta
    from python3_distillation.paths import model_dir
    from python3_distillation.teacher import run_teacher

    trained = model_dir("teacher")
    if is_model_dir(trained):
        return trained, f"the embedded teacher ({read_meta(trained).get('n_layer', '?')} layers, trained by make run)"
    steps = QUICK_TEACHER_STEPS if quick else SMALL_TEACHER_STEPS
    shape = [f"teacher.{k}={v}" for k, v in SMALL_TEACHER.items()]
    cfg = load_config(["teacher"], ["name=bench-cache-teacher", f"teacher.path={work / 'teacher'}",
                                    f"train.run_dir={work / 'runs' / 'teacher'}", f"data.train={work / 'train.txt'}",
                                    f"data.validation={work / 'validation.txt'}", f"train.max_steps={steps}",
                                    "train.eval_every=0", "train.save_every=0", "train.warmup_steps=20", *shape])
    run_teacher(cfg)
    return work / "teacher", (f"no trained embedded teacher: a {SMALL_TEACHER['n_layer']}L d{SMALL_TEACHER['n_embd']} "
                              f"GPT-2 trained here for {steps} steps on the same text")


# ------------------------------------------------------------------------------------ 2. step speed

def throughput_rows(work: Path, teacher_dir: Path, quick: bool, cache) -> list[dict]:
    from accelerate import Accelerator

    from python3_distillation.data import batch_indices, load_blocks
    from python3_distillation.distill import make_distill_loss
    from python3_distillation.evaluation import measure as ev
    from python3_distillation.models import build_student, open_model
    from python3_distillation.device_plan import decide, pick_device
    from python3_distillation.train import make_batch, make_optimizer

    cfg = _config(work, teacher_dir, quick, "bench-cache-speed")
    tc, dc = cfg.train, cfg.distill
    teacher, tokenizer, _ = open_model(teacher_dir)
    blocks = load_blocks(cfg.data, tokenizer, seed=tc.seed)["train"]
    student0, _ = build_student(teacher, cfg.student.n_layer, "teacher", seed=tc.seed)
    precision = decide(tc.mixed_precision, pick_device())
    acc = Accelerator(mixed_precision=precision.mode, cpu=pick_device().type == "cpu")
    teacher.to(acc.device)
    models, opts, losses = {}, {}, {}
    for name, loss in (("live", make_distill_loss(teacher, dc)), ("cache", make_distill_loss(None, dc, cache=cache))):
        student = copy.deepcopy(student0).train()
        models[name], opts[name] = acc.prepare(student, make_optimizer(student, tc))
        losses[name] = loss
    step = {"live": 0, "cache": 0}

    def make_step(name):
        def run():
            idx = batch_indices(len(blocks), tc.batch_size, step[name], tc.seed)
            step[name] += 1
            batch = make_batch(blocks, idx, acc.device)
            with acc.autocast():
                loss, _ = losses[name](models[name], batch)
                acc.backward(loss)
                acc.clip_grad_norm_(models[name].parameters(), tc.grad_clip)
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
        return run

    rounds = 3 if quick else 12
    times = ev.interleaved({"live": make_step("live"), "cache": make_step("cache")}, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = tc.batch_size * cfg.data.block_size
    speedup = med["live"] / med["cache"]
    setup = (f"teacher {teacher.config.n_layer}L d{teacher.config.n_embd} → student {student0.config.n_layer}L, batch "
             f"{tc.batch_size}×{cfg.data.block_size}, precision {precision.label}, median of {rounds} alternating steps")
    return [
        _row("distill step, live teacher", tokens / med["live"], "tok/s", setup),
        _row("distill step, from the cache", tokens / med["cache"], "tok/s",
             f"top-{cache.top_k} rows read from disk per batch + the bucketed KL; no teacher forward"),
        _row("step throughput cache ÷ live", speedup, "×", "ratio of median step times", f">= {SPEEDUP}",
             speedup >= SPEEDUP),
    ]


# ------------------------------------------------------------------------------ 3. end-to-end runs

def child(mode: str, work: Path, teacher_dir: Path, quick: bool) -> dict:
    """One real distillation run (in its own process): peak memory over the steps, final perplexity."""
    from python3_distillation.distill import run_distill

    extra = {"live": ["distill.teacher_cache="], "cache": [],
             "ce": ["distill.teacher_cache=", "distill.alpha_kd=0", "distill.alpha_ce=1"]}[mode]
    cfg = _config(work, teacher_dir, quick, f"bench-cache-{mode}", *extra)
    cuda = torch.cuda.is_available()
    peak: dict = {}

    def on_step(step: int) -> None:
        if step == 1:  # past the first step's one-time allocations; the teacher (if any) is in memory
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        if step == cfg.train.max_steps:
            status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
            peak["rss_mib"] = int(status["VmHWM"].split()[0]) / 1024
            if cuda:
                peak["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20

    t0 = time.perf_counter()
    out = run_distill(cfg, on_step=on_step)
    meta = json.loads((out / "distill_meta.json").read_text())
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tok_per_s"] for r in rows if "tok_per_s" in r][1:]  # the first window holds warm-up
    return {"mode": mode, "val_ppl": meta["val_ppl"], "steps": meta["train_steps"], "tokens": meta["train_tokens"],
            "train_seconds": meta["train_seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
            "tok_per_s": statistics.median(tps) if tps else None, **peak}


def run_child(mode: str, work: Path, teacher_dir: Path, quick: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--work", str(work), "--teacher",
           str(teacher_dir)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mean_tail_mass(cache) -> float:
    import numpy as np

    tails = [np.fromfile(f, dtype=np.float32) for f in sorted(cache.folder.glob("shard-*.tail"))]
    return float(np.exp(np.concatenate(tails).astype(np.float64)).mean())


def run(quick: bool = False) -> dict:
    from python3_distillation.corpus import build_austen_corpus
    from python3_distillation.paths import data_dir
    from python3_distillation.teacher_cache import bytes_per_position, cache_teacher

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        austen = build_austen_corpus(data_dir())
        _head(austen["train"], work / "train.txt", QUICK_TRAIN_BYTES if quick else TRAIN_BYTES)
        _head(austen["validation"], work / "validation.txt", VAL_BYTES)
        teacher_dir, teacher_note = _teacher(work, quick)

        cfg = _config(work, teacher_dir, quick, "bench-cache")
        t0 = time.perf_counter()
        cache = cache_teacher(cfg)
        seconds = time.perf_counter() - t0
        tokens = cache.n_blocks * cache.block_size
        per_m = cache.n_bytes / tokens * 1e6 / 2**20
        rows = [
            _row("cache-teacher", tokens / seconds, "tok/s",
                 f"{tokens:,} positions in {seconds:.1f} s ({cache.manifest['precision']}); {teacher_note}"),
            _row("cache size per million tokens", per_m, "MiB",
                 f"top-{TOP_K}: {bytes_per_position(TOP_K)} bytes a position (fp16 log-prob + int32 id per token, "
                 f"fp32 tail); the uint16 token shards take 1.9 MiB"),
            _row(f"teacher mass outside its top {TOP_K}", _mean_tail_mass(cache), "",
                 f"mean over the cached positions at T={cache.temperature:g}: what the tail bucket folds together, "
                 "its shape lost to the student"),
        ]
        rows += throughput_rows(work, teacher_dir, quick, cache)

        runs = {mode: run_child(mode, work, teacher_dir, quick) for mode in ("live", "cache", "ce")}
        live, cached, ce = runs["live"], runs["cache"], runs["ce"]
        steps = f"{live['steps']} steps of {cfg.train.batch_size}×{cfg.data.block_size} tokens each, run one after another"
        for mode, label in (("live", "live teacher"), ("cache", "from the cache")):
            r = runs[mode]
            rows.append(_row(f"end-to-end: {label}", r["tok_per_s"], "tok/s",
                             f"median of the logged windows after the first; {r['train_seconds']} s of steps; {steps}"))
        rows.append(_row("peak RSS over the steps, live teacher", live["rss_mib"], "MiB",
                         "VmHWM reset after step 1, read at the last step (teacher weights + its logits per batch)"))
        rows.append(_row("peak RSS over the steps, from the cache", cached["rss_mib"], "MiB",
                         "the teacher was let go once the student was built from it", "< live",
                         cached["rss_mib"] < live["rss_mib"]))
        if "cuda_mib" in live:
            rows.append(_row("peak CUDA memory, live → cache", cached["cuda_mib"], "MiB",
                             f"live {live['cuda_mib']:.0f} MiB", "< live", cached["cuda_mib"] < live["cuda_mib"]))
        ratio = cached["val_ppl"] / live["val_ppl"]
        rows += [
            _row("student val ppl, live teacher", live["val_ppl"], "", f"after {live['steps']} steps (validation: "
                 "the first 96 kB of Persuasion)"),
            _row("student val ppl, from the cache", cached["val_ppl"], "", f"top-{TOP_K} buckets + tail, same steps"),
            _row("student val ppl, CE only", ce["val_ppl"], "", "the same student and steps without the kd term"),
            _row("val ppl cache ÷ live", ratio, "×", "equal steps, same data order and init", f"<= {PPL_RATIO}",
                 ratio <= PPL_RATIO),
            _row("share of live KD's gain kept by the cache", (ce["val_ppl"] - cached["val_ppl"]) /
                 (ce["val_ppl"] - live["val_ppl"]), "", "(CE-only ppl − cache ppl) ÷ (CE-only ppl − live ppl)"),
        ]
    return {"section": "Offline KD: cached teacher vs live teacher", "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small corpus, a few steps (a smoke run)")
    ap.add_argument("--child", choices=["live", "cache", "ce"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        result = child(args.child, Path(args.work), Path(args.teacher), args.quick)
        print(json.dumps(result))
        return
    print(json.dumps(run(quick=args.quick), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
