"""The server's Prometheus metrics (``prometheus_client``), one registry per app.

    curl -s localhost:6006/metrics

Label values come from closed sets only. Design notes: docs/design/serving.md.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The *_created series (the time each series appeared) double the output for no use here.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
# Request latency and time to first token, in seconds: from a cached page to a long generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The server's metrics, named once here so routes and the batcher agree on them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def per_model(kind, name: str, doc: str, *labels: str, **kw):
            return kind(name, doc, ("model", *labels), registry=r, **kw)

        self.requests = Counter("distill_http_requests", "HTTP requests by route, method and status.",
                                ("route", "method", "status"), registry=r)
        self.errors = Counter("distill_http_errors", "Error responses by route and error type.", ("route", "type"),
                              registry=r)
        self.latency = Histogram("distill_http_request_duration_seconds",
                                 "Time from request to the last byte of the response.", ("route",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("distill_generations_in_flight",
                               "Generation requests admitted (waiting or decoding) and not yet answered.", registry=r)
        self.rejected = Counter("distill_generations_rejected",
                                "Generation requests refused with 429 because the waiting line was full.", registry=r)
        self.queue_depth = per_model(Gauge, "distill_queue_depth", "Requests waiting for a place in the running batch.")
        self.queue_wait = per_model(Histogram, "distill_queue_wait_seconds",
                                    "From a request's arrival to its rows joining.", buckets=LATENCY_BUCKETS)
        self.running_rows = per_model(Gauge, "distill_running_rows", "Rows decoding now.")
        self.steps = per_model(Counter, "distill_decode_steps", "Decode steps run (one token for every row).")
        self.batch_rows = per_model(Histogram, "distill_batch_rows", "Rows per decode step.", buckets=ROW_BUCKETS)
        self.joins = per_model(Counter, "distill_prefills", "Prefills: groups of requests joining the batch.")
        self.prompt_tokens = per_model(Counter, "distill_prompt_tokens", "Prompt tokens processed.")
        self.generated_tokens = per_model(Counter, "distill_generated_tokens", "Tokens generated.")
        self.ttft = per_model(Histogram, "distill_time_to_first_token_seconds",
                              "From a request's arrival to its first generated text.", buckets=LATENCY_BUCKETS)
        self.finished = per_model(Counter, "distill_completions", "Finished completions by finish reason.", "reason")
        self.ready = Gauge("distill_ready", "1 once every model is loaded.", registry=r)

    def add_model(self, name: str) -> None:
        """Start a model's series at zero, so a scrape shows them before the first request."""
        for metric in (self.queue_depth, self.running_rows, self.steps, self.joins, self.prompt_tokens,
                       self.generated_tokens):
            metric.labels(model=name)

    def render(self) -> bytes:
        return generate_latest(self.registry)
