"""Serving benchmark: the production gunicorn command on loopback, one client vs eight.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python benchmarks/bench_server.py [--quick]

Starts ``gunicorn ... python3_distillation.wsgi:app`` on a free 127.0.0.1 port with the trained v2
student (or, when it is missing, a random 6-layer d256 GPT-2 of the same vocabulary, and says so),
sends a bounded number of /v1/completions requests and stops the server. Measures generated
tokens/s one request at a time vs 8 concurrent clients (the micro-batcher should turn concurrency
into batch rows: target >= 3x), p50/p99 latency under 8 clients, and time to first token of
streamed requests alone and under 8 clients. ``run()`` returns the report section; ``__main__``
prints it as JSON.
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

CLIENTS = 8
PROMPTS = ["It is a truth universally acknowledged, that", "The weather in the north was",
           "She opened the letter and read", "In the beginning of the year", "Mr. Darcy walked into the room and",
           "The train left the station at", "Nobody expected the old house to", "After dinner the family gathered"]


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Server:
    """The production command on a free loopback port; always stopped on exit."""

    def __init__(self, model: Path, log_path: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        exe = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which("gunicorn")
        cmd = ([exe] if exe else [sys.executable, "-m", "gunicorn"]) + [
            "--bind", f"127.0.0.1:{self.port}", "--worker-class", "gthread", "--workers", "1", "--threads", "8",
            "--timeout", "120", "python3_distillation.wsgi:app"]
        # The default cap (6) keeps gunicorn threads free for probes; 8 clients need 8 slots.
        env = {**os.environ, "DISTILL_MODEL_DIR": str(model), "DISTILL_MAX_CONCURRENT": str(CLIENTS),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
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

    def complete(self, prompt: str, max_tokens: int, seed: int) -> tuple[float, int]:
        """Non-streamed request → (latency s, completion tokens)."""
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                          body=json.dumps({"prompt": prompt, "max_tokens": max_tokens, "seed": seed}))
        resp = self.conn.getresponse()
        body = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body}")
        return time.perf_counter() - t0, body["usage"]["completion_tokens"]

    def stream(self, prompt: str, max_tokens: int, seed: int) -> tuple[float, float]:
        """Streamed request → (time to first text s, total s)."""
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                          body=json.dumps({"prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True}))
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        first = None
        for line in resp:
            if first is None and line.startswith(b"data: {") and b'"text":""' not in line:
                first = time.perf_counter() - t0
            if line.strip() == b"data: [DONE]":
                break
        resp.read()
        return (first if first is not None else float("nan")), time.perf_counter() - t0


def _concurrent(port: int, work, per_client: int) -> tuple[float, list]:
    """Run ``work(client, i)`` ``per_client`` times in each of CLIENTS threads; wall time and results."""
    results: list = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(CLIENTS)

    def loop(c: int) -> None:
        client = Client(port)
        barrier.wait()
        try:
            for k in range(per_client):
                r = work(client, c * per_client + k)
                with lock:
                    results.append(r)
        except BaseException as e:  # surfaced after join
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, results


def run(quick: bool = False) -> dict:
    per_client = 2 if quick else 4
    max_tokens = 32 if quick else 64
    n_requests = CLIENTS * per_client
    n_sequential = CLIENTS * (1 if quick else 2)  # rates are per token, so fewer suffice one at a time
    rows: list[dict] = []

    def row(metric: str, value: float, unit: str, target: str | None = None, met: bool | None = None,
            note: str = "") -> None:
        rows.append({"metric": metric, "value": round(value, 2), "unit": unit, "target": target, "met": met,
                     "note": note})

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        model, described = student_folder(Path(tmp))
        with Server(model, Path(tmp) / "gunicorn.log") as server:
            server.wait_ready()
            warm = Client(server.port)
            for i in range(2):
                warm.complete(PROMPTS[i], max_tokens, seed=i)

            one = Client(server.port)
            t0 = time.perf_counter()
            seq_tokens = sum(one.complete(PROMPTS[i % len(PROMPTS)], max_tokens, seed=i)[1]
                             for i in range(n_sequential))
            seq_wall = time.perf_counter() - t0
            # Only the first token matters here, so short requests keep this phase quick.
            solo_ttft = [one.stream(PROMPTS[i % len(PROMPTS)], 4, seed=i)[0] for i in range(CLIENTS)]

            wall, done = _concurrent(server.port, lambda c, i: c.complete(PROMPTS[i % len(PROMPTS)], max_tokens, i),
                                     per_client)
            par_tokens = sum(n for _, n in done)
            latencies = [s for s, _ in done]
            _, streamed = _concurrent(server.port, lambda c, i: c.stream(PROMPTS[i % len(PROMPTS)], max_tokens, i),
                                      per_client)
            busy_ttft = [f for f, _ in streamed]

    seq_rate, par_rate = seq_tokens / seq_wall, par_tokens / wall
    speedup = par_rate / seq_rate
    setup = (f"{described}; gunicorn gthread 1x8 on 127.0.0.1, DISTILL_MAX_CONCURRENT={CLIENTS}; "
             f"{n_sequential} requests one at a time, then {n_requests} from {CLIENTS} clients, "
             f"{max_tokens} tokens each; {os.cpu_count()} CPUs")
    row("Throughput, 1 client (sequential)", seq_rate, "tokens/s", note=setup)
    row(f"Throughput, {CLIENTS} concurrent clients", par_rate, "tokens/s", note="micro-batched into shared decodes")
    row("Speed-up from batching", speedup, "x", ">= 3", speedup >= 3, f"{CLIENTS} clients vs 1")
    row(f"Latency p50, {CLIENTS} clients", 1000 * statistics.median(latencies), "ms", note=f"{max_tokens} tokens")
    row(f"Latency p99, {CLIENTS} clients", 1000 * _percentile(latencies, 0.99), "ms", note=f"{max_tokens} tokens")
    ttft = statistics.median(solo_ttft) * 1000
    row("Time to first token p50, 1 client (streamed)", ttft, "ms", "<= 200", ttft <= 200)
    row(f"Time to first token p50, {CLIENTS} clients (streamed)", 1000 * statistics.median(busy_ttft), "ms")
    row(f"Time to first token p99, {CLIENTS} clients (streamed)", 1000 * _percentile(busy_ttft, 0.99), "ms")
    return {"section": "Serving", "rows": rows}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
