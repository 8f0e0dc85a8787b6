"""The page and API in front of an OpenAI-compatible backend (``DISTILL_BACKEND_URL``): here the project's
own server on a free port plays the backend, as vLLM would.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/serving/test_proxy.py -q
"""

from __future__ import annotations

import pytest

from .helpers import FAST, assert_error, free_port, sse_events


@pytest.fixture
def backend(make_app, tiny, serve_in_thread) -> tuple[str, object]:
    app = make_app(FAST, {"tiny": tiny})
    return serve_in_thread(app), app.test_client()


@pytest.fixture
def proxy(make_app, backend):
    base, _ = backend
    return make_app({**FAST, "backend_url": base}).test_client()


def test_models_and_info_come_from_the_backend(proxy, backend):
    _, direct = backend
    mine, theirs = proxy.get("/v1/models").get_json()["data"], direct.get("/v1/models").get_json()["data"]
    # `created` is the second each answer was made: the two calls may straddle a second boundary.
    assert [abs(a.pop("created") - b.pop("created")) <= 1 for a, b in zip(mine, theirs)] == [True] * len(theirs)
    assert mine == theirs and len(mine) == 1
    info = proxy.get("/api/info").get_json()
    assert info["ready"] and info["backend"] == "openai-compatible" and info["default"] == "tiny"
    (m,) = info["models"]
    assert m["id"] == "tiny" and m["context_length"] == 64 and m["precision"] == "fp32"
    assert proxy.get("/ready").get_json() == {"status": "ready", "models": ["tiny"]}
    assert proxy.get("/health").status_code == 200
    page = proxy.get("/").get_data(as_text=True)
    assert 'id="prompt"' in page and "/api/generate" not in page


def test_completions_pass_through_plain_and_streamed(proxy, backend):
    _, direct = backend
    ask = {"model": "tiny", "prompt": ["It is a truth", "Hello"], "max_tokens": 6, "temperature": 0}
    mine, theirs = proxy.post("/v1/completions", json=ask), direct.post("/v1/completions", json=ask)
    assert mine.status_code == 200
    texts = [c["text"] for c in mine.get_json()["choices"]]
    assert texts == [c["text"] for c in theirs.get_json()["choices"]] and all(texts)
    streamed = proxy.post("/v1/completions", json={**ask, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and streamed.mimetype == "text/event-stream"
    chunks = sse_events(streamed.get_data(as_text=True))
    for i, text in enumerate(texts):
        assert "".join(ch["text"] for c in chunks for ch in c["choices"] if ch["index"] == i) == text
    assert chunks[-1]["usage"]["completion_tokens"] == mine.get_json()["usage"]["completion_tokens"]


def test_errors_are_checked_here_or_passed_through(proxy):
    # refused here, by the same schema as the built-in generator
    assert_error(proxy.post("/v1/completions", json={"prompt": "hi", "top_k": 2**63}), 422)
    assert_error(proxy.post("/v1/completions", data="x", content_type="text/plain"), 415)
    assert_error(proxy.get("/", headers={"Host": "evil.example"}), 421)
    # refused by the backend, answered with its own status and body
    err = assert_error(proxy.post("/v1/completions", json={"prompt": "hi", "model": "gpt-4"}), 404, "model_not_found")
    assert "gpt-4" in err["message"]
    assert_error(proxy.post("/v1/completions", json={"prompt": "word " * 100, "max_tokens": 4}), 422)
    assert_error(proxy.post("/api/generate", json={"prompt": "hi"}), 404)  # the native API is the local models'


def test_an_unreachable_backend_is_a_clear_502_and_not_ready(make_app):
    c = make_app({**FAST, "backend_url": f"http://127.0.0.1:{free_port()}"}).test_client()
    assert_error(c.post("/v1/completions", json={"prompt": "hi"}), 502, "backend_error", contains="unreachable")
    ready = c.get("/ready")
    assert_error(ready, 503, contains="unreachable")
    assert c.get("/health").status_code == 200  # this process is alive; the backend is not
    info = c.get("/api/info").get_json()
    assert info["ready"] is False and "unreachable" in info["error"]
