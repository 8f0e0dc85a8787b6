"""Continuous batching: requests join the running decode at its next step and leave when finished.

    HF_HUB_OFFLINE=1 python -m pytest tests/serving/test_batching.py -q

Explained and measured in README.md, "Serving" (continuous batching). Design notes: docs/design/serving.md.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from python3_distillation.generation import Generator, RowInput, StreamEvent
from python3_distillation.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)

# Message kinds on a job's queue: STARTED (its rows joined), EVENT, FAILED, DONE.
STARTED, EVENT, FAILED, DONE = "started", "event", "failed", "done"


class JobTimeout(TimeoutError):
    """The job's deadline passed before the model produced what was waited for."""


class JobFailed(RuntimeError):
    """The worker rejected or failed the job; ``cause`` is the original exception."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class LineFull(RuntimeError):
    """The waiting line holds its maximum number of requests."""


class BatcherStopped(RuntimeError):
    """The worker is closed or dead; ``reason`` says which."""


@dataclass(eq=False)
class Job:
    """One request's rows (checked and tokenized) on their way through the running batch."""

    rows: list[RowInput]  # keys are ignored: the batcher keys rows by (job, index)
    deadline: float  # time.monotonic() at which its rows are stopped
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when its rows joined the batch
    batch_rows: int = 0  # rows decoding when it joined, its own included
    first_text: float | None = None
    remaining: int = 0  # rows not finished (worker thread only)
    failed: bool = False
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop this job's rows at the next decode step (the client went away or gave up)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def should_stop(self) -> bool:
        return self.cancelled or self.failed or time.monotonic() >= self.deadline

    def finish_reason(self, completion) -> str:
        """The completion's reason, where "cancelled" by the deadline (not by the client) is "time_limit"."""
        if completion.finish_reason == "cancelled" and not self.cancelled:
            return "time_limit"  # the generator only knows it was told to stop
        return completion.finish_reason

    def put(self, kind: str, payload: Any = None) -> None:
        self._events.put((kind, payload))

    def _get(self, timeout: float) -> tuple[str, Any]:
        try:
            return self._events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise JobTimeout("timed out waiting for the model") from None

    def wait_started(self) -> None:
        """Block until the job's rows joined the batch; raise JobTimeout or JobFailed."""
        kind, payload = self._get(self.deadline - time.monotonic())
        if kind == FAILED:
            raise JobFailed(payload)
        if kind != STARTED:  # the protocol always starts with STARTED or FAILED
            raise JobFailed(RuntimeError(f"unexpected {kind} before start"))

    def events(self, grace: float = 10.0):
        """``(row, StreamEvent)`` until every row finished; rows stop at the deadline, ``grace`` bounds a hung step."""
        while True:
            kind, payload = self._get(self.deadline - time.monotonic() + grace)
            if kind == DONE:
                return
            if kind == FAILED:
                raise JobFailed(payload)
            yield payload


