"""The application factory: ``create_app(config, generators=None)`` → a Flask app serving page and APIs.

    HF_HUB_OFFLINE=1 python -c "from python3_distillation.serving.app import create_app; \
app = create_app({'model_dirs': ['python3_distillation/gpt2_student_v2'], 'load_in_background': False}); \
print(app.test_client().get('/ready').get_json()); app.extensions['distill'].close()"

Routes: ``/`` (page), ``POST /api/generate``, ``POST /v1/completions`` (``stream`` → SSE),
``GET /v1/models``, ``/api/info``, ``/health``, ``/ready``, ``/metrics``. Every error is JSON:
``{"error": {"message", "type", "param", "code"}}``. ``app.extensions["distill"]`` is the app's
state; its ``close()`` stops the batcher threads (done at process exit for every app still open).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from flask import Flask, Response, current_app, g, request

from python3_distillation.generation import GenerationError, Generator
from python3_distillation.paths import PACKAGE_DIR
from python3_distillation.serving import errors, guards, native_api, openai_api, page, probes, proxy
from python3_distillation.serving.errors import HTTP_ERROR_TYPES
from python3_distillation.serving.metrics import METHODS, OTHER
from python3_distillation.serving.settings import ServeConfig
from python3_distillation.serving.state import ServingState

log = logging.getLogger(__name__)

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def create_app(config: ServeConfig | Mapping | None = None,
               generators: Mapping[str, Generator] | None = None) -> Flask:
    """Build the app; with ``generators`` given they are served as-is (tests, notebooks)."""
    cfg = ServeConfig(**(config or {})) if config is None or isinstance(config, Mapping) else config
    app = Flask(__name__, template_folder=str(PACKAGE_DIR / "templates"), static_folder=str(PACKAGE_DIR / "static"))
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.json.sort_keys = False  # keep "error" bodies and completions in a readable order

    if cfg.backend_url:
        st = proxy.ProxyState(cfg)
        app.register_blueprint(proxy.bp)
    else:
        st = ServingState(cfg)
        app.register_blueprint(openai_api.bp)
        app.register_blueprint(native_api.bp)
        if generators:
            st.install(dict(generators))
        else:
            missing = [d for d in cfg.model_dirs if not Path(d).is_dir()]
            if missing:  # fail now, not after the server claims to be up
                raise GenerationError(f"model folder(s) not found: {', '.join(missing)} "
                                      "(train them first, or pass --model / DISTILL_MODEL_DIR)")
            if cfg.load_in_background:
                threading.Thread(target=_load_quietly, args=(st,), name="model-loader", daemon=True).start()
            else:
                st.load()
    app.extensions["distill"] = st
    app.register_blueprint(page.bp)
    app.register_blueprint(probes.bp)
    errors.install(app)
    allow = guards.HostAllowList(cfg)
    app.before_request(lambda: _before(allow))
    app.after_request(_after)
    _attach_gunicorn_logging(app)
    return app


def _load_quietly(st: ServingState) -> None:
    try:
        st.load()
    except Exception:
        pass  # already logged; /health and /ready report it with 503


def _before(allow: guards.HostAllowList) -> None:
    g.t0 = time.monotonic()
    g.request_id = request.headers.get("X-Request-ID", "")[:64] or uuid.uuid4().hex
    guards.check_request(allow)


def _after(response: Response) -> Response:
    st = current_app.extensions["distill"]
    route = request.url_rule.rule if request.url_rule else OTHER  # the app's own rules: a closed set
    status = response.status_code
    method = request.method if request.method in METHODS else OTHER  # a closed set too
    st.metrics.requests.labels(route=route, method=method, status=str(status)).inc()
    if status >= 400:
        kind = g.get("error_type", HTTP_ERROR_TYPES.get(status, "http_error"))
        st.metrics.errors.labels(route=route, type=kind).inc()
    t0 = g.get("t0", time.monotonic())
    # Observed at close, so a stream's latency covers its whole body.
    response.call_on_close(lambda: st.metrics.latency.labels(route=route).observe(time.monotonic() - t0))
    response.headers["X-Request-ID"] = g.get("request_id", "")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers["Vary"] = "Accept-Language"
    return response


def _attach_gunicorn_logging(app: Flask) -> None:
    gunicorn_log = logging.getLogger("gunicorn.error")
    if gunicorn_log.handlers:  # under gunicorn: one log stream, one level
        for name in ("python3_distillation", app.logger.name):
            logger = logging.getLogger(name)
            logger.handlers = gunicorn_log.handlers
            logger.setLevel(gunicorn_log.level)
