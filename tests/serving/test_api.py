"""Flask test-client tests of every route and every error of the server, on a tiny random model.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/serving/test_api.py -q
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from python3_distillation.errors import ConfigError
from python3_distillation.serving.cli import main
from python3_distillation.serving.settings import ServeConfig

from .helpers import FAST, assert_error, metric, sse_events, wait_for

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- plain routes


def test_health_ready_info_models(client):
    assert client.get("/health").get_json() == {"status": "ok", "models": "ready"}
    assert client.get("/ready").get_json() == {"status": "ready", "models": ["tiny"]}
    info = client.get("/api/info").get_json()
    assert info["ready"] and info["default"] == "tiny"
    (m,) = info["models"]
    assert m["n_params"] > 1_000_000 and m["context_length"] == 64 and m["size_bytes"] >= 4 * m["n_params"]
    assert m["precision"] == "fp32" and "path" not in m
    assert m["size"] == f"{m['size_bytes'] / 1e6:.1f} MB"  # decimal units, as the report's and the README's sizes
    models = client.get("/v1/models").get_json()
    assert models["object"] == "list" and [d["id"] for d in models["data"]] == ["tiny"]


def test_page_and_static_assets_need_no_cdn(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "tiny" in html and 'id="prompt"' in html and 'id="output"' in html
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        body = client.get(asset)
        assert body.status_code == 200, asset
        assert "http://" not in body.get_data(as_text=True) and "https://" not in body.get_data(as_text=True)
    assert "innerHTML" not in client.get("/static/app.js").get_data(as_text=True)


def test_ready_is_503_until_models_are_loaded(make_app, tiny_dir, tiny, monkeypatch):
    import python3_distillation.serving.state as state

    release = threading.Event()

    def slow_load(path, device=None, dtype=None, compile=None):
        release.wait(timeout=10)
        return tiny

    monkeypatch.setattr(state.Generator, "from_pretrained", staticmethod(slow_load))
    app = make_app(ServeConfig(model_dirs=[str(tiny_dir)], batch_window_ms=1, compile=False))
    c = app.test_client()
    assert c.get("/health").get_json() == {"status": "ok", "models": "loading"}
    resp = c.get("/ready")
    assert_error(resp, 503, "not_ready", contains="still loading")
    assert resp.get_json()["status"] == "loading" and resp.headers["Retry-After"]
    assert_error(c.post("/api/generate", json={"prompt": "hi"}), 503, "not_ready")
    assert c.get("/api/info").get_json()["ready"] is False
    release.set()
    assert wait_for(lambda: c.get("/ready").status_code == 200)
    assert c.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
    (m,) = c.get("/api/info").get_json()["models"]
    assert m["disk_bytes"] == (tiny_dir / "model.safetensors").stat().st_size  # the weights file on disk


def test_missing_model_folder_fails_at_startup(make_app, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        make_app({"model_dirs": [str(tmp_path / "nope")]})
    assert main(["--model", str(tmp_path / "nope")]) == 2


# --------------------------------------------------------------------------- native API


def test_api_generate_single_and_batch(client):
    one = client.post("/api/generate", json={"prompt": "Hello there", "max_new_tokens": 5, "seed": 1})
    assert one.status_code == 200, one.get_data(as_text=True)
    body = one.get_json()
    (c,) = body["completions"]
    assert body["model"] == "tiny" and c["prompt"] == "Hello there"
    assert c["finish_reason"] in {"length", "stop"} and 1 <= c["completion_tokens"] <= 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["timings"]["batch_rows"] == 1

    many = client.post("/api/generate", json={"prompts": ["a", "b c", "<script>x</script>"], "max_new_tokens": 3,
                                              "temperature": 0}).get_json()
    assert [c["prompt"] for c in many["completions"]] == ["a", "b c", "<script>x</script>"]
    assert many["usage"]["completion_tokens"] == sum(c["completion_tokens"] for c in many["completions"])


def test_api_generate_timings_add_up(make_app, slow):
    """Each decode step takes at least 20 ms: a row's seconds cover its steps after the first, its
    tokens/s is its tokens over those seconds, and the request's total covers the row."""
    gen, _ = slow
    c = make_app(FAST, {"tiny": gen}).test_client()
    body = c.post("/api/generate", json={"prompt": "Hello there", "max_new_tokens": 5, "ignore_eos": True}).get_json()
    (row,), timings = body["completions"], body["timings"]
    assert row["completion_tokens"] == 5 and row["seconds"] >= 4 * 0.02
    assert row["tokens_per_second"] == pytest.approx(5 / row["seconds"], rel=2e-3)
    assert row["seconds"] <= timings["total_seconds"] + 1e-4  # both rounded to 0.1 ms
    assert 0 <= timings["queue_seconds"] <= timings["total_seconds"]


