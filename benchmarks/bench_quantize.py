"""int8 v2 against fp32 v2: decode speed in the project's generator, perplexity, agreement, file size.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python benchmarks/bench_quantize.py [--quick]

Both models are timed in one process, interleaved (greedy, EOS ignored, the same prompts), at batch
1 and batch 8, on CPU. Quality is measured on the held-out validation blocks the report uses
(perplexity of each, and the share of positions where the int8 model's top-1 token is fp32's).
Two int8 variants are measured, because the LM head is a choice: everything int8 (the default:
the tied 50,257-row embedding is most of the bytes), and the head kept in fp32. Uses the trained
v2 student when there is one; otherwise a random v2-shaped model (speed and size only).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from python3_distillation.evaluation import measure  # noqa: E402
from python3_distillation.generation import Generator  # noqa: E402
from python3_distillation.int8 import WEIGHTS_FILE  # noqa: E402
from python3_distillation.models import open_model  # noqa: E402
from python3_distillation.quantize import run_quantize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPTS, student_folder  # noqa: E402

TARGETS = {"speed": 2.5, "ppl": 1.03, "size": 0.3}


def _row(metric, value, unit="", note="", target=None, met=None) -> dict:
    return {"metric": metric, "value": value, "unit": unit, "target": target, "met": met, "note": note}


def run(quick: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    src, what = student_folder(work)
    trained = what.startswith("trained")
    variants = {"int8": run_quantize(src, work / "int8", head=True, measure=False),
                "int8, fp32 head": run_quantize(src, work / "int8-head-fp32", head=False, measure=False)}
    threads = torch.get_num_threads()
    fp32, tok, _ = open_model(src)
    models = {"fp32": fp32, **{k: open_model(v).model for k, v in variants.items()}}
    gens = {k: Generator(m, tok, device="cpu", name=k) for k, m in models.items()}
    new_tokens, rounds = (16, 2) if quick else (64, 5)
    speed = measure.decode_speed(gens, {1: PROMPTS[:1], 8: PROMPTS}, new_tokens, rounds)
    fp32_bytes = measure.weights_bytes(src)
    rows = []
    for bs in (1, 8):
        rows.append(_row(f"fp32 v2 decode, batch {bs}", speed["fp32", bs], "tok/s",
                         f"{what}; greedy, {new_tokens} new tokens, median of {rounds} interleaved rounds, "
                         f"{threads} thread(s)"))
        for k in variants:
            ratio = speed[k, bs] / speed["fp32", bs]
            target = f">= {TARGETS['speed']}" if (bs == 1 and k == "int8") else None
            rows.append(_row(f"{k} v2 decode, batch {bs}", speed[k, bs], "tok/s", f"{ratio:.2f}× fp32"))
            rows.append(_row(f"{k} ÷ fp32 decode speed, batch {bs}", ratio, "×", "", target,
                             (ratio >= TARGETS["speed"]) if target else None))
    for k, folder in variants.items():
        size = (Path(folder) / WEIGHTS_FILE).stat().st_size
        target = f"<= {TARGETS['size']}" if k == "int8" else None
        rows.append(_row(f"{k} file size ÷ fp32", size / fp32_bytes, "×",
                         f"{size / 1e6:.1f} MB vs {fp32_bytes / 1e6:.1f} MB", target,
                         (size / fp32_bytes <= TARGETS["size"]) if target else None))
    if trained:
        from python3_distillation.evaluation.report import held_out, load_entry

        blocks = held_out([load_entry("v2", src)], 16 if quick else None)[1]
        q = measure.quality(models, blocks, reference="fp32")
        for k in variants:
            r = q[k]["ppl"] / q["fp32"]["ppl"]
            target = f"<= {TARGETS['ppl']}" if k == "int8" else None
            rows.append(_row(f"{k} ÷ fp32 validation perplexity", r, "×",
                             f"{q[k]['ppl']:.2f} vs {q['fp32']['ppl']:.2f} on {len(blocks)} blocks", target,
                             (r <= TARGETS["ppl"]) if target else None))
            rows.append(_row(f"{k}: top-1 agreement with fp32", q[k]["top1"], "",
                             f"mean KL(fp32 ‖ {k}) {q[k]['kl']:.4f} nats/position"))
    else:
        rows.append(_row("int8 ÷ fp32 validation perplexity", None, "×", "no trained v2: run `make run`",
                         f"<= {TARGETS['ppl']}"))
    return {"section": "int8 quantization (v2)", "rows": rows}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, ensure_ascii=False))
