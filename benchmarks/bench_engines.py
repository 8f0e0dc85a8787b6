"""This project against llama.cpp on the same student, the same machine, in one run: decoding, first token, serving.

    HF_HUB_OFFLINE=1 python benchmarks/bench_engines.py [--quick]     # or: python benchmarks/run.py --only engines

The student (the trained v2, else the random 6-layer d256 GPT-2 the other sections use, and the
notes say which) is exported with the project's own exporter to GGUF f32 and q8_0, and quantized
with ``gpt2-distill quantize`` to the project's int8 folder. llama.cpp is the build of
``llama_cpp.py`` (made on first use, ~10 minutes; the section is one row saying why when it cannot
be built). Every engine runs on ``THREADS`` threads, greedy, EOS ignored (equal work).

1. **Decoding**, batch 1 and batch 8, ``NEW_TOKENS`` new tokens, interleaved rounds (the order
   rotates), medians. Ours: ``Generator.generate`` on the fp32 and the int8 model, each eager and
   with the compiled step (generation/compiled.py, ``DISTILL_COMPILE=1``). llama.cpp:
   ``llama-batched-bench`` (``-npl 1,8``: one sequence, and 8 sequences decoded together, one
   batch of 8 tokens per step: the same work as our batch of 8), prompts of the same length as
   ours. Both count new tokens over the whole call, prefill included.
2. **Time to first token** of a 200-token prompt. Ours: prefill + the first greedy token (one
   ``DecodeBatch.step``). llama.cpp: ``llama-bench -pg 200,1`` (200 prompt tokens + 1 generated).
3. **The bandwidth bound** of batch-1 decoding per model: the measured memory read bandwidth
   (bench_generate's probe) ÷ the bytes of weights read per token.
4. **Serving**: the waiting line of bench_server (16 clients × 200 requests of 16 tokens, half
   streamed, to ``/v1/completions``) against this project's production server (gunicorn, default
   settings; the int8 folder eager and with ``DISTILL_COMPILE=1``, the fp32 folder eager) and
   against ``llama-server -np 16`` (16 slots, continuous batching) on the q8_0 GGUF,
   one after the other. Requests use each server's default sampling. A client opens a new
   connection after each streamed answer (llama-server closes it there), against both servers.

Targets (met or not): ours fp32 ≥ llama.cpp f32 and ours int8 ≥ llama.cpp q8_0, at batch 1 and at
batch 8; our served requests/s ≥ llama-server's; each for the eager and the compiled path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench_generate import measured_bandwidth  # noqa: E402
from common import PROMPTS, student_folder  # noqa: E402

from python3_distillation.evaluation import measure  # noqa: E402
from python3_distillation.generation import Generator, RowInput, SamplingParams  # noqa: E402

THREADS = 2
NEW_TOKENS = 128
TTFT_PROMPT = 200  # tokens
BATCHES = (1, 8)
COMPILED = ", compiled step"  # generation/compiled.py (DISTILL_COMPILE=1)
PAIRS = (("this project fp32", "llama.cpp f32"), ("this project fp32, compiled step", "llama.cpp f32"),
         ("this project int8", "llama.cpp q8_0"), ("this project int8, compiled step", "llama.cpp q8_0"))


def _llama_cpp():
    """benchmarks/llama_cpp.py under its own name (``llama_cpp`` is also llama-cpp-python's package name)."""
    spec = importlib.util.spec_from_file_location("llama_cpp_build", HERE / "llama_cpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(metric: str, value, unit: str = "", target: str | None = None, met: bool | None = None,
         note: str = "") -> dict:
    return {"metric": metric, "value": None if value is None else round(value, 3), "unit": unit, "target": target,
            "met": met, "note": note}


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _call(cmd: list[str]) -> str:
    """stdout + stderr of a llama.cpp program; raises with its last lines when it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({p.returncode}): {(p.stderr or p.stdout)[-1500:]}")
    return p.stdout + "\n" + p.stderr


# ----------------------------------------------------------------------------------------- the jobs

def _ours_decode(gen: Generator, prompts: list[str], new: int):
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)

    def job() -> float:
        t0 = time.perf_counter()
        out = gen.generate(prompts, params, truncate=True)
        return sum(c.completion_tokens for c in out) / (time.perf_counter() - t0)
    return job


def _ours_ttft(gen: Generator, ids: list[int]):
    """Seconds from a 200-token prompt to its first greedy token: tokenizer excluded, prefill + sampling included."""
    params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)

    def job() -> float:
        batch = gen.new_batch()
        t0 = time.perf_counter()
        events = batch.step([RowInput(0, "", list(ids), params)])
        seconds = time.perf_counter() - t0
        if not any(e.finished and e.completion for e in events):
            raise RuntimeError(f"no first token after one step: {events}")
        return seconds
    return job


def _llama_decode(binaries: dict, gguf: Path, prompt_tokens: int, new: int) -> dict[int, tuple[float, float]]:
    """``{batch: (new tokens/s over the whole call, decode-only tokens/s)}`` from one llama-batched-bench run."""
    ctx = max(BATCHES) * (prompt_tokens + new) + 64
    out = _call([str(binaries["llama-batched-bench"]), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512",
                 "-npp", str(prompt_tokens), "-ntg", str(new), "-npl", ",".join(map(str, BATCHES)),
                 "-t", str(THREADS), "-tb", str(THREADS), "--output-format", "jsonl"])
    result = {}
    for r in _json_lines(out):
        if "pl" in r and "t_tg" in r:
            result[int(r["pl"])] = (r["pl"] * r["tg"] / r["t"], r["speed_tg"])
    if set(result) != set(BATCHES):
        raise RuntimeError(f"llama-batched-bench gave no jsonl rows for batches {BATCHES}: {out[-1500:]}")
    return result


def _llama_bench(binaries: dict, gguf: Path, new: int, repeats: int) -> dict[str, float]:
    """``{"ttft": s for 200 prompt tokens + 1, "tg": batch-1 decode tokens/s}`` from llama-bench (medians)."""
    out = _call([str(binaries["llama-bench"]), "-m", str(gguf), "-p", "0", "-n", str(new),
                 "-pg", f"{TTFT_PROMPT},1", "-t", str(THREADS), "-r", str(repeats), "-o", "jsonl"])
    result = {}
    for r in _json_lines(out):
        seconds = statistics.median(r["samples_ns"]) / 1e9
        if r["n_prompt"] == TTFT_PROMPT and r["n_gen"] == 1:
            result["ttft"] = seconds
        elif r["n_prompt"] == 0 and r["n_gen"] == new:
            result["tg"] = new / seconds
    if set(result) != {"ttft", "tg"}:
        raise RuntimeError(f"llama-bench gave no pp{TTFT_PROMPT}+tg1 / tg{new} rows: {out[-1500:]}")
    return result


def _interleaved(jobs: dict, rounds: int) -> dict[str, list]:
    """Each job's results over ``rounds`` rounds, after one untimed warm-up each; the order rotates."""
    keys = list(jobs)
    for k in keys:
        jobs[k]()
    out: dict[str, list] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            out[k].append(jobs[k]())
    return out


# ----------------------------------------------------------------------------------------- serving

def _waiting_line(port: int, clients: int, requests: int, tokens: int) -> dict:
    """bench_server's waiting line against whatever serves ``/v1/completions`` on ``port``."""
    import bench_server

    def mixed(client, i: int) -> tuple[float, int]:
        # llama-server closes the connection after a streamed answer (a moment after its last byte),
        # so a client opens a new one after every stream, and also when its idle keep-alive socket
        # has been closed (readable at EOF, as urllib3's pool checks). The same for both servers.
        sock = client.conn.sock
        if sock is not None and select.select([sock], [], [], 0)[0]:
            client.conn.close()
        prompt = bench_server.PROMPTS[i % len(bench_server.PROMPTS)]
        if i % 2:
            _, total, n = client.stream(prompt, tokens, seed=i)
            client.conn.close()
            return total, n
        return client.complete(prompt, tokens, seed=i)

    bench_server.Client(port).complete(bench_server.PROMPTS[0], 4, seed=0)  # warm-up
    wall, done, errors = bench_server._concurrent(port, mixed, clients, requests)
    latencies = [s for s, _ in done]
    return {"rps": len(done) / wall, "tps": sum(n for _, n in done) / wall, "answered": len(done),
            "errors": sorted({str(e)[:60] for e in errors}), "n_errors": len(errors),
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": bench_server._percentile(latencies, 0.99)}


def _serve_ours(model: Path, work: Path, clients: int, requests: int, tokens: int, **env: str) -> dict:
    import bench_server

    with bench_server.Server(model, work / f"ours-{model.name}{len(env)}.log", **env) as server:
        t0 = time.perf_counter()
        server.wait_ready(timeout=900)
        return {**_waiting_line(server.port, clients, requests, tokens), "warm_s": time.perf_counter() - t0}


def _serve_llama(binaries: dict, gguf: Path, work: Path, clients: int, requests: int, tokens: int) -> dict:
    llama = _llama_cpp()
    with llama.LlamaServer(binaries["llama-server"], gguf, "-np", str(clients), "-c", str(clients * 256),
                           "-t", str(THREADS), "-tb", str(THREADS), log_path=work / "llama-server.log") as server:
        return _waiting_line(server.port, clients, requests, tokens)


# ----------------------------------------------------------------------------------------- the section

def _gguf_bytes(path: Path) -> int:
    """Bytes of the tensors in a GGUF file (what a decode step reads), without the vocabulary's metadata."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def _ttft_ids(gen: Generator) -> list[int]:
    ids: list[int] = []
    while len(ids) < TTFT_PROMPT:
        ids += gen.encode(" ".join(PROMPTS))
    return ids[:TTFT_PROMPT]


def run(quick: bool = False) -> dict:
    section = "llama.cpp vs this project (same student, same machine)"
    llama = _llama_cpp()
    binaries, how = llama.ensure_built()
    if binaries is None:
        return {"section": section, "rows": [_row("llama.cpp comparison", None, "", "llama.cpp built", None,
                                                  f"skipped: {how.splitlines()[0]}")]}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as work:
        return {"section": section, "rows": _compare(binaries, how, quick, Path(work))}


def _compare(binaries: dict, how: str, quick: bool, work: Path) -> list[dict]:
    """The section's rows; the models, GGUF files and logs go in ``work``."""
    from python3_distillation.export import run_export
    from python3_distillation.models import open_model
    from python3_distillation.quantize import run_quantize

    new, rounds, bench_repeats = (16, 1, 1) if quick else (NEW_TOKENS, 5, 3)
    clients, requests, line_tokens = (16, 48, 16) if quick else (16, 200, 16)
    src, what = student_folder(work)
    ggufs = {kind: run_export(src, "gguf", kind, work / f"student-{kind}.gguf") for kind in ("f32", "q8_0")}
    int8_dir = run_quantize(src, work / "int8", head=True, measure=False)
    fp32, tok, _ = open_model(src)
    int8 = open_model(int8_dir).model
    gens = {"fp32": Generator(fp32, tok, device="cpu", name="fp32", compile=False),
            "int8": Generator(int8, tok, device="cpu", name="int8", compile=False),
            "fp32, compiled step": Generator(fp32, tok, device="cpu", name="fp32", compile=True),
            "int8, compiled step": Generator(int8, tok, device="cpu", name="int8", compile=True)}
    # Batch 1 runs the longest prompt; llama.cpp's prompts are that long too (ours left-pad to it at batch 8).
    prompt_tokens = max(len(gens["fp32"].encode(p)) for p in PROMPTS)
    longest = max(PROMPTS, key=lambda p: len(gens["fp32"].encode(p)))
    batch_prompts = {1: [longest], 8: PROMPTS[:8]}
    ttft_ids = _ttft_ids(gens["fp32"])

    bandwidth = measured_bandwidth()  # bytes/s, before the timed runs
    default_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        jobs = {}
        for name, gen in gens.items():
            for bs in BATCHES:
                jobs[f"ours {name} b{bs}"] = _ours_decode(gen, batch_prompts[bs], new)
            jobs[f"ours {name} ttft"] = _ours_ttft(gen, ttft_ids)
        for kind, path in ggufs.items():
            jobs[f"llama {kind} decode"] = lambda p=path: _llama_decode(binaries, p, prompt_tokens, new)
            jobs[f"llama {kind} bench"] = lambda p=path: _llama_bench(binaries, p, new, bench_repeats)
        results = _interleaved(jobs, rounds)
    finally:
        torch.set_num_threads(default_threads)

    med = statistics.median
    speed = {}  # (engine, batch) → new tokens/s
    ttft = {}  # engine → s
    extra = {}  # engine → note
    for name in gens:
        for bs in BATCHES:
            speed[f"this project {name}", bs] = med(results[f"ours {name} b{bs}"])
        ttft[f"this project {name}"] = med(results[f"ours {name} ttft"])
    for kind in ggufs:
        engine = f"llama.cpp {kind}"
        for bs in BATCHES:
            speed[engine, bs] = med(r[bs][0] for r in results[f"llama {kind} decode"])
            extra[engine, bs] = med(r[bs][1] for r in results[f"llama {kind} decode"])
        ttft[engine] = med(r["ttft"] for r in results[f"llama {kind} bench"])
        extra[engine, "tg"] = med(r["tg"] for r in results[f"llama {kind} bench"])

    nbytes = {"this project fp32": measure.weights_bytes(src), "this project int8": measure.weights_bytes(int8_dir),
              "this project fp32, compiled step": measure.weights_bytes(src),
              "this project int8, compiled step": measure.weights_bytes(int8_dir),
              "llama.cpp f32": _gguf_bytes(ggufs["f32"]), "llama.cpp q8_0": _gguf_bytes(ggufs["q8_0"])}
    setup = (f"{what}; {THREADS} threads, greedy, EOS ignored, {new} new tokens, median of {rounds} interleaved "
             f"rounds; {how}")
    rows = [_row("memory read bandwidth, measured", bandwidth / 1e9, "GB/s", None, None,
                 "bench_generate's probe (sum over a 256 MiB tensor, best of 5); the bounds below use it")]
    for bs in BATCHES:
        for engine in ("this project fp32", "this project fp32, compiled step", "this project int8",
                       "this project int8, compiled step", "llama.cpp f32", "llama.cpp q8_0"):
            bound = bandwidth / nbytes[engine]
            if engine.startswith("llama"):
                how_measured = (f"llama-batched-bench -npl {bs}, {prompt_tokens}-token prompt{'s' if bs > 1 else ''}; "
                                f"decode only {extra[engine, bs]:.0f} tok/s")
                if bs == 1:
                    how_measured += f"; llama-bench tg{new} {extra[engine, 'tg']:.0f} tok/s"
            else:
                how_measured = (f"Generator.generate, {'the longest prompt' if bs == 1 else '8 prompts, left-padded'}"
                                + ("; int8 folder of `gpt2-distill quantize`" if "int8" in engine else "")
                                + (" (DISTILL_COMPILE=1; compiled in the warm-up round)" if COMPILED in engine
                                   else ""))
            note = (f"{speed[engine, bs] / bound:.0%} of the batch-1 bandwidth bound ({bound:.0f} tok/s: "
                    f"{nbytes[engine] / 1e6:.1f} MB read per step); " if bs == 1 else "") + how_measured
            if bs == 1 and engine == "this project fp32":
                note += f"; {setup}"
            rows.append(_row(f"batch {bs} decode, {engine}", speed[engine, bs], "tok/s", None, None, note))
        for ours, theirs in PAIRS:
            ratio = speed[ours, bs] / speed[theirs, bs]
            rows.append(_row(f"batch {bs}: {ours} ÷ {theirs}", ratio, "×", ">= 1", ratio >= 1,
                             f"{speed[ours, bs]:.0f} vs {speed[theirs, bs]:.0f} tok/s"))
    for engine, seconds in ttft.items():
        how_measured = (f"llama-bench -pg {TTFT_PROMPT},1 (prompt processing + 1 token), median of {bench_repeats} × "
                        f"{rounds}" if engine.startswith("llama") else
                        "one DecodeBatch.step: prefill + the first greedy token (ids given, tokenizer excluded)")
        rows.append(_row(f"time to first token, {TTFT_PROMPT}-token prompt, {engine}", 1000 * seconds, "ms", None,
                         None, how_measured))

    # Serving: each server alone on the machine, one after the other.
    served = {"this project int8": _serve_ours(Path(int8_dir), work, clients, requests, line_tokens,
                                               DISTILL_COMPILE="0"),
              "this project int8, compiled step": _serve_ours(Path(int8_dir), work, clients, requests, line_tokens,
                                                              DISTILL_COMPILE="1"),
              "this project fp32": _serve_ours(Path(src), work, clients, requests, line_tokens, DISTILL_COMPILE="0"),
              "llama-server q8_0": _serve_llama(binaries, ggufs["q8_0"], work, clients, requests, line_tokens)}
    line = (f"{clients} clients × {requests} requests of {line_tokens} tokens, half streamed (a new connection "
            "after each stream), default sampling")
    for engine, s in served.items():
        where = ("gunicorn gthread, default settings (bench_server's production command)"
                 + (f", DISTILL_COMPILE=1 (start to ready: {s['warm_s']:.0f} s, the step compiled or loaded "
                    "at load)" if COMPILED in engine else ", DISTILL_COMPILE=0 (eager decoding)")
                 if engine.startswith("this") else
                 f"llama-server -np {clients} -c {clients * 256} -t {THREADS}: {clients} slots, continuous batching")
        rows.append(_row(f"served requests/s, {engine}", s["rps"], "requests/s", None, None,
                         f"{s['answered']}/{requests} answered, {s['n_errors']} errors"
                         + (f" ({', '.join(s['errors'])})" if s["errors"] else "")
                         + f"; {s['tps']:.0f} tok/s; latency p50 {1000 * s['p50']:.0f} ms, "
                         f"p99 {1000 * s['p99']:.0f} ms; {where}; {line}"))
    theirs = served["llama-server q8_0"]
    for engine in ("this project int8", "this project int8, compiled step"):
        ours = served[engine]
        ratio = ours["rps"] / theirs["rps"]
        rows.append(_row(f"served requests/s: {engine} ÷ llama-server q8_0", ratio, "×", ">= 1",
                         ratio >= 1 and not ours["n_errors"], f"{ours['rps']:.1f} vs {theirs['rps']:.1f} requests/s"))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2, ensure_ascii=False))