def test_api_generate_seed_and_greedy_are_reproducible(client):
    def text(**kw):
        return client.post("/api/generate", json={"prompt": "Once upon", "max_new_tokens": 6, **kw}).get_json()[
            "completions"][0]["text"]

    assert text(seed=7, temperature=1.0, top_k=50) == text(seed=7, temperature=1.0, top_k=50)
    assert text(temperature=0) == text(temperature=0)


# --------------------------------------------------------------------------- OpenAI API


def test_v1_completions_non_streamed(client):
    resp = client.post("/v1/completions", json={"model": "tiny", "prompt": ["Hi", "Yo"], "max_tokens": 4, "n": 2,
                                                "seed": 3, "stop": "\n\n", "user": "someone", "logprobs": None,
                                                "best_of": 1, "presence_penalty": 0})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
    assert all(ch["finish_reason"] in {"stop", "length"} and ch["logprobs"] is None for ch in body["choices"])
    u = body["usage"]
    assert u["completion_tokens"] >= 4 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_v1_completions_default_model_and_echo(client):
    body = client.post("/v1/completions", json={"prompt": "Echo me", "max_tokens": 2, "echo": True}).get_json()
    assert body["choices"][0]["text"].startswith("Echo me")
    assert body["usage"]["completion_tokens"] <= 2  # OpenAI's default would be 16: here it was asked for 2


def test_v1_completions_streamed_matches_non_streamed(client):
    ask = {"prompt": "The river", "max_tokens": 6, "temperature": 0}
    plain = client.post("/v1/completions", json=ask).get_json()["choices"][0]["text"]
    resp = client.post("/v1/completions", json={**ask, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    chunks = sse_events(resp.get_data(as_text=True))
    assert all(c["object"] == "text_completion" for c in chunks)
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    assert text == plain
    finals = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finals in (["length"], ["stop"])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("route", ["/api/generate", "/v1/completions"])
@pytest.mark.parametrize("raw, status, type_", [
    ("{not json", 400, "invalid_json"),
    ("", 400, "invalid_json"),
    ('["a list"]', 422, "invalid_request_error"),
    ('{"prompt": "x"} trailing', 400, "invalid_json"),
])
def test_body_errors(client, route, raw, status, type_):
    assert_error(client.post(route, data=raw, content_type="application/json"), status, type_)


@pytest.mark.parametrize("body, param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "seed": "1"}, "seed"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "logprobs": 1}, "logprobs"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "suffix": "end"}, "suffix"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "x", "no_such_field": 1}, "no_such_field"),
    ({"max_tokens": 3}, "prompt"),
])
def test_v1_invalid_fields_are_422(client, body, param):
    assert assert_error(client.post("/v1/completions", json=body), 422, "invalid_request_error")["param"] == param


@pytest.mark.parametrize("body", [
    {"prompt": "x", "temperature": -1},
    {"prompt": "x", "top_p": 2.0},
    {"prompt": "x", "top_k": -3},
    {"prompt": "x", "max_new_tokens": 0},
    {"prompt": "x", "max_new_tokens": "3"},
    {"prompt": "x", "unknown": 1},
    {"prompt": "x", "prompts": ["y"]},
    {"prompt": ""},
    {"prompt": "x", "top_k": 50258},
    {"prompts": []},
])
def test_api_generate_invalid_values_are_422(client, body):
    assert_error(client.post("/api/generate", json=body), 422, "invalid_request_error")


def test_prompt_beyond_context_is_422(client):
    err = assert_error(client.post("/v1/completions", json={"prompt": "word " * 20, "max_tokens": 60}), 422)
    assert err["param"] == "prompt"
    assert_error(client.post("/api/generate", json={"prompt": "hello", "max_new_tokens": 64}), 422)
    err = assert_error(client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 64}), 422)
    assert err["param"] == "max_tokens" and "context is 64" in err["message"]


