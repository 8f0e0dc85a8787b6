"""WSGI entry point for production serving.

    gunicorn --bind 127.0.0.1:6006 --worker-class gthread --workers 1 --threads 8 --timeout 120 \\
        python3_distillation.wsgi:app

Configured by environment variables: ``DISTILL_MODEL_DIR`` (default: the trained v2 student),
``DISTILL_COMPARE_DIRS`` (comma-separated extra models, e.g. the teacher), ``DISTILL_DEVICE``,
and the limits ``DISTILL_MAX_CONCURRENT``, ``DISTILL_MAX_PROMPTS``, ``DISTILL_TIME_LIMIT_S``,
``DISTILL_BATCH_WINDOW_MS``, ``DISTILL_BATCH_MAX_WAIT_MS``, ``DISTILL_MAX_BATCH_ROWS``,
``DISTILL_MAX_BODY_BYTES``.

One worker with threads: the models live once in memory, the batcher sees every request (and so
can batch them), and /metrics counts all of them. Models load in a background thread after the
worker starts (/ready answers 503 until then); do not use ``--preload``, which would load them
in the master and lose the loading thread in the fork.
"""

from __future__ import annotations

from python3_distillation.server import ServeConfig, create_app

app = create_app(ServeConfig.from_env())
