"""The production server's settings, shared by the entry scripts, ``make serve-prod`` and the Docker images.

    gunicorn --config python:python3_distillation.serving.gunicorn_conf --bind 127.0.0.1:6006 \\
        python3_distillation.serving.wsgi:app

One gthread worker with ``ServeConfig.server_threads`` threads; why: README.md, "Serving". Command line
options override these.
"""

from __future__ import annotations

import os

from python3_distillation.serving.settings import ServeConfig

bind = ["127.0.0.1:6006"]
worker_class = "gthread"
workers = 1
threads = ServeConfig.from_env().server_threads
# A streamed generation holds its connection far longer than gunicorn's default 30 s.
timeout = 120
graceful_timeout = 30


def on_starting(server) -> None:
    """Tell the app its bind address (for the Host allow-list); the worker inherits the environment."""
    os.environ.setdefault("DISTILL_HOST", ",".join(str(b).rsplit(":", 1)[0] for b in server.cfg.bind))