def test_too_many_prompts_is_422(make_app, tiny):
    c = make_app({**FAST, "max_prompts": 2}, {"tiny": tiny}).test_client()
    assert_error(c.post("/api/generate", json={"prompts": ["a", "b", "c"]}), 422, contains="limit is 2")
    assert_error(c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2}), 422, contains="limit is 2")
    assert c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1}).status_code == 200


def test_body_over_limit_is_413(make_app, tiny):
    c = make_app({**FAST, "max_body_bytes": 1024}, {"tiny": tiny}).test_client()
    assert_error(c.post("/v1/completions", json={"prompt": "x" * 2000}), 413, "request_too_large")
    assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_unknown_model_route_and_method(client):
    assert_error(client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404, "model_not_found")
    assert_error(client.get("/no/such/route"), 404, "not_found")
    resp = client.get("/v1/completions")
    assert_error(resp, 405, "method_not_allowed")
    assert "POST" in resp.headers["Allow"]
    assert_error(client.delete("/health"), 405)


# --------------------------------------------------------------------------- limits under load


def test_full_waiting_line_answers_429_at_once_with_retry_after(make_app, slow):
    gen, _ = slow
    c = make_app({**FAST, "max_batch_rows": 1, "max_prompts": 1, "max_queue": 1}, {"slow": gen}).test_client()
    held = c.post("/v1/completions", json={"prompt": "hold", "max_tokens": 40, "stream": True}, buffered=False)
    assert held.status_code == 200
    next(iter(held.response))  # decoding: the batch's only row is taken
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.update(
        r=c.post("/api/generate", json={"prompt": "wait", "max_new_tokens": 2})))
    thread.start()
    assert wait_for(lambda: metric(c, "distill_queue_depth", model="slow") == 1)
    t0 = time.monotonic()
    resp = c.post("/api/generate", json={"prompt": "x", "max_new_tokens": 1})
    err = assert_error(resp, 429, "rate_limit_exceeded", contains="limit 1")
    assert time.monotonic() - t0 < 1.0 and resp.headers["Retry-After"] == "1"
    assert metric(c, "distill_generations_in_flight") == 2
    assert metric(c, "distill_generations_rejected_total") == 1
    held.close()  # the running request leaves: the waiting one gets its place
    thread.join(timeout=20)
    assert waiting["r"].status_code == 200 and waiting["r"].get_json()["completions"][0]["completion_tokens"] == 2
    assert wait_for(lambda: metric(c, "distill_generations_in_flight") == 0)
    assert c.post("/api/generate", json={"prompt": "x", "max_new_tokens": 1}).status_code == 200
    assert "queue" in err["message"] or "waiting" in err["message"]


def test_client_disconnect_cancels_its_generation(make_app, slow):
    gen, throttle = slow
    c = make_app(FAST, {"slow": gen}).test_client()
    resp = c.post("/v1/completions", json={"prompt": "go on", "max_tokens": 50, "stream": True}, buffered=False)
    chunks = iter(resp.response)
    next(chunks), next(chunks)
    resp.close()  # what the WSGI server does when the socket breaks
    assert wait_for(lambda: metric(c, "distill_completions_total", reason="cancelled") == 1), \
        c.get("/metrics").get_data(as_text=True)
    steps = throttle.steps
    time.sleep(0.2)
    assert throttle.steps == steps, "the model kept running after the client left"
    assert metric(c, "distill_generated_tokens_total") < 50
    assert metric(c, "distill_generations_in_flight") == 0


def test_time_limit_stops_generation_and_reports_it(make_app, slow):
    gen, _ = slow
    c = make_app({**FAST, "time_limit_s": 0.3}, {"slow": gen}).test_client()
    t0 = time.monotonic()
    body = c.post("/api/generate", json={"prompt": "long", "max_new_tokens": 60}).get_json()
    assert time.monotonic() - t0 < 3
    (done,) = body["completions"]
    assert done["finish_reason"] == "time_limit" and done["completion_tokens"] < 60
    openai = c.post("/v1/completions", json={"prompt": "long", "max_tokens": 60}).get_json()
    assert openai["choices"][0]["finish_reason"] == "length"  # OpenAI clients know stop/length only
    assert metric(c, "distill_completions_total", reason="time_limit") == 2