class Batcher:
    """Owns one Generator; runs the jobs of its waiting line in one continuously batched decode."""

    def __init__(self, generator: Generator, name: str, *, max_rows: int = 32, max_queue: int = 64,
                 window_s: float = 0.002, max_wait_s: float = 0.02, continuous: bool = True,
                 metrics: ServerMetrics | None = None):
        self.generator, self.name = generator, name
        self.max_rows, self.max_queue, self.continuous = max_rows, max_queue, continuous
        self.window_s, self.max_wait_s = window_s, max(max_wait_s, window_s)
        self.metrics = metrics or ServerMetrics()  # a registry of its own when the app shares none
        self._line: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.error: str | None = None  # why the worker died, if it did
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Put ``job`` in the waiting line; ``LineFull`` when it holds ``max_queue`` jobs already."""
        if len(job.rows) > self.max_rows:
            raise ValueError(f"{len(job.rows)} rows in one request; at most {self.max_rows}")
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise BatcherStopped(self.error or "the model's worker is closed")
            if len(self._line) >= self.max_queue:
                raise LineFull(f"{len(self._line)} requests are waiting for the model (limit {self.max_queue})")
            self._line.append(job)
            self._set_depth()
            self._cond.notify()

    def withdraw(self, job: Job) -> None:
        """Take ``job`` out of the line if it is still waiting (its client gave up)."""
        with self._cond, contextlib.suppress(ValueError):
            self._line.remove(job)
            self._set_depth()

    def close(self) -> None:
        """Stop the worker: unfinished jobs fail, later submits are refused. Safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._line)

    def _set_depth(self) -> None:
        self.metrics.queue_depth.labels(model=self.name).set(len(self._line))

    def _take(self, running: int, accepts: bool) -> list[Job] | None:
        """Jobs that join at this step (None: closed). Blocks only while nothing is decoding."""
        with self._cond:
            if not running:
                self._cond.wait_for(lambda: self._line or self._closed)
                # An idle model waits a moment for company: a burst of requests shares one prefill.
                start, seen = time.monotonic(), len(self._line)
                quiet_until = start + self.window_s
                while sum(len(j.rows) for j in self._line) < self.max_rows and not self._closed:
                    now = time.monotonic()
                    end = min(quiet_until, start + self.max_wait_s)
                    if now >= end:
                        break
                    self._cond.wait(timeout=end - now)
                    if len(self._line) != seen:  # an arrival (or a withdrawal): the window restarts
                        quiet_until, seen = time.monotonic() + self.window_s, len(self._line)
            if self._closed:
                return None
            if running and (not self.continuous or not accepts):
                return []
            jobs = []
            while self._line and running + len(self._line[0].rows) <= self.max_rows:
                jobs.append(self._line.popleft())
                running += len(jobs[-1].rows)
            self._set_depth()
            return jobs

    def _run(self) -> None:
        live: dict[Job, None] = {}
        try:
            self._loop(live)
        except BaseException as e:  # a bug in the loop itself: /health reports it; clients are answered below
            self.error = f"{type(e).__name__}: {e}"
            log.exception("the batcher of %s stopped", self.name)
        finally:
            with self._cond:
                self._closed = True
                waiting = list(self._line)
                self._line.clear()
            reason = BatcherStopped(self.error or "the server is shutting down")
            for job in list(live) + waiting:
                job.put(FAILED, reason)

    def _loop(self, live: dict[Job, None]) -> None:
        batch, m = self.generator.new_batch(), self.metrics
        while True:
            jobs = self._take(len(batch), batch.accepts_rows)
            if jobs is None:
                return
            new, joining, now = [], [], time.monotonic()
            for job in jobs:
                if job.cancelled:
                    job.put(FAILED, JobTimeout("cancelled before it started"))
                elif now >= job.deadline:
                    job.put(FAILED, JobTimeout("the time limit passed while waiting for the model"))
                else:
                    joining.append(job)
                    new += [RowInput((job, i), r.prompt, r.ids, r.params) for i, r in enumerate(job.rows)]
            for job in joining:
                job.started, job.remaining, job.batch_rows = now, len(job.rows), len(batch) + len(new)
                live[job] = None
                job.put(STARTED)
                m.queue_wait.labels(model=self.name).observe(now - job.submitted)
            for event in batch.step(new, stop=lambda key: key[0].should_stop()):
                self._deliver(event, live)
            m.running_rows.labels(model=self.name).set(len(batch))
            if batch.rows_in_use:
                m.steps.labels(model=self.name).inc()
                m.batch_rows.labels(model=self.name).observe(batch.rows_in_use)
            if new:
                m.joins.labels(model=self.name).inc()

    def _deliver(self, event: StreamEvent, live: dict[Job, None]) -> None:
        job, local = event.row
        m = self.metrics
        if job.failed:
            return
        if event.error is not None:  # this job's row failed: the whole request fails, its other rows stop
            job.failed = True
            job.put(FAILED, event.error)
            live.pop(job, None)
            return
        if event.text and job.first_text is None:
            job.first_text = time.monotonic()
            m.ttft.labels(model=self.name).observe(job.first_text - job.submitted)
        job.put(EVENT, (local, StreamEvent(local, event.text, event.finished, event.completion)))
        if event.finished:
            if event.completion is not None:
                m.prompt_tokens.labels(model=self.name).inc(event.completion.prompt_tokens)
                m.generated_tokens.labels(model=self.name).inc(event.completion.completion_tokens)
                m.finished.labels(model=self.name, reason=job.finish_reason(event.completion)).inc()
            job.remaining -= 1
            if job.remaining == 0:
                job.put(DONE)
                live.pop(job, None)
