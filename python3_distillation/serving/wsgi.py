"""WSGI entry point for production serving.

    gunicorn --config python:python3_distillation.serving.gunicorn_conf --bind 127.0.0.1:6006 \\
        python3_distillation.serving.wsgi:app

Configured by ``DISTILL_*`` environment variables, one per ``ServeConfig`` field (settings.py).
``DISTILL_HOST`` is the bind address; the gunicorn config sets it from ``--bind``.

One worker with threads: the models live once in memory, the batcher sees every request, and
/metrics counts all of them. Models load in a background thread after the worker starts (/ready
answers 503 until then); do not use ``--preload``, which would load them in the master and lose the
loading thread in the fork.
"""

from __future__ import annotations

from python3_distillation.serving.app import create_app
from python3_distillation.serving.settings import ServeConfig

app = create_app(ServeConfig.from_env())