def test_time_limit_while_queued_is_504(make_app, slow):
    gen, throttle = slow
    c = make_app({**FAST, "time_limit_s": 0.5}, {"slow": gen}).test_client()
    throttle.gate.clear()  # the model is stuck in a step: later requests wait in the line
    first = threading.Thread(target=lambda: c.post("/api/generate", json={"prompt": "a", "max_new_tokens": 5}))
    first.start()
    assert wait_for(lambda: throttle.steps >= 1)
    assert_error(c.post("/api/generate", json={"prompt": "b", "max_new_tokens": 5}), 504, "timeout")
    throttle.gate.set()
    first.join(timeout=10)


def test_concurrent_requests_share_one_prefill(make_app, tiny):
    c = make_app({"batch_window_ms": 400, "batch_max_wait_ms": 3000}, {"tiny": tiny}).test_client()
    results: dict[int, object] = {}

    def native(i):
        results[i] = c.post("/api/generate", json={"prompt": f"p{i}", "max_new_tokens": 3 + i}).get_json()

    def streamed(i):
        body = c.post("/v1/completions", json={"prompt": f"s{i}", "max_tokens": 4, "stream": True})
        results[i] = sse_events(body.get_data(as_text=True))

    threads = [threading.Thread(target=native, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=streamed, args=(i,)) for i in range(3, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 5
    assert {results[i]["timings"]["batch_rows"] for i in range(3)} == {5}
    assert [results[i]["completions"][0]["prompt"] for i in range(3)] == ["p0", "p1", "p2"]
    assert metric(c, "distill_prefills_total", model="tiny") == 1
    # Decoded in shared steps: 5 at most (the longest row's tokens), not one run per request (20).
    assert metric(c, "distill_decode_steps_total", model="tiny") <= 5


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_request_joins_the_running_decode_instead_of_waiting_for_it(make_app, slow, batching):
    """Continuous: a short request arriving mid-decode is answered while the long one still runs. Static: after."""
    gen, _ = slow
    c = make_app({**FAST, "batching": batching}, {"slow": gen}).test_client()
    order = []
    long = c.post("/v1/completions", json={"prompt": "long", "max_tokens": 30, "stream": True,
                                           "ignore_eos": True}, buffered=False)
    chunks = iter(long.response)
    next(chunks)  # the long request is decoding

    def finish_long():
        for _ in chunks:
            pass
        order.append("long")

    reader = threading.Thread(target=finish_long)
    reader.start()
    short = c.post("/api/generate", json={"prompt": "short", "max_new_tokens": 3, "ignore_eos": True}).get_json()
    order.append("short")
    reader.join(timeout=30)
    long.close()
    assert short["completions"][0]["completion_tokens"] == 3
    if batching == "continuous":
        assert order == ["short", "long"] and short["timings"]["batch_rows"] == 2
        assert short["timings"]["queue_seconds"] < 0.5  # about one step (20 ms here), not the long request's 30
    else:
        assert order == ["long", "short"] and short["timings"]["batch_rows"] == 1


# --------------------------------------------------------------------------- metrics, config, scripts


def test_metrics_exposition(client):
    # buffered: the test client then closes the response, as every WSGI server does, which is
    # when request latency is observed.
    client.post("/api/generate", json={"prompt": "count me", "max_new_tokens": 2}, buffered=True)
    client.post("/api/generate", data="{", content_type="application/json")
    client.get("/missing")
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain; version=")
    text = resp.get_data(as_text=True)
    for name in ("distill_http_requests_total", "distill_http_errors_total", "distill_http_request_duration_seconds",
                 "distill_generated_tokens_total", "distill_generations_in_flight", "distill_queue_depth",
                 "distill_time_to_first_token_seconds", "distill_decode_steps_total", "distill_prefills_total",
                 "distill_queue_wait_seconds", "distill_running_rows", "distill_batch_rows"):
        assert f"# TYPE {name} " in text, name
    assert metric(client, "distill_http_requests_total", route="/api/generate", status="200") == 1
    assert metric(client, "distill_http_errors_total", route="/api/generate", type="invalid_json") == 1
    assert metric(client, "distill_http_requests_total", route="other", status="404") == 1
    assert metric(client, "distill_generated_tokens_total", model="tiny") >= 1
    assert metric(client, "distill_http_request_duration_seconds_count", route="/api/generate") >= 1
    assert 'le="+Inf"' in text


def test_metric_labels_are_a_closed_set(client):
    """Made-up methods and paths land on "other": no request can add series to /metrics."""
    before = client.get("/metrics").get_data(as_text=True).count("\n")
    for i in range(20):
        client.open(f"/made/up/{i}", method=f"BREW{i}")
        client.get(f"/nothing/{i}")
    lines = client.get("/metrics").get_data(as_text=True).splitlines()
    assert not [line for line in lines if "BREW" in line or "/made/up" in line or "/nothing" in line]
    assert metric(client, "distill_http_requests_total", route="other", method="other") == 20
    assert metric(client, "distill_http_requests_total", route="other", method="GET", status="404") == 20
    assert len(lines) - before < 20  # a handful of new series, not one per request


def test_serve_config_from_env_and_validation(tmp_path, monkeypatch):
    cfg = ServeConfig.from_env({"DISTILL_MODEL_DIR": "/m/a", "DISTILL_COMPARE_DIRS": "/m/b, /m/c,",
                                "DISTILL_DEVICE": "cpu", "DISTILL_TIME_LIMIT_S": "12.5", "DISTILL_MAX_QUEUE": "3",
                                "DISTILL_ALLOWED_HOSTS": "box.local, 10.0.0.5", "DISTILL_BATCHING": "static"})
    assert cfg.model_dirs == ["/m/a", "/m/b", "/m/c"] and cfg.device == "cpu"
    assert cfg.time_limit_s == 12.5 and cfg.max_queue == 3 and cfg.batching == "static"
    assert cfg.allowed_hosts == ["box.local", "10.0.0.5"]
    assert cfg.server_threads == cfg.max_batch_rows + 3 + 8
    assert ServeConfig.from_env({}).model_dirs[0].endswith("gpt2_student_v2")
    proxied = ServeConfig.from_env({"DISTILL_BACKEND_URL": "http://127.0.0.1:8000/"})
    assert proxied.model_dirs == [] and proxied.backend_url == "http://127.0.0.1:8000"
    with pytest.raises(ConfigError, match="^unknown ServeConfig key nope; expected some of: model_dirs, host"):
        ServeConfig(nope=1)
    with pytest.raises(ConfigError, match=r"^ServeConfig.max_queue \(DISTILL_MAX_QUEUE\): input should be greater than "
                       "or equal to 1, got 0$"):
        ServeConfig(max_queue=0)
    with pytest.raises(ConfigError, match="batching"):
        ServeConfig(batching="sometimes")
    with pytest.raises(ConfigError, match="http"):
        ServeConfig(backend_url="ftp://x")
    with pytest.raises(ConfigError, match="model_dirs is empty"):
        ServeConfig(model_dirs=[])
    with pytest.raises(ConfigError, match=r"max_prompts \(64\) cannot exceed max_batch_rows \(32\)"):
        ServeConfig(max_prompts=64)
    assert ServeConfig(model_dirs=tmp_path).model_dirs == [str(tmp_path)]
    monkeypatch.setenv("DISTILL_MAX_QUEUE", "5")  # keyword construction reads no environment; from_env does
    assert ServeConfig().max_queue == 64 and ServeConfig.from_env().max_queue == 5
    with pytest.raises(ConfigError, match=r"\(DISTILL_MAX_PROMPTS\): input should be a valid integer.*got 'many'"):
        ServeConfig.from_env({"DISTILL_MAX_PROMPTS": "many"})


def test_wsgi_module_reads_the_environment(tiny_dir, monkeypatch):
    monkeypatch.setenv("DISTILL_MODEL_DIR", str(tiny_dir))
    monkeypatch.setenv("DISTILL_DEVICE", "cpu")
    sys.modules.pop("python3_distillation.serving.wsgi", None)
    wsgi = importlib.import_module("python3_distillation.serving.wsgi")
    try:
        c = wsgi.app.test_client()
        assert wait_for(lambda: c.get("/ready").status_code == 200)
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
    finally:
        wsgi.app.extensions["distill"].close()
        sys.modules.pop("python3_distillation.serving.wsgi", None)


@pytest.mark.parametrize("script, name", [("distill_api_server_v2.py", "v2"), ("distill_api_server.py", "v1")])
def test_entry_scripts_run_from_the_repo_root(script, name):
    proc = subprocess.run([sys.executable, f"python3_distillation/{script}", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "6006" in proc.stdout and "--compare" in proc.stdout and f"Serve the {name} student" in proc.stdout
    assert "gunicorn" in proc.stdout and "--backend" in proc.stdout


def test_close_stops_the_batcher_threads(tiny):
    from python3_distillation.serving.app import create_app

    app = create_app(FAST, generators={"tiny": tiny})
    st = app.extensions["distill"]
    thread = st.batchers["tiny"]._thread
    assert thread.is_alive()
    st.close()
    assert not thread.is_alive()
    st.close()  # twice is fine
    assert_error(app.test_client().post("/api/generate", json={"prompt": "hi"}), 503, "not_ready")


def test_precision_comes_from_the_folders_lineage(make_app, tiny_dir, tmp_path):
    import json
    import shutil

    from python3_distillation.generation import Generator

    folder = tmp_path / "int8_student"
    shutil.copytree(tiny_dir, folder)
    (folder / "distill_meta.json").write_text(json.dumps({"quantization": {"scheme": "int8"}}), encoding="utf-8")
    gen = Generator.from_pretrained(folder, device="cpu")
    assert gen.precision == "int8"
    c = make_app(FAST, {"q": gen}).test_client()
    assert c.get("/api/info").get_json()["models"][0]["precision"] == "int8"
    assert c.get("/v1/models").get_json()["data"][0]["precision"] == "int8"
    assert "int8" in c.get("/").get_data(as_text=True)
    bf16 = Generator.from_pretrained(tiny_dir, device="cpu", dtype="bf16")
    assert bf16.precision == "bf16"


def test_a_compiled_server_has_its_step_ready_before_it_is_ready_and_answers_as_the_eager_one(make_app, tiny_dir, tiny):
    """compile=True: loading compiles (or loads) the step for 1 and 2+ rows before /ready says 200, so
    no request waits behind a compile; greedy answers, alone and batched, are the eager ones."""
    from python3_distillation.generation import SamplingParams

    app = make_app(ServeConfig(model_dirs=[str(tiny_dir)], batch_window_ms=5, load_in_background=False, compile=True))
    (batcher,) = app.extensions["distill"].batchers.values()
    assert batcher.generator.compile and set(batcher.generator._step.compile_seconds) == {1, "2+"}
    c = app.test_client()
    assert c.get("/ready").status_code == 200
    assert c.get("/api/info").get_json()["models"][0]["decode_step"] == "compiled"
    prompts = ["It is a truth", "Emma Woodhouse, handsome", "The"]
    want = [x.text for x in tiny.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))]
    one = c.post("/api/generate", json={"prompt": prompts[0], "max_new_tokens": 8, "temperature": 0,
                                        "ignore_eos": True}).get_json()
    many = c.post("/v1/completions", json={"prompt": prompts, "max_tokens": 8, "temperature": 0,
                                           "ignore_eos": True}).get_json()
    assert one["completions"][0]["text"] == want[0]
    assert [choice["text"] for choice in sorted(many["choices"], key=lambda x: x["index"])] == want


def test_compile_auto_falls_back_to_eager_decoding_and_compile_true_fails_loudly(make_app, tiny_dir, monkeypatch,
                                                                                 caplog):
    """The default, auto, compiles on a CPU with a C++ compiler; when compiling fails the server still
    loads and decodes eagerly, saying why. compile=True makes that failure the server's."""
    from python3_distillation.generation.compiled import CompiledStep

    assert ServeConfig(model_dirs=[str(tiny_dir)]).compile == "auto"
    assert [ServeConfig.from_env({"DISTILL_COMPILE": v}).compile for v in ("auto", "1", "off")] == ["auto", True, False]
    with pytest.raises(ConfigError, match="compile"):
        ServeConfig.from_env({"DISTILL_COMPILE": "sometimes"})

    def broken(self, *args):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(CompiledStep, "_runner", broken)
    app = make_app(ServeConfig(model_dirs=[str(tiny_dir)], load_in_background=False))
    (batcher,) = app.extensions["distill"].batchers.values()
    assert not batcher.generator.compile and batcher.generator._step is None
    assert "decoding eagerly, the compiled step is not available: no C++ compiler here" in caplog.text
    c = app.test_client()
    assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert c.get("/api/info").get_json()["models"][0]["decode_step"] == "eager"
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        make_app(ServeConfig(model_dirs=[str(tiny_dir)], load_in_background=False, compile=True))
