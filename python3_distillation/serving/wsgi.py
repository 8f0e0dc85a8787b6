"""WSGI entry point for production serving.

    gunicorn --config python:python3_distillation.serving.gunicorn_conf --bind 127.0.0.1:6006 \\
        python3_distillation.serving.wsgi:app

Configured by ``DISTILL_*`` variables (settings.py); gunicorn_conf.py sets ``DISTILL_HOST`` from ``--bind``.
Run it without ``--preload``: design notes, docs/design/serving.md.
"""

from __future__ import annotations

from python3_distillation.serving.app import create_app
from python3_distillation.serving.settings import ServeConfig

app = create_app(ServeConfig.from_env())
