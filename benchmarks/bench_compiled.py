"""The compiled decode step (generation/compiled.py) against the eager one: where a step's time goes,
decode speed, compile time, time to first token.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python benchmarks/run.py --only compiled
    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python benchmarks/bench_compiled.py [--quick]

On the v2 shape (6 layers × d256; the trained v2 student when there is one, else random weights:
speed does not depend on them), fp32 and int8 (int8.py), in one process:

* breakdown of one eager step at batch 1 and 8: the step's wall time; the LM head, the 24 block
  projections and the 6 attentions each timed alone (the same calls, back to back); the rest is
  Python, dispatch and the small ops (layer norms, adds, GELU, embedding, mask, cache writes);
* compile time of the step for 1 and for 8 rows: cold (a fresh inductor cache and package folder:
  what the first start pays) and again from the saved package (what a restart pays);
* decode speed: greedy, EOS ignored, 128 new tokens, batch 1 and 8, eager and compiled
  generators interleaved, median of rounds (every bucket compiled in an untimed warm-up);
* time to first token for a 200-token prompt, both ways (prefill stays eager on both).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from python3_distillation.evaluation import measure  # noqa: E402
from python3_distillation.generation import Generator, SamplingParams  # noqa: E402
from python3_distillation.generation.compiled import CompiledStep  # noqa: E402
from python3_distillation.generation.decoders import GPT2Decoder, cpu_head_t  # noqa: E402
from python3_distillation.int8 import quantize_model  # noqa: E402
from python3_distillation.tokenizer import load_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPTS  # noqa: E402


def _row(metric, value, unit="", note="", target=None, met=None) -> dict:
    return {"metric": metric, "value": value, "unit": unit, "target": target, "met": met, "note": note}


def models() -> tuple[dict, str]:
    """fp32 and int8 v2-shaped models, and a note saying which weights."""
    from python3_distillation.models import open_model
    from python3_distillation.paths import model_dir

    trained = model_dir("v2")
    if (trained / "config.json").is_file():
        fp32, what = open_model(trained).model, f"trained v2 student ({trained.name})"
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        fp32 = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=256, n_head=4, n_positions=256)).eval()
        what = "random 6 × d256 GPT-2 (no trained v2 here)"
    return {"fp32": fp32, "int8": quantize_model(copy.deepcopy(fp32))}, what


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# Engines compared step for step (the first is CompiledStep's default on CPU).
VARIANTS = {"compiled (AOTInductor)": {},
            "compiled (torch.compile)": {"engine": "dynamo"}}


@torch.inference_mode()
def breakdown(model, steps: dict[str, CompiledStep], bs: int, reps: int) -> dict[str, float]:
    """ms of one eager step and of its parts alone; one step of each compiled variant, same cache."""
    from python3_distillation.generation.compiled import CompiledGPT2Decoder

    head_t = cpu_head_t(model)
    decs = {"eager step": GPT2Decoder(model, head_t)}
    decs.update({f"{k} step": CompiledGPT2Decoder(model, head_t, s) for k, s in steps.items()})
    # An 80-token prompt, then 5 + reps ≤ 45 steps: the compiled decoders stay in one bucket of 128
    # columns (one compile each); the eager one attends over the 80–125 live columns only.
    width = 80
    ids = torch.randint(0, 50257, (bs, width), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(bs, width, dtype=torch.bool)
    tok = ids[:, -1]
    for dec in decs.values():
        dec.add(ids, mask, reps + 8)
        for _ in range(5):
            dec.step(tok)
    out = {}
    for _ in range(2):  # the decoders take turns, twice: a burst of load hits all of them
        for k, dec in decs.items():
            out[k] = min(out.get(k, float("inf")), median_ms(lambda: dec.step(tok), reps // 2))
    eager = decs["eager step"]
    d, cols = eager.d, eager.t
    h = torch.randn(bs, d)
    x4 = torch.randn(bs, 4 * d)
    out["LM head"] = median_ms(lambda: eager.head(h), reps)

    def projections():
        for _, qkv, o, _, _, fc, proj, _ in eager.layers:
            qkv(h), o(h), fc(h), proj(x4)

    out["24 projections"] = median_ms(projections, reps)
    q = torch.randn(bs, eager.n_head, 1, eager.dh)
    kv = torch.randn(bs, 2, eager.n_head, cols, eager.dh)
    add = torch.zeros(bs, 1, 1, cols)

    def attention():
        for _ in eager.layers:
            torch.nn.functional.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1], attn_mask=add)

    out["6 attentions"] = median_ms(attention, reps)
    out["rest"] = out["eager step"] - out["LM head"] - out["24 projections"] - out["6 attentions"]
    return out


def compile_seconds(model, head_t, rows) -> tuple[dict, dict]:
    """Seconds per bucket for a first compiled step (an empty package folder) and a second one (what
    a restart pays: the package loaded from that folder)."""
    with tempfile.TemporaryDirectory(prefix="bench-compiled-packages-") as folder:
        cold = CompiledStep(model, head_t, cache_dir=folder).warm(rows)
        again = CompiledStep(model, head_t, cache_dir=folder).warm(rows)
    return cold, again


def long_prompt(tokenizer, n: int) -> str:
    text = " ".join(PROMPTS * 8)
    ids = tokenizer.encode(text)[:n]
    return tokenizer.decode(ids)


def run(quick: bool = False) -> dict:
    # A fresh inductor cache, outside the checkout: the cold compile time is what a first start pays.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-compiled-inductor-")
    ms, what = models()
    tok = load_tokenizer("gpt2")
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    new_tokens, rounds, reps = (16, 2, 10) if quick else (128, 3, 40)
    rows = []
    gens: dict[str, Generator] = {}
    for name, model in ms.items():
        head_t = cpu_head_t(model)
        cold, again = compile_seconds(model, head_t, [1, 8])
        for b, s in cold.items():
            rows.append(_row(f"{name}: compile the step for {b} rows, cold", s, "s",
                             f"export + AOTInductor + load + one step{' (includes inductor start-up)' if b == 1 else ''}; "
                             f"{again[b]:.2f} s when a restart loads the saved package", "< 30", s < 30))
        gens[f"{name} eager"] = Generator(model, tok, device="cpu", name=f"{name} eager", compile=False)
        gens[f"{name} compiled"] = Generator(model, tok, device="cpu", name=f"{name} compiled", compile=True)
        steps = {k: CompiledStep(model, head_t, **v) for k, v in VARIANTS.items()}
        for bs in (1, 8):
            parts = breakdown(model, steps, bs, reps)
            for part, v in parts.items():
                rows.append(_row(f"{name} batch {bs} step: {part}", v, "ms",
                                 f"{v / parts['eager step']:.0%} of the eager step" if part != "eager step"
                                 else f"{what}; 80–125 cache columns; best of 2 medians of {reps // 2}; "
                                      f"{threads} threads"))
            for k, s in steps.items():
                rows.append(_row(f"{name}: first {bs}-row step, {k}", s.compile_seconds[s._bucket(torch.empty(bs, 128))],
                                 "s", "compile, or load what this run compiled"))
    speed = measure.decode_speed(gens, {1: PROMPTS[:1], 8: PROMPTS}, new_tokens, rounds)
    for name in ms:
        for bs in (1, 8):
            e, c = speed[f"{name} eager", bs], speed[f"{name} compiled", bs]
            note = (f"{what}; greedy, {new_tokens} new tokens, median of {rounds} interleaved rounds, {threads} "
                    f"threads, load average {load:.2f} at start")
            rows.append(_row(f"{name} batch {bs} decode, eager", e, "tok/s", f"{1e3 * bs / e:.2f} ms/step; {note}"))
            rows.append(_row(f"{name} batch {bs} decode, compiled", c, "tok/s", f"{1e3 * bs / c:.2f} ms/step"))
            rows.append(_row(f"{name} batch {bs} decode, compiled ÷ eager", c / e, "×", "", "> 1", c > e))
    prompt = long_prompt(tok, 200)
    params = SamplingParams(max_new_tokens=1, temperature=0)
    ttft = measure.interleaved({k: (lambda g=g: g.generate([prompt], params)) for k, g in gens.items()}, rounds + 2)
    for k, v in ttft.items():
        rows.append(_row(f"{k}: time to first token, 200-token prompt", statistics.median(v) * 1e3, "ms",
                         f"median of {rounds + 2}; prefill is eager on both paths"))
    rows.append(_row("load average (1 min) at start / end", load, "", f"{os.getloadavg()[0]:.2f} at end"))
    return {"section": "Compiled decode step", "rows": rows}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, ensure_ascii=False))
