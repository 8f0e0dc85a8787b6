"""The application factory: ``create_app(config, generators=None)`` → a Flask app serving page and APIs.

    HF_HUB_OFFLINE=1 python -c "from python3_distillation.serving.app import create_app; \
app = create_app({'model_dirs': ['python3_distillation/gpt2_student_v2'], 'load_in_background': False}); \
print(app.test_client().get('/ready').get_json()); app.extensions['distill'].close()"

Routes and the guards' reasons: README.md, "Serving"; what this module holds: docs/design/serving.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from functools import cache, partial

from flask import Blueprint, Flask, Response, g, jsonify, render_template, request

from python3_distillation.generation import Generator
from python3_distillation.paths import PACKAGE_DIR
from python3_distillation.serving import api, errors, proxy
from python3_distillation.serving.api import state
from python3_distillation.serving.errors import HTTP_ERROR_TYPES, ApiError, error_response, not_ready
from python3_distillation.serving.metrics import CONTENT_TYPE, METHODS, OTHER
from python3_distillation.serving.settings import ServeConfig
from python3_distillation.serving.state import ServingState

log = logging.getLogger(__name__)

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
LANGUAGES = ("en", "zh")
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "*"})
bp = Blueprint("common", __name__)  # the page and the probes


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
        app.register_blueprint(api.bp)
        if generators:
            st.install(dict(generators))
        elif cfg.check_model_dirs().load_in_background:
            threading.Thread(target=_load_quietly, args=(st,), name="model-loader", daemon=True).start()
        else:
            st.load()
    app.extensions["distill"] = st
    app.register_blueprint(bp)
    errors.install(app)
    app.before_request(partial(_before, HostAllowList(cfg)))
    app.after_request(_after)
    gunicorn_log = logging.getLogger("gunicorn.error")
    if gunicorn_log.handlers:  # under gunicorn: one log stream, one level
        for name in ("python3_distillation", app.logger.name):
            logging.getLogger(name).handlers = gunicorn_log.handlers
            logging.getLogger(name).setLevel(gunicorn_log.level)
    return app


def _load_quietly(st: ServingState) -> None:
    with contextlib.suppress(Exception):  # already logged; /health and /ready report it with 503
        st.load()


def host_name(header: str) -> str:
    """``Host`` header → the name without port or brackets, lowercased."""
    h = header.strip().lower()
    if h.startswith("["):  # [::1]:6006
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.rsplit(":", 1)[0]
    return h.rstrip(".")


class HostAllowList:
    """Loopback names, the bind address, ``allowed_hosts``; with a wildcard bind, IPs and single-label names."""

    def __init__(self, config: ServeConfig):
        binds = [host_name(b) for b in config.host.split(",")]
        self.any_host = "*" in config.allowed_hosts
        self.any_ip = any(b in WILDCARD_BINDS for b in binds)
        self.names = LOOPBACK_NAMES | (set(binds) - WILDCARD_BINDS) | {host_name(h) for h in config.allowed_hosts}

    def allows(self, header: str | None) -> bool:
        if self.any_host or not header:
            return self.any_host
        name = host_name(header)
        if name in self.names:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback or self.any_ip
        except ValueError:  # a name: DNS rebinding needs a registered domain, which has a dot
            return self.any_ip and "." not in name and bool(name)


def _before(allow: HostAllowList) -> None:
    """Before every request: its clock and id, then the Host allow-list (421), then JSON bodies for POST (415)."""
    g.t0 = time.monotonic()
    g.request_id = request.headers.get("X-Request-ID", "")[:64] or uuid.uuid4().hex
    host = request.headers.get("Host")
    if not allow.allows(host):
        raise ApiError(421, f"this server does not answer to the host {str(host)[:100]!r}; add it to "
                            "DISTILL_ALLOWED_HOSTS (or --allowed-host) to allow it", "misdirected_request")
    if request.method == "POST" and request.mimetype != "application/json":
        raise ApiError(415, f"POST bodies must be JSON with Content-Type: application/json, got "
                            f"{(request.mimetype or 'none')[:100]!r}", "unsupported_media_type")


def _after(response: Response) -> Response:
    st = state()
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


@cache
def i18n() -> dict[str, dict[str, str]]:
    """The page's strings: ``{key: {"en": ..., "zh": ...}}``."""
    return json.loads((PACKAGE_DIR / "static" / "i18n.json").read_text(encoding="utf-8"))


@bp.get("/")
def index() -> str:
    st = state()
    lang = request.accept_languages.best_match(LANGUAGES, default="en")
    table = i18n()
    # "<" escaped: the table sits inside a <script> block.
    table_json = json.dumps(table, ensure_ascii=False).replace("<", "\\u003c")
    return render_template("index.html", models=list(st.info.values()), default=st.default, lang=lang,
                           t=lambda key: table[key][lang], i18n=table_json, backend=bool(st.config.backend_url))


def _probe(status: int, body: dict) -> Response:
    return jsonify(body) if status == 200 else error_response(not_ready(body))


@bp.get("/health")
def health() -> Response:
    return _probe(*state().health())


@bp.get("/ready")
def ready() -> Response:
    return _probe(*state().readiness())


@bp.get("/metrics")
def metrics() -> Response:
    return Response(state().metrics.render(), content_type=CONTENT_TYPE)
