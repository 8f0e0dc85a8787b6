"""The page in front of any OpenAI-compatible server (``DISTILL_BACKEND_URL``, e.g. vLLM) instead of local models.

    vllm serve python3_distillation/gpt2_student_v2 --port 8000
    DISTILL_BACKEND_URL=http://127.0.0.1:8000 python python3_distillation/distill_api_server_v2.py

What it forwards: README.md, "Serving" (another engine behind the page); design notes: docs/design/serving.md.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request

from python3_distillation.serving.api import SSE_HEADERS, limits, read_completions, sse, state
from python3_distillation.serving.errors import ApiError
from python3_distillation.serving.metrics import ServerMetrics
from python3_distillation.serving.settings import ServeConfig

log = logging.getLogger(__name__)

bp = Blueprint("proxy", __name__)
CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 2.0
CHUNK = 16384


class Backend:
    """HTTP(S) requests to the backend's base URL."""

    def __init__(self, url: str):
        u = urllib.parse.urlsplit(url)
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (443 if self.https else 80)
        self.base = u.path.rstrip("/")

    def open(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[Any, Any]:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=min(timeout, CONNECT_TIMEOUT_S))
        try:
            conn.connect()
            conn.sock.settimeout(timeout)  # reading a long generation may take the whole time limit
            headers = {"Accept": "application/json, text/event-stream"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, self.base + path, body=body, headers=headers)
            return conn, conn.getresponse()
        except TimeoutError:  # socket.timeout too
            conn.close()
            raise ApiError(504, "the OpenAI-compatible backend did not answer in time", "timeout") from None
        except OSError as e:
            conn.close()
            raise ApiError(502, f"the OpenAI-compatible backend is unreachable ({type(e).__name__})",
                           "backend_error") from None

    def get_json(self, path: str, timeout: float) -> tuple[int, Any]:
        conn, resp = self.open("GET", path, None, timeout)
        with contextlib.closing(conn):
            raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            raise ApiError(502, f"the backend answered {path} with something that is not JSON",
                           "backend_error") from None


class ProxyState:
    """What probes, the page and the routes need, when an OpenAI-compatible backend answers."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = ServerMetrics()
        self.backend = Backend(config.backend_url or "")
        self.default: str | None = None
        self.info: dict[str, dict[str, Any]] = {}  # the page renders its model cards from /api/info

    def models(self) -> list[dict[str, Any]]:
        status, body = self.backend.get_json("/v1/models", PROBE_TIMEOUT_S)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise ApiError(502, f"the backend answered /v1/models with HTTP {status}", "backend_error")
        return [{"id": m["id"], "n_params": m.get("n_params"),
                 "context_length": m.get("context_length") or m.get("max_model_len"),
                 "precision": m.get("precision"), "device": "backend", "n_layer": m.get("n_layer"), "size": None}
                for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def health(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "ok", "models": "backend"}

    def readiness(self) -> tuple[int, dict[str, Any]]:
        try:
            models = self.models()
        except ApiError as e:
            return 503, {"status": "failed", "reason": e.message}
        return 200, {"status": "ready", "models": [m["id"] for m in models]}

    def close(self) -> None:
        pass  # nothing runs in the background


@bp.get("/v1/models")
def models() -> Response:
    status, body = state().backend.get_json("/v1/models", PROBE_TIMEOUT_S)
    return Response(json.dumps(body), status=status, mimetype="application/json")


@bp.get("/api/info")
def info() -> Response:
    st = state()
    try:
        models, error = st.models(), None
    except ApiError as e:
        models, error = [], e.message
    body = {"ready": bool(models), "error": error, "default": models[0]["id"] if models else None,
            "backend": "openai-compatible", "models": models, "limits": limits(st.config)}
    return Response(json.dumps(body), mimetype="application/json")


@bp.post("/v1/completions")
def completions() -> Response:
    st = state()
    raw = request.get_data(cache=True)
    read_completions(st.config.max_prompts)  # the same bounds as the built-in generator, then sent as is
    conn, resp = st.backend.open("POST", "/v1/completions", raw, st.config.time_limit_s)
    kind = resp.getheader("Content-Type", "application/json")
    if not kind.startswith("text/event-stream"):
        with contextlib.closing(conn):
            return Response(resp.read(), status=resp.status, content_type=kind)

    def relay() -> Iterator[bytes]:
        started = time.monotonic()
        try:
            yield from iter(lambda: resp.read1(CHUNK), b"")  # until the backend ends the stream
        except OSError as e:  # the backend went away mid-stream: end with an error event the page shows
            log.warning("backend stream broke after %.1f s: %r", time.monotonic() - started, e)
            err = ApiError(502, f"the backend stream broke ({type(e).__name__})", "backend_error")
            yield (sse(err.body()) + "data: [DONE]\n\n").encode()
        finally:  # also on client disconnect: closing the connection stops the backend's generation
            conn.close()

    response = Response(relay(), status=resp.status, mimetype="text/event-stream", headers=SSE_HEADERS)
    response.call_on_close(conn.close)
    return response
