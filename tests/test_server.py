"""Flask test-client tests of every route and every error of the server, on a tiny random model.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/test_server.py -q
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from python3_distillation.generate import Generator
from python3_distillation.server import ServeConfig, create_app, main

REPO = Path(__file__).resolve().parent.parent
FAST = {"batch_window_ms": 1.0}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from python3_distillation.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("tiny")
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257))
    model.save_pretrained(out)
    load_tokenizer("gpt2").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Generator:
    return Generator.from_pretrained(tiny_dir, device="cpu")


class Throttle:
    """Slows a Generator down: before each decode event it waits for ``gate``, then sleeps ``delay``.

    It wraps ``stream_batch`` (the decode is lazy, so each pulled event is a decode step), which
    keeps the tests independent of how the generator runs the model.
    """

    def __init__(self, generator: Generator, delay: float = 0.0):
        self.delay, self.gate, self.steps = delay, threading.Event(), 0
        self.gate.set()
        inner = generator.stream_batch

        def stream_batch(*args, **kwargs):
            for event in inner(*args, **kwargs):
                self.steps += 1
                self.gate.wait(timeout=10)
                if self.delay:
                    time.sleep(self.delay)
                yield event

        generator.stream_batch = stream_batch  # instance attribute: only this generator

    def remove(self) -> None:
        self.gate.set()


@pytest.fixture
def slow(tiny_dir):
    """A private copy of the tiny model (hooks must not leak into other tests), 20 ms per step."""
    gen = Generator.from_pretrained(tiny_dir, device="cpu")
    throttle = Throttle(gen, delay=0.02)
    yield gen, throttle
    throttle.remove()


@pytest.fixture
def client(tiny):
    return create_app(FAST, generators={"tiny": tiny}).test_client()


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


# --------------------------------------------------------------------------- plain routes


def test_health_ready_info_models(client):
    assert client.get("/health").get_json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    info = client.get("/api/info").get_json()
    assert info["ready"] and info["default"] == "tiny"
    (m,) = info["models"]
    assert m["n_params"] > 1_000_000 and m["context_length"] == 64 and m["size_bytes"] == 4 * m["n_params"]
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


def test_ready_is_503_until_models_are_loaded(tiny_dir, tiny, monkeypatch):
    import python3_distillation.server as server

    release = threading.Event()

    def slow_load(path, device=None, dtype=None):
        release.wait(timeout=10)
        return tiny

    monkeypatch.setattr(server.Generator, "from_pretrained", staticmethod(slow_load))
    app = create_app(ServeConfig(model_dirs=[str(tiny_dir)], batch_window_ms=1))
    c = app.test_client()
    assert c.get("/health").status_code == 200
    assert_error(c.get("/ready"), 503, "not_ready")
    assert_error(c.post("/api/generate", json={"prompt": "hi"}), 503, "not_ready")
    assert c.get("/api/info").get_json()["ready"] is False
    release.set()
    assert wait_for(lambda: c.get("/ready").status_code == 200)
    assert c.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_missing_model_folder_fails_at_startup(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        create_app({"model_dirs": [str(tmp_path / "nope")]})
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
    assert body["timings"]["total_seconds"] > 0 and body["timings"]["batch_rows"] == 1

    many = client.post("/api/generate", json={"prompts": ["a", "b c", "<script>x</script>"], "max_new_tokens": 3,
                                              "temperature": 0}).get_json()
    assert [c["prompt"] for c in many["completions"]] == ["a", "b c", "<script>x</script>"]
    assert many["usage"]["completion_tokens"] == sum(c["completion_tokens"] for c in many["completions"])


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
])
def test_api_generate_invalid_values_are_422(client, body):
    assert_error(client.post("/api/generate", json=body), 422, "invalid_request_error")


def test_prompt_beyond_context_is_422(client):
    err = assert_error(client.post("/v1/completions", json={"prompt": "word " * 20, "max_tokens": 60}), 422)
    assert err["param"] == "prompt"
    assert_error(client.post("/api/generate", json={"prompt": "hello", "max_new_tokens": 64}), 422)
    err = assert_error(client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 64}), 422)
    assert err["param"] == "max_tokens" and "context is 64" in err["message"]


def test_too_many_prompts_is_422(tiny):
    c = create_app({**FAST, "max_prompts": 2}, generators={"tiny": tiny}).test_client()
    assert_error(c.post("/api/generate", json={"prompts": ["a", "b", "c"]}), 422, contains="limit is 2")
    assert_error(c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2}), 422, contains="limit is 2")
    assert c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1}).status_code == 200


def test_body_over_limit_is_413(tiny):
    c = create_app({**FAST, "max_body_bytes": 1024}, generators={"tiny": tiny}).test_client()
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


def test_concurrency_cap_answers_429_without_waiting(slow):
    gen, _ = slow
    c = create_app({**FAST, "max_concurrent": 1}, generators={"slow": gen}).test_client()
    held = c.post("/v1/completions", json={"prompt": "hold", "max_tokens": 40, "stream": True}, buffered=False)
    assert held.status_code == 200
    next(iter(held.response))  # the generation is running and holds the only slot
    t0 = time.monotonic()
    err = assert_error(c.post("/api/generate", json={"prompt": "x", "max_new_tokens": 1}), 429, "rate_limit_exceeded")
    assert time.monotonic() - t0 < 1.0 and "limit 1" in err["message"]
    assert metric(c, "distill_generations_in_flight") == 1
    assert metric(c, "distill_generations_rejected_total") == 1
    held.close()
    assert metric(c, "distill_generations_in_flight") == 0
    assert c.post("/api/generate", json={"prompt": "x", "max_new_tokens": 1}).status_code == 200


def test_client_disconnect_cancels_its_generation(slow):
    gen, throttle = slow
    c = create_app(FAST, generators={"slow": gen}).test_client()
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


def test_time_limit_stops_generation_and_reports_it(slow):
    gen, _ = slow
    c = create_app({**FAST, "time_limit_s": 0.3}, generators={"slow": gen}).test_client()
    t0 = time.monotonic()
    body = c.post("/api/generate", json={"prompt": "long", "max_new_tokens": 60}).get_json()
    assert time.monotonic() - t0 < 3
    (done,) = body["completions"]
    assert done["finish_reason"] == "time_limit" and done["completion_tokens"] < 60
    openai = c.post("/v1/completions", json={"prompt": "long", "max_tokens": 60}).get_json()
    assert openai["choices"][0]["finish_reason"] == "length"  # OpenAI clients know stop/length only
    assert metric(c, "distill_completions_total", reason="time_limit") == 2


def test_time_limit_while_queued_is_504(slow):
    gen, throttle = slow
    c = create_app({**FAST, "time_limit_s": 0.5}, generators={"slow": gen}).test_client()
    throttle.gate.clear()  # the model is stuck in a step: later requests wait in the queue
    first = threading.Thread(target=lambda: c.post("/api/generate", json={"prompt": "a", "max_new_tokens": 5}))
    first.start()
    assert wait_for(lambda: throttle.steps >= 1)
    assert_error(c.post("/api/generate", json={"prompt": "b", "max_new_tokens": 5}), 504, "timeout")
    throttle.gate.set()
    first.join(timeout=10)


def test_concurrent_requests_share_one_batch(tiny):
    c = create_app({"batch_window_ms": 400, "batch_max_wait_ms": 3000}, generators={"tiny": tiny}).test_client()
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
    assert len({results[i]["timings"]["batch_id"] for i in range(3)}) == 1
    assert [results[i]["completions"][0]["prompt"] for i in range(3)] == ["p0", "p1", "p2"]
    assert metric(c, "distill_batches_total", model="tiny") == 1
    assert metric(c, "distill_batch_rows_sum", model="tiny") == 5


# --------------------------------------------------------------------------- metrics, config, scripts


def test_metrics_exposition(client):
    # buffered: the test client then closes the response, as every WSGI server does, which is
    # when request latency is observed.
    client.post("/api/generate", json={"prompt": "count me", "max_new_tokens": 2}, buffered=True)
    client.post("/api/generate", data="{")
    client.get("/missing")
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = resp.get_data(as_text=True)
    for name in ("distill_http_requests_total", "distill_http_errors_total", "distill_http_request_duration_seconds",
                 "distill_generated_tokens_total", "distill_generations_in_flight", "distill_queue_depth",
                 "distill_time_to_first_token_seconds", "distill_batches_total"):
        assert f"# TYPE {name} " in text, name
    assert metric(client, "distill_http_requests_total", route="/api/generate", status="200") == 1
    assert metric(client, "distill_http_errors_total", route="/api/generate", type="invalid_json") == 1
    assert metric(client, "distill_http_requests_total", route="<unmatched>", status="404") == 1
    assert metric(client, "distill_generated_tokens_total", model="tiny") >= 1
    assert metric(client, "distill_http_request_duration_seconds_count", route="/api/generate") >= 1
    assert 'le="+Inf"' in text


def test_serve_config_from_env_and_validation(tmp_path):
    cfg = ServeConfig.from_env({"DISTILL_MODEL_DIR": "/m/a", "DISTILL_COMPARE_DIRS": "/m/b, /m/c,",
                                "DISTILL_DEVICE": "cpu", "DISTILL_TIME_LIMIT_S": "12.5", "DISTILL_MAX_CONCURRENT": "3"})
    assert cfg.model_dirs == ["/m/a", "/m/b", "/m/c"] and cfg.device == "cpu"
    assert cfg.time_limit_s == 12.5 and cfg.max_concurrent == 3
    assert ServeConfig.from_env({}).model_dirs[0].endswith("gpt2_student_v2")
    with pytest.raises(ValueError, match="unknown ServeConfig keys"):
        ServeConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="max_concurrent"):
        ServeConfig(max_concurrent=0).validate()
    with pytest.raises(ValueError, match="DISTILL_MAX_PROMPTS"):
        ServeConfig.from_env({"DISTILL_MAX_PROMPTS": "many"})


def test_wsgi_module_reads_the_environment(tiny_dir, monkeypatch):
    monkeypatch.setenv("DISTILL_MODEL_DIR", str(tiny_dir))
    monkeypatch.setenv("DISTILL_DEVICE", "cpu")
    sys.modules.pop("python3_distillation.wsgi", None)
    wsgi = importlib.import_module("python3_distillation.wsgi")
    c = wsgi.app.test_client()
    assert wait_for(lambda: c.get("/ready").status_code == 200)
    assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("script, name", [("distill_api_server_v2.py", "v2"), ("distill_api_server.py", "v1")])
def test_entry_scripts_run_from_the_repo_root(script, name):
    proc = subprocess.run([sys.executable, f"python3_distillation/{script}", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "6006" in proc.stdout and "--compare" in proc.stdout and f"Serve the {name} student" in proc.stdout
