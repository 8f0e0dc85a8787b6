"""Health that means something: a failed model load and a dead batcher thread make /health 503 with the
reason, /ready says why, and the Docker images' HEALTHCHECK command turns unhealthy.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/serving/test_health.py -q
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import FAST, assert_error, wait_for

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "Dockerfile_v3.1_backend", REPO / "Dockerfile_v3.2_backend"]


@pytest.fixture
def broken_dir(tiny_dir, tmp_path) -> Path:
    """A model folder whose weights file is corrupt: the config reads, the weights do not."""
    out = tmp_path / "broken_student"
    shutil.copytree(tiny_dir, out)
    (out / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    return out


def healthcheck_argv(dockerfile: Path, port: int) -> list[str]:
    """The image's HEALTHCHECK command, pointed at ``port``, with this interpreter as python3."""
    text = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK")]
    argv = json.loads(line[line.index("CMD") + 3:].strip())
    assert argv[0] in {"python", "python3"}
    return [sys.executable] + [a.replace("127.0.0.1:6006", f"127.0.0.1:{port}") for a in argv[1:]]


def run_healthcheck(base: str) -> int:
    port = int(base.rsplit(":", 1)[1])
    return subprocess.run(healthcheck_argv(DOCKERFILES[1], port), capture_output=True, timeout=30).returncode


def test_failed_load_is_unhealthy_with_the_reason_and_no_path(make_app, broken_dir, serve_in_thread):
    app = make_app({"model_dirs": [str(broken_dir)], **FAST})
    c = app.test_client()
    assert wait_for(lambda: c.get("/health").status_code == 503, timeout=60)
    health = c.get("/health")
    err = assert_error(health, 503, "not_ready", contains="model loading failed")
    body = health.get_json()
    assert body["status"] == "failed" and body["reason"] == err["message"]
    ready = c.get("/ready")
    assert_error(ready, 503, "not_ready", contains="model loading failed")
    assert ready.get_json()["status"] == "failed"
    assert_error(c.post("/v1/completions", json={"prompt": "hi"}), 503, "not_ready", contains="loading failed")
    info = c.get("/api/info").get_json()
    assert info["ready"] is False and "loading failed" in info["error"]
    for text in (health.get_data(as_text=True), ready.get_data(as_text=True), json.dumps(info),
                 c.get("/metrics").get_data(as_text=True)):
        assert str(broken_dir.parent) not in text and "/tmp" not in text, text[:500]
    # The container's own probe sees it too.
    assert run_healthcheck(serve_in_thread(app)) != 0


def test_healthy_server_passes_the_docker_healthcheck(make_app, tiny, serve_in_thread):
    base = serve_in_thread(make_app(FAST, {"tiny": tiny}))
    assert run_healthcheck(base) == 0


def test_both_images_probe_health(tmp_path):
    for dockerfile in DOCKERFILES:
        argv = healthcheck_argv(dockerfile, 6006)
        assert "http://127.0.0.1:6006/health" in argv[-1]


def test_dead_batcher_thread_is_unhealthy(make_app, tiny):
    app = make_app(FAST, {"tiny": tiny})
    c = app.test_client()
    assert c.get("/health").status_code == 200
    batcher = app.extensions["distill"].batchers["tiny"]
    batcher.close()  # the thread is gone, as after a crash
    assert not batcher.alive
    err = assert_error(c.get("/health"), 503, "not_ready", contains="batcher thread of model 'tiny'")
    assert_error(c.get("/ready"), 503, "not_ready")
    assert_error(c.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 2}), 503, "not_ready")
    assert "not running" in err["message"]


def test_a_crashing_batcher_reports_why(make_app, tiny_dir, monkeypatch):
    from python3_distillation.generation import Generator

    gen = Generator.from_pretrained(tiny_dir, device="cpu")

    def broken_batch():
        raise SystemExit("the decode loop broke")  # escapes every per-step handler

    gen.new_batch = broken_batch
    app = make_app(FAST, {"tiny": gen})
    c = app.test_client()
    assert wait_for(lambda: c.get("/health").status_code == 503)
    err = assert_error(c.get("/health"), 503, contains="SystemExit: the decode loop broke")
    assert re.search(r"batcher thread of model 'tiny' is not running", err["message"])
