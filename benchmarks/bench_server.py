"""Serving benchmark: the production gunicorn command on loopback, continuous vs static batching side by side.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python benchmarks/bench_server.py [--quick]

Starts the production command (``gunicorn --config python:python3_distillation.serving.gunicorn_conf
... python3_distillation.serving.wsgi:app``) on free 127.0.0.1 ports with the trained v2 student (or,
when it is missing, a random 6-layer d256 GPT-2 of the same vocabulary, and says so), sends a bounded
number of requests and stops the servers. Three measurements:

1. **Staggered arrivals**: streamed requests of 128 tokens (``ignore_eos``: equal work) arriving
   100 ms apart, against a continuous-batching server and a static-batching one, alternated round by
   round. Time to first token p50/p99 and throughput of each. Targets: p99 TTFT with continuous
   batching ≤ 1/3 of static batching's, at equal throughput (≥ 0.95×, the run-to-run noise).
2. **The waiting line**: 16 concurrent clients × 200 requests (16 tokens, half streamed) against the
   default settings. Target: 200 answers, no errors (no 429). Throughput and p50/p99 latency.
3. **Batching**: tokens/s one request at a time vs 8 concurrent clients (target ≥ 3×), and the time
   to first token of a lone streamed request.

``run()`` returns the report section (benchmarks/run.py); ``__main__`` prints it as JSON.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import student_folder  # noqa: E402

PROMPTS = ["It is a truth universally acknowledged, that", "The weather in the north was",
           "She opened the letter and read", "In the beginning of the year", "Mr. Darcy walked into the room and",
           "The train left the station at", "Nobody expected the old house to", "After dinner the family gathered"]
TTFT_RATIO_TARGET = 1 / 3
THROUGHPUT_TOLERANCE = 0.95


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Server:
    """The production command on a free loopback port; always stopped on exit."""

    def __init__(self, model: Path, log_path: Path, **env: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        exe = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which("gunicorn")
        cmd = ([exe] if exe else [sys.executable, "-m", "gunicorn"]) + [
            "--config", "python:python3_distillation.serving.gunicorn_conf", "--bind", f"127.0.0.1:{self.port}",
            "python3_distillation.serving.wsgi:app"]
        full_env = {**os.environ, "DISTILL_MODEL_DIR": str(model), **env,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log_path.read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/ready")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn not ready after {timeout} s: {self.log_path.read_text()[-2000:]}")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what we started
            self.proc.wait(timeout=10)
        self._log.close()


class Client:
    """One keep-alive connection, like one user of the API."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def _post(self, body: dict) -> http.client.HTTPResponse:
        self.conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                          body=json.dumps(body))
        return self.conn.getresponse()

    def complete(self, prompt: str, max_tokens: int, seed: int) -> tuple[float, int]:
        """Non-streamed request → (latency s, completion tokens); raises on an HTTP error."""
        t0 = time.perf_counter()
        resp = self._post({"prompt": prompt, "max_tokens": max_tokens, "seed": seed})
        body = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body}")
        return time.perf_counter() - t0, body["usage"]["completion_tokens"]

    def stream(self, prompt: str, max_tokens: int, seed: int, ignore_eos: bool = False) -> tuple[float, float, int]:
        """Streamed request → (time to first text s, total s, completion tokens)."""
        t0 = time.perf_counter()
        resp = self._post({"prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
                           "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}})
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        first, tokens = None, 0
        for line in resp:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    raise RuntimeError(f"stream error: {chunk['error']}")
                if first is None and any(c["text"] for c in chunk["choices"]):
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            if line.strip() == b"data: [DONE]":
                break
        resp.read()
        return (first if first is not None else float("nan")), time.perf_counter() - t0, tokens


def _concurrent(port: int, work, clients: int, total: int) -> tuple[float, list, list[BaseException]]:
    """Run ``work(client, i)`` for i < ``total``, shared out over ``clients`` threads (client c takes
    i = c, c + clients, …): wall time, results, errors."""
    results: list = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def loop(c: int) -> None:
        client = Client(port)
        barrier.wait()
        for i in range(c, total, clients):
            try:
                r = work(client, i)
            except Exception as e:  # counted, and the client goes on with a fresh connection
                with lock:
                    errors.append(e)
                client = Client(port)
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results, errors


def staggered_wave(port: int, arrivals: int, gap_s: float, max_tokens: int) -> tuple[list[float], float, int]:
    """``arrivals`` streamed requests, one every ``gap_s``: (TTFTs, wall s, tokens)."""
    out: list = [None] * arrivals
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            out[i] = Client(port).stream(PROMPTS[i % len(PROMPTS)], max_tokens, seed=i, ignore_eos=True)
        except Exception as e:
            errors.append(e)

    threads = []
    t0 = time.perf_counter()
    for i in range(arrivals):
        target = t0 + i * gap_s
        time.sleep(max(0.0, target - time.perf_counter()))
        t = threading.Thread(target=one, args=(i,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = time.perf_counter() - t0
    return [o[0] for o in out], wall, sum(o[2] for o in out)


def run(quick: bool = False) -> dict:
    rows: list[dict] = []

    def row(metric: str, value: float, unit: str, target: str | None = None, met: bool | None = None,
            note: str = "") -> None:
        rows.append({"metric": metric, "value": round(value, 3), "unit": unit, "target": target, "met": met,
                     "note": note})

    arrivals, gap_s, long_tokens, rounds = (6, 0.1, 32, 1) if quick else (8, 0.1, 128, 3)
    line_clients, line_requests, line_tokens = (16, 48, 16) if quick else (16, 200, 16)
    batch_clients, per_client, max_tokens = (8, 2, 32) if quick else (8, 4, 64)

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        model, described = student_folder(Path(tmp))
        with Server(model, Path(tmp) / "continuous.log") as cont, \
                Server(model, Path(tmp) / "static.log", DISTILL_BATCHING="static") as static:
            cont.wait_ready()
            static.wait_ready()
            for s in (cont, static):  # warm-up: first requests pay for lazy initialisation
                Client(s.port).complete(PROMPTS[0], 4, seed=0)

            # 1. staggered arrivals, alternated so both modes see the same machine conditions
            waves: dict[str, list] = {"continuous": [], "static": []}
            for _ in range(rounds):
                for mode, server in (("static", static), ("continuous", cont)):
                    waves[mode].append(staggered_wave(server.port, arrivals, gap_s, long_tokens))

            # 2. the waiting line: 16 clients × N short requests, half streamed, default settings
            def mixed(client: Client, i: int) -> tuple[float, int]:
                if i % 2:
                    _, total, tokens = client.stream(PROMPTS[i % len(PROMPTS)], line_tokens, seed=i)
                    return total, tokens
                return client.complete(PROMPTS[i % len(PROMPTS)], line_tokens, seed=i)

            line_wall, line_done, line_errors = _concurrent(cont.port, mixed, line_clients, line_requests)

            # 3. one client vs 8 concurrent clients, and a lone request's first token
            one = Client(cont.port)
            n_sequential = batch_clients * (1 if quick else 2)
            t0 = time.perf_counter()
            seq_tokens = sum(one.complete(PROMPTS[i % len(PROMPTS)], max_tokens, seed=i)[1]
                             for i in range(n_sequential))
            seq_wall = time.perf_counter() - t0
            solo_ttft = [one.stream(PROMPTS[i % len(PROMPTS)], 4, seed=i)[0] for i in range(batch_clients)]
            par_wall, par_done, par_errors = _concurrent(
                cont.port, lambda c, i: c.complete(PROMPTS[i % len(PROMPTS)], max_tokens, i), batch_clients,
                batch_clients * per_client)
            if par_errors:
                raise par_errors[0]

    setup = f"{described}; gunicorn gthread (serving/gunicorn_conf.py) on 127.0.0.1; {os.cpu_count()} CPUs"
    ttft = {m: [t for w in waves[m] for t in w[0]] for m in waves}
    rate = {m: sum(w[2] for w in waves[m]) / sum(w[1] for w in waves[m]) for m in waves}
    p99 = {m: _percentile(ttft[m], 0.99) for m in ttft}
    ratio, tput = p99["continuous"] / p99["static"], rate["continuous"] / rate["static"]
    wave_note = (f"{arrivals} streamed requests × {long_tokens} tokens, {gap_s * 1000:.0f} ms apart, "
                 f"{rounds} round(s) alternated; {setup}")
    for m in ("static", "continuous"):
        row(f"Staggered arrivals, {m} batching: time to first token p50", 1000 * statistics.median(ttft[m]), "ms",
            note=wave_note if m == "static" else "")
        row(f"Staggered arrivals, {m} batching: time to first token p99", 1000 * p99[m], "ms")
        row(f"Staggered arrivals, {m} batching: throughput", rate[m], "tokens/s")
    row("Staggered arrivals: p99 TTFT continuous ÷ static", ratio, "x", f"<= {TTFT_RATIO_TARGET:.2f}",
        ratio <= TTFT_RATIO_TARGET)
    row("Staggered arrivals: throughput continuous ÷ static", tput, "x", f">= {THROUGHPUT_TOLERANCE} (equal)",
        tput >= THROUGHPUT_TOLERANCE)

    latencies = [s for s, _ in line_done]
    n_line = line_requests
    row(f"Waiting line: {line_clients} clients × {n_line} requests answered", len(line_done), "answers",
        f"= {n_line}", len(line_done) == n_line,
        f"{line_tokens} tokens each, half streamed, default limits; errors: "
        + (", ".join(sorted({str(e)[:60] for e in line_errors})) if line_errors else "none"))
    row("Waiting line: errors (429, 5xx, broken streams)", len(line_errors), "requests", "= 0", not line_errors)
    row("Waiting line: throughput", len(line_done) / line_wall, "requests/s",
        note=f"{sum(n for _, n in line_done) / line_wall:.0f} tokens/s")
    row("Waiting line: latency p50", 1000 * statistics.median(latencies), "ms")
    row("Waiting line: latency p99", 1000 * _percentile(latencies, 0.99), "ms")

    seq_rate, par_rate = seq_tokens / seq_wall, sum(n for _, n in par_done) / par_wall
    speedup = par_rate / seq_rate
    row("Throughput, 1 client (sequential)", seq_rate, "tokens/s",
        note=f"{n_sequential} requests × {max_tokens} tokens")
    row(f"Throughput, {batch_clients} concurrent clients", par_rate, "tokens/s",
        note=f"{batch_clients * per_client} requests, continuously batched")
    row("Speed-up from batching", speedup, "x", ">= 3", speedup >= 3, f"{batch_clients} clients vs 1")
    solo = 1000 * statistics.median(solo_ttft)
    row("Time to first token p50, 1 client (streamed)", solo, "ms", "<= 200", solo <= 200)
    return {"section": "Serving", "rows": rows}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
