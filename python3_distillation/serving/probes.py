"""Probes for orchestrators and monitoring: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics``.

    curl -s localhost:6006/health; curl -s localhost:6006/ready; curl -s localhost:6006/metrics
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from python3_distillation.serving.metrics import CONTENT_TYPE

bp = Blueprint("probes", __name__)


def _answer(status: int, body: dict) -> Response:
    if status != 200:  # every error answer carries the error object too
        body = {**body, "error": {"message": body["reason"], "type": "not_ready", "param": None, "code": status}}
    response = jsonify(body)
    response.status_code = status
    if status != 200:
        response.headers["Retry-After"] = "5"
    return response


@bp.get("/health")
def health() -> Response:
    return _answer(*current_app.extensions["distill"].health())


@bp.get("/ready")
def ready() -> Response:
    return _answer(*current_app.extensions["distill"].readiness())


@bp.get("/metrics")
def metrics() -> Response:
    return Response(current_app.extensions["distill"].metrics.render(), content_type=CONTENT_TYPE)
