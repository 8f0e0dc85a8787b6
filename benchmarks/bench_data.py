"""Token shards at scale: tokenize a few hundred MB of generated text into shards and read every block back,
each in a fresh process with its anonymous memory capped, measuring throughput and peak RSS.

    HF_HUB_OFFLINE=1 python benchmarks/bench_data.py [--quick] [--mb 400]

The corpus is Jane Austen's paragraphs with their words shuffled (her vocabulary, so GPT-2's ~4.4
bytes a token, but no document repeated), written as a folder of ``.txt`` files under a temporary
folder. Each measurement runs ``data.prepare_tokens`` with the
defaults (pieces of 8 MiB of text per process, processes from the CPU count), then gathers every
1,024-token block once in ``batch_indices`` order, batch 8, as training reads them. A child process
pays the one-time costs (imports, the tokenizer's caches) on a 2 MB sample first, then caps its
anonymous memory with ``RLIMIT_DATA`` at its size plus ``cap`` MiB, one tenth of what the train split
would take as one int64 tensor; ``VmHWM`` (peak RSS) is read from /proc after a reset
(``/proc/self/clear_refs``), the workers' peak from ``RUSAGE_CHILDREN``. The same run at a quarter
of the size shows whether the peak grows with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere without installing the package
    sys.path.insert(0, str(REPO))

FULL_MB, QUICK_MB = 400, 24
FILE_MB = 50  # the corpus is a folder of files this size
BLOCK, BATCH = 1024, 8  # GPT-2's context, a small training batch
CAP_RATIO = 10  # the cap is a tenth of the train split as an int64 tensor
# Sizes the cap before the corpus is tokenized: GPT-2 takes ~4.42 bytes a token of this text (measured);
# counting 4.6 keeps the cap under a tenth of the tensor.
TOKENS_PER_BYTE = 1 / 4.6
MIN_CAP_MB = 48  # a quick run's corpus is too small for a tenth of it to hold a piece in flight


def make_corpus(folder: Path, mb: float, seed: int = 0) -> int:
    """``mb`` MiB of documents (one a line) from Austen's paragraphs with shuffled words; returns bytes."""
    from python3_distillation.corpus import build_austen_corpus
    from python3_distillation.paths import data_dir

    paragraphs = [p.split() for p in build_austen_corpus(data_dir())["train"].read_text(encoding="utf-8").splitlines()
                  if len(p.split()) > 8]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total, target, index = 0, int(mb * 2**20), 0
    while total < target:
        with (folder / f"part-{index:03d}.txt").open("w", encoding="utf-8") as f:
            written = 0
            while written < FILE_MB * 2**20 and total + written < target:
                words = rng.choice(paragraphs)[:]
                rng.shuffle(words)
                line = " ".join(words) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
        total += written
        index += 1
    return total


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0) and return that RSS in KB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _kb("VmRSS")


