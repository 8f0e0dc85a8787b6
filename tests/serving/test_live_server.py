"""The production command (gunicorn, gthread) on a free port, driven by the official ``openai`` client;
and the seed's entry script serving with the same server.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/serving/test_live_server.py -q
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JSON = {"Content-Type": "application/json"}
MAX_TOKENS = 900  # long enough that a disconnect is seen long before the end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gunicorn_command(port: int) -> list[str]:
    exe = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which("gunicorn")
    base = [exe] if exe else [sys.executable, "-m", "gunicorn"]
    return base + ["--config", "python:python3_distillation.serving.gunicorn_conf", "--bind", f"127.0.0.1:{port}",
                   "python3_distillation.serving.wsgi:app"]


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(base: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in get(base + "/metrics")[1].splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{.*\})? (\S+)$", line)
        if m and m.group(1) == name:
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
    return total


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from python3_distillation.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("tiny_live")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=1024, vocab_size=50257)).save_pretrained(out)
    load_tokenizer("gpt2").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    env = {**os.environ, "DISTILL_MODEL_DIR": str(tiny_dir), "DISTILL_DEVICE": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(gunicorn_command(port), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, proc, log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this test started
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ready_server(server):
    base, proc, log_path = server
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gunicorn exited:\n{log_path.read_text()[-3000:]}"
        try:
            status, _ = get(base + "/ready", timeout=2)
        except OSError:
            status = None  # not listening yet
        if status == 200:
            return base
        time.sleep(0.1)
    pytest.fail(f"gunicorn not ready in 90 s:\n{log_path.read_text()[-3000:]}")


def test_health_and_ready(ready_server):
    base = ready_server
    status, body = get(base + "/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "models": "ready"}
    status, body = get(base + "/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body = get(base + "/no-such-page")
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found"


def test_openai_client_non_streamed_and_streamed(ready_server):
    from openai import OpenAI

    base = ready_server
    client = OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    (model,) = [m.id for m in client.models.list()]
    plain = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, user="t")
    assert plain.object == "text_completion" and plain.model == model
    assert plain.choices[0].finish_reason in {"stop", "length"} and plain.choices[0].text
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens == 4

    stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len([c for c in chunks if c.choices]) >= 2  # token by token, not one blob
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    many = client.completions.create(model=model, prompt=["a", "b"], n=2, max_tokens=3, seed=5, stop=["\n"])
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]


def test_openai_client_sees_api_errors(ready_server):
    import openai

    base = ready_server
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.UnprocessableEntityError, match="logprobs"):
        client.completions.create(model=client.models.list().data[0].id, prompt="x", logprobs=2)


def test_concurrent_requests_are_batched(ready_server):
    base = ready_server
    before = metric(base, "distill_prefills_total")
    results = []

    def one(i: int) -> None:
        req = urllib.request.Request(base + "/api/generate", method="POST", headers=JSON,
                                     data=json.dumps({"prompt": f"n{i}", "max_new_tokens": 64}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            results.append(json.loads(r.read()))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 6
    assert max(r["timings"]["batch_rows"] for r in results) >= 2
    assert metric(base, "distill_prefills_total") - before < 6


def test_disconnect_mid_stream_stops_the_generation(ready_server):
    base = ready_server
    host, port = base.removeprefix("http://").split(":")
    before = metric(base, "distill_completions_total", reason="cancelled")
    tokens_before = metric(base, "distill_generated_tokens_total")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "and then", "max_tokens": MAX_TOKENS,
                                                             "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read1(200).startswith(b"data: ")  # generation under way
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 20
    while metric(base, "distill_completions_total", reason="cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(base, "distill_completions_total", reason="cancelled") == before + 1
    assert metric(base, "distill_generated_tokens_total") - tokens_before < MAX_TOKENS
    assert metric(base, "distill_generations_in_flight") == 0


def test_the_entry_script_serves_with_gunicorn(tiny_dir):
    port = free_port()
    env = {**os.environ, "DISTILL_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "python3_distillation/distill_api_server_v2.py", "--model", str(tiny_dir),
                             "--port", str(port), "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(base + "/ready", timeout=2) as r:
                    assert r.headers["Server"].startswith("gunicorn")
                    break
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.2)
        else:
            pytest.fail("the entry script's server was not ready in 90 s")
        req = urllib.request.Request(base + "/v1/completions", method="POST", headers=JSON,
                                     data=json.dumps({"prompt": "Hello", "max_tokens": 3}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] >= 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # gunicorn's master and worker: their own session
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
