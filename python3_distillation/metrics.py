"""Prometheus text exposition for the server, with no dependency beyond the standard library.

    curl -s localhost:6006/metrics

Counters, gauges and histograms keyed by label values; every update takes one lock, which is cheap
next to a forward pass. The values are per process: run one gunicorn worker (the production
command does) or scrape each worker.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

# Request latency and time to first token, in seconds: from a cached page to a long generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = "untyped"

    def __init__(self, registry: Registry, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = registry.lock
        registry.register(self)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.label_names)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, registry: Registry, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(registry, name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}"
                                for k, v in sorted(self._values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, registry: Registry, name: str, help: str, labels: Sequence[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(registry, name, help, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1  # cumulative: every bucket at or above the value
            series[-2] += value
            series[-1] += 1

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return int(series[-1]) if series else 0

    def sum(self, **labels: str) -> float:
        with self._lock:
            series = self._series.get(self._key(labels))
            return series[-2] if series else 0.0

    def render(self) -> list[str]:
        lines = self.header()
        for key, series in sorted(self._series.items()):
            for bound, n in zip(self.buckets, series):
                le = 'le="' + _num(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_num(n)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_num(series[-1])}")
        return lines


class Registry:
    """A set of metrics rendered together; one lock for all keeps a scrape consistent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> None:
        self._metrics.append(metric)

    def render(self) -> str:
        with self.lock:
            lines = [line for m in self._metrics for line in m.render()]
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """The server's metrics, named once here so routes and the batcher agree on them."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = Counter(r, "distill_http_requests_total", "HTTP requests by route, method and status.",
                                ("route", "method", "status"))
        self.errors = Counter(r, "distill_http_errors_total", "Error responses by route and error type.",
                              ("route", "type"))
        self.latency = Histogram(r, "distill_http_request_duration_seconds",
                                 "Time from request to the last byte of the response.", ("route",))
        self.in_flight = Gauge(r, "distill_generations_in_flight",
                               "Generation requests admitted and not yet answered.")
        self.rejected = Counter(r, "distill_generations_rejected_total",
                                "Generation requests refused because the concurrency cap was reached.")
        self.queue_depth = Gauge(r, "distill_queue_depth", "Generation requests waiting for a batch.", ("model",))
        self.batches = Counter(r, "distill_batches_total", "Batched decodes run.", ("model",))
        self.batch_rows = Histogram(r, "distill_batch_rows", "Rows (prompts) per batched decode.", ("model",),
                                    buckets=BATCH_BUCKETS)
        self.prompt_tokens = Counter(r, "distill_prompt_tokens_total", "Prompt tokens processed.", ("model",))
        self.generated_tokens = Counter(r, "distill_generated_tokens_total", "Tokens generated.", ("model",))
        self.ttft = Histogram(r, "distill_time_to_first_token_seconds",
                              "From a request's arrival to its first generated text.", ("model",))
        self.finished = Counter(r, "distill_completions_total", "Finished completions by finish reason.",
                                ("model", "reason"))
        self.ready = Gauge(r, "distill_ready", "1 once every model is loaded.")

    def render(self) -> str:
        return self.registry.render()
