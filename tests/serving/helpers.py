"""Helpers of the server tests (imported by the tests and by conftest.py).

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/serving -q
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from pathlib import Path

from python3_distillation.generation import Generator

FAST = {"batch_window_ms": 1.0}


def save_tiny(out: Path, n_positions: int = 64, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from python3_distillation.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=n_positions, vocab_size=50257,
                               initializer_range=0.2)).save_pretrained(out)
    load_tokenizer("gpt2").save_pretrained(out)
    return out


class Throttle:
    """Slows a Generator down: before each decode step it waits for ``gate``, then sleeps ``delay``.

    It wraps the steps of the batches the generator makes (each step is one token for every row), so
    the tests do not depend on how the decoder runs the model.
    """

    def __init__(self, generator: Generator, delay: float = 0.0):
        self.delay, self.gate, self.steps = delay, threading.Event(), 0
        self.gate.set()
        new_batch = generator.new_batch

        def slowed_batch():
            batch = new_batch()
            step = batch.step

            def slowed_step(*args, **kwargs):
                if batch.rows_in_use or (args and args[0]) or kwargs.get("new"):
                    self.steps += 1
                    self.gate.wait(timeout=10)
                    if self.delay:
                        time.sleep(self.delay)
                return step(*args, **kwargs)

            batch.step = slowed_step
            return batch

        generator.new_batch = slowed_batch  # instance attribute: only this generator

    def remove(self) -> None:
        self.gate.set()


def metric(client, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{.*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def wait_for(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def sse_events(body: str) -> list:
    events = [block[len("data: "):] for block in body.split("\n\n") if block.startswith("data: ")]
    assert events and events[-1] == "[DONE]", body[-300:]
    return [json.loads(e) for e in events[:-1]]


def assert_error(resp, status: int, type_: str | None = None, contains: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True)[:500])
    assert resp.mimetype == "application/json"
    err = resp.get_json()["error"]
    assert err["message"] and err["type"]
    if type_:
        assert err["type"] == type_, err
    if contains:
        assert contains in err["message"], err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def threaded_servers():
    """``start(app)`` → base URL of a real threaded HTTP server on a free port; all shut down on exit."""
    from werkzeug.serving import make_server

    servers = []

    def start(app) -> str:
        server = make_server("127.0.0.1", free_port(), app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