def child(corpus: Path, work: Path, cap_mb: int, num_proc: int | None) -> dict:
    """In a fresh process: prepare the corpus and read every block, under the cap. Returns the figures."""
    from python3_distillation import data
    from python3_distillation.config import DataConfig
    from python3_distillation.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2")
    sample = work / "sample"
    files = sorted(corpus.glob("*.txt"))
    sample.mkdir(parents=True, exist_ok=True)
    with files[0].open("rb") as f:
        (sample / "sample.txt").write_bytes(f.read(2 << 20).rsplit(b"\n", 1)[0] + b"\n")
    data.prepare_tokens(DataConfig(train=str(sample)), tok, data_dir=work / "warm", num_proc=num_proc)

    cap = _kb("VmData") * 1024 + (cap_mb << 20)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    base = _reset_peak()
    t0 = time.perf_counter()
    shards = data.prepare_tokens(DataConfig(train=str(corpus), validation_fraction=0.005), tok, data_dir=work,
                                 num_proc=num_proc)
    prep_s = time.perf_counter() - t0
    prep_peak = _kb("VmHWM")
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB on Linux

    base_read = _reset_peak()
    blocks = shards.blocks("train", BLOCK)
    n = len(blocks)
    t0 = time.perf_counter()
    checksum = 0
    for step in range(n // BATCH):
        checksum += int(blocks.ids[data.batch_indices(n, BATCH, step, seed=0)][:, 0].sum())
    read_s = time.perf_counter() - t0
    m = shards.manifest
    return {
        "baseline_rss_mb": base / 1024, "cap_mb": cap_mb,
        "prep_seconds": prep_s, "prep_peak_mb": prep_peak / 1024, "prep_growth_mb": (prep_peak - base) / 1024,
        "workers_peak_mb": workers_peak / 1024, "num_proc": m["num_proc"],
        "read_seconds": read_s, "read_growth_mb": (_kb("VmHWM") - base_read) / 1024, "blocks": n, "checksum": checksum,
        "tokens": {s: m["splits"][s]["tokens"] for s in m["splits"]},
        "documents": {s: m["splits"][s]["documents"] for s in m["splits"]},
        "shard_bytes": sum(m["splits"][s]["bytes"] for s in m["splits"]),
    }


def measure(corpus: Path, work: Path, cap_mb: int, num_proc: int | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(corpus), str(work), str(cap_mb)]
    if num_proc:
        cmd += ["--num-proc", str(num_proc)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        raise RuntimeError(f"the capped child failed (exit {proc.returncode}): {' | '.join(tail)[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(metric: str, value, unit: str, note: str, target: str | None = None, met: bool | None = None) -> dict:
    return {"metric": metric, "value": round(value, 3) if isinstance(value, float) else value, "unit": unit,
            "target": target, "met": met, "note": note}


def run(quick: bool = False, mb: float | None = None) -> dict:
    mb = mb or (QUICK_MB if quick else FULL_MB)
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        results = {}
        for label, size in (("quarter", mb / 4), ("full", mb)):
            corpus = root / f"corpus-{label}"
            n_bytes = make_corpus(corpus, size, seed=1)
            # A tenth of the train split as int64 (8 bytes a token), from GPT-2's bytes per token;
            # the same cap for both sizes, so the quarter run shows the headroom.
            cap_mb = max(MIN_CAP_MB, int(mb * 2**20 * TOKENS_PER_BYTE * 8 / CAP_RATIO / 2**20))
            r = measure(corpus, root / f"work-{label}", cap_mb)
            r["text_bytes"] = n_bytes
            results[label] = r
            shutil.rmtree(corpus, ignore_errors=True)
            shutil.rmtree(root / f"work-{label}", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    full, quarter = results["full"], results["quarter"]
    train_tokens = full["tokens"]["train"]
    all_tokens = sum(full["tokens"].values())
    tensor_mb = train_tokens * 8 / 2**20
    text_mb = full["text_bytes"] / 2**20
    rows = [
        _row("corpus", text_mb, "MiB", f"generated text in {FILE_MB} MiB files: {sum(full['documents'].values()):,} "
             f"documents, {all_tokens / 1e6:.1f}M GPT-2 tokens ({full['text_bytes'] / all_tokens:.2f} bytes/token)"),
        _row("prepare: text throughput", text_mb / full["prep_seconds"], "MiB/s",
             f"{full['prep_seconds']:.1f} s with {full['num_proc']} tokenizing process{'es' if full['num_proc'] > 1 else ''}; "
             f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs after the run"),
        _row("prepare: token throughput", all_tokens / full["prep_seconds"] / 1e6, "M tokens/s", "both splits"),
        _row("shard size", full["shard_bytes"] / all_tokens * 1e6 / 2**20, "MiB per M tokens",
             f"uint16 ids, no header ({full['shard_bytes'] / 2**20:.1f} MiB for the corpus; the text was {text_mb:.1f} MiB)"),
        _row("train split as one int64 tensor", tensor_mb, "MiB", f"{train_tokens:,} tokens × 8 bytes"),
        _row("anonymous-memory cap (RLIMIT_DATA) ÷ that tensor", full["cap_mb"] / tensor_mb, "×",
             f"{full['cap_mb']} MiB above the warmed-up process; prepare and read ran under it",
             target=f"<= {1 / CAP_RATIO:.2f}", met=full["cap_mb"] / tensor_mb <= 1 / CAP_RATIO),
        _row("prepare: peak RSS growth", full["prep_growth_mb"], "MiB",
             f"over the warmed-up process ({full['baseline_rss_mb']:.0f} MiB: torch, transformers, datasets, the tokenizer); "
             f"peak RSS {full['prep_peak_mb']:.0f} MiB", target=f"< cap ({full['cap_mb']} MiB)",
             met=full["prep_growth_mb"] < full["cap_mb"]),
    ]
    if full["num_proc"] > 1:
        rows.append(_row("prepare: peak RSS of a tokenizing worker", full["workers_peak_mb"], "MiB",
                         "forked from the main process, so its RSS counts the pages it shares with it"))
    rows += [
        _row("prepare: peak RSS growth at a quarter of the corpus", quarter["prep_growth_mb"], "MiB",
             f"{quarter['text_bytes'] / 2**20:.0f} MiB of text; the full corpus grew {full['prep_growth_mb']:.1f} MiB",
             target="full within 8 MiB of it", met=full["prep_growth_mb"] - quarter["prep_growth_mb"] < 8),
        _row("read every block: peak RSS growth", full["read_growth_mb"], "MiB",
             f"{full['blocks']:,} blocks of {BLOCK} in batches of {BATCH}, batch_indices order (one epoch)",
             target="< 16", met=full["read_growth_mb"] < 16),
        _row("read: blocks per second", full["blocks"] / full["read_seconds"], "blocks/s",
             f"{full['blocks'] * BLOCK / full['read_seconds'] / 1e6:.1f}M tokens/s gathered into int64 tensors"),
    ]
    return {"section": "Token shards (data at scale)", "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_MB} MiB of text instead of {FULL_MB}")
    ap.add_argument("--mb", type=float, help="MiB of text (overrides --quick)")
    ap.add_argument("--child", nargs=3, metavar=("CORPUS", "WORK", "CAP_MB"), help=argparse.SUPPRESS)
    ap.add_argument("--num-proc", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        corpus, work, cap_mb = args.child
        print(json.dumps(child(Path(corpus), Path(work), int(cap_mb), args.num_proc)))
        return
    print(json.dumps(run(quick=args.quick, mb=args.mb), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
