"""Probes for orchestrators and monitoring: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics``.

    curl -s localhost:6006/health; curl -s localhost:6006/ready; curl -s localhost:6006/metrics
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from python3_distillation.serving.errors import ApiError, error_response
from python3_distillation.serving.metrics import CONTENT_TYPE

bp = Blueprint("probes", __name__)


def _answer(status: int, body: dict) -> Response:
    if status == 200:
        return jsonify(body)
    # Every error answer carries the error object too, beside the probe's own fields.
    return error_response(ApiError(status, body["reason"], "not_ready", headers={"Retry-After": "5"}, extra=body))


@bp.get("/health")
def health() -> Response:
    return _answer(*current_app.extensions["distill"].health())


@bp.get("/ready")
def ready() -> Response:
    return _answer(*current_app.extensions["distill"].readiness())


@bp.get("/metrics")
def metrics() -> Response:
    return Response(current_app.extensions["distill"].metrics.render(), content_type=CONTENT_TYPE)
