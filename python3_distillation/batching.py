"""Micro-batching: requests that arrive close together share one batched decode.

    python -m python3_distillation.distill_api_server_v2   # the server runs one Batcher per model

Each model gets one worker thread, the only thread that touches that model and its tokenizer
(fast tokenizers are not safe to share across threads). Request threads submit a ``Job`` and
read its event queue; the worker waits until arrivals pause for a short window (a few ms, capped),
takes every job that arrived (up to ``max_rows`` prompts), checks each against the context, and runs them all as ONE
``Generator.stream_batch`` call with per-row sampling parameters, fanning events back out.

A row stops early when its job is cancelled (client gone) or its deadline passes; the decode of
the other rows goes on. Jobs that arrive while a batch runs wait for the next one, so under load
batches fill up by themselves.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from python3_distillation.generate import Completion, GenerationError, Generator, SamplingParams, StreamEvent
from python3_distillation.metrics import ServerMetrics

log = logging.getLogger(__name__)

# Message kinds on a job's queue.
STARTED, EVENT, FAILED, DONE = "started", "event", "failed", "done"


class JobTimeout(TimeoutError):
    """The job's deadline passed before the model produced what was waited for."""


class JobFailed(RuntimeError):
    """The worker rejected or failed the job; ``cause`` is the original exception."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


@dataclass(eq=False)
class Job:
    """One request's prompts (one row each) on their way through a batch."""

    prompts: list[str]
    params: list[SamplingParams]
    deadline: float  # time.monotonic() at which its rows are stopped
    submitted: float = field(default_factory=time.monotonic)
    batch_id: int | None = None
    batch_rows: int = 0
    started: float | None = None
    first_text: float | None = None
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.params) or not self.prompts:
            raise ValueError("a job needs one SamplingParams per prompt and at least one prompt")

    def cancel(self) -> None:
        """Stop this job's rows at the next decode step (the client went away or gave up)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def timed_out(self) -> bool:
        return time.monotonic() >= self.deadline

    def should_stop(self) -> bool:
        return self.cancelled or self.timed_out

    def put(self, kind: str, payload: Any = None) -> None:
        self._events.put((kind, payload))

    def _get(self, timeout: float) -> tuple[str, Any]:
        try:
            return self._events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise JobTimeout("timed out waiting for the model") from None

    def wait_started(self) -> None:
        """Block until the worker took the job into a batch; raise JobTimeout or JobFailed."""
        kind, payload = self._get(self.deadline - time.monotonic())
        if kind == FAILED:
            raise JobFailed(payload)
        if kind != STARTED:  # the protocol always starts with STARTED or FAILED
            raise JobFailed(RuntimeError(f"unexpected {kind} before start"))

    def events(self, grace: float = 10.0):
        """Yield ``(row, StreamEvent)`` until the batch ends.

        Rows stop at the deadline by themselves; ``grace`` only bounds the wait when a single
        decode step hangs far beyond it.
        """
        while True:
            kind, payload = self._get(self.deadline - time.monotonic() + grace)
            if kind == DONE:
                return
            if kind == FAILED:
                raise JobFailed(payload)
            yield payload


class Batcher:
    """Owns one Generator; runs submitted jobs in batched decodes on its own thread."""

    def __init__(self, generator: Generator, name: str, *, window_s: float = 0.01, max_wait_s: float = 0.05,
                 max_rows: int = 32, metrics: ServerMetrics | None = None):
        self.generator, self.name = generator, name
        self.window_s, self.max_wait_s, self.max_rows = window_s, max(max_wait_s, window_s), max_rows
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._batch_ids = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[str], params: list[SamplingParams], deadline: float) -> Job:
        if len(prompts) > self.max_rows:
            raise GenerationError(f"{len(prompts)} prompts in one request; at most {self.max_rows}")
        job = Job(list(prompts), list(params), deadline)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(job)
            self._set_depth()
            self._cond.notify()
        return job

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending), model=self.name)

    def _take_batch(self) -> list[Job] | None:
        """Wait for a first job, then until arrivals pause; never splits a job across batches.

        The window restarts at each arrival (capped at ``max_wait_s``): requests that come in a
        burst, such as clients answered by the previous batch sending their next request, end up
        in one batch instead of alternating between two half-full ones.
        """
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            start = time.monotonic()
            quiet_until, seen = start + self.window_s, len(self._pending)
            while sum(len(j.prompts) for j in self._pending) < self.max_rows:
                now = time.monotonic()
                end = min(quiet_until, start + self.max_wait_s)
                if now >= end:
                    break
                self._cond.wait(timeout=end - now)
                if len(self._pending) != seen:  # only this thread takes jobs out: a change is an arrival
                    quiet_until, seen = time.monotonic() + self.window_s, len(self._pending)
            jobs, rows = [], 0
            while self._pending and rows + len(self._pending[0].prompts) <= self.max_rows:
                job = self._pending.popleft()
                jobs.append(job)
                rows += len(job.prompts)
            self._set_depth()
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take_batch()
            if jobs is None:
                return
            try:
                self._run_batch(jobs)
            except BaseException as e:  # keep the worker alive whatever one batch does
                log.exception("batch on %s failed", self.name)
                for job in jobs:
                    job.put(FAILED, e)

    def _admit(self, jobs: list[Job]) -> list[Job]:
        """Drop jobs whose client left or whose deadline passed in the queue; check prompt lengths."""
        live = []
        for job in jobs:
            if job.cancelled:
                job.put(FAILED, JobTimeout("cancelled before it started"))
            elif job.timed_out:
                job.put(FAILED, JobTimeout("the time limit passed while waiting for the model"))
            else:
                try:
                    for prompt, params in zip(job.prompts, job.params):
                        self.generator.check_prompt(prompt, params)
                except GenerationError as e:
                    job.put(FAILED, e)
                else:
                    live.append(job)
        return live

    def _run_batch(self, jobs: list[Job]) -> None:
        live = self._admit(jobs)
        if not live:
            return
        rows: list[tuple[Job, int]] = [(job, i) for job in live for i in range(len(job.prompts))]
        prompts = [p for job in live for p in job.prompts]
        params = [p for job in live for p in job.params]
        batch_id, now = next(self._batch_ids), time.monotonic()
        for job in live:
            job.batch_id, job.batch_rows, job.started = batch_id, len(rows), now
            job.put(STARTED)
        if self.metrics:
            self.metrics.batches.inc(model=self.name)
            self.metrics.batch_rows.observe(len(rows), model=self.name)

        finished: set[int] = set()
        try:
            for event in self.generator.stream_batch(prompts, params, cancelled=lambda r: rows[r][0].should_stop()):
                job, local = rows[event.row]
                if event.text and job.first_text is None:
                    job.first_text = time.monotonic()
                    if self.metrics:
                        self.metrics.ttft.observe(job.first_text - job.submitted, model=self.name)
                if event.finished:
                    finished.add(event.row)
                    if event.completion is not None:
                        self._count(event.completion, job)
                job.put(EVENT, (local, event))
        except Exception as e:
            log.exception("stream_batch on %s failed", self.name)
            for job in live:
                job.put(FAILED, e)
            return
        # A row the generator ended without a final event still gets one, so readers never wait.
        for row, (job, local) in enumerate(rows):
            if row not in finished:
                completion = Completion(prompt=job.prompts[local], text="", prompt_tokens=0, completion_tokens=0,
                                        finish_reason="cancelled", seconds=time.monotonic() - now)
                job.put(EVENT, (local, StreamEvent(row=row, text="", finished=True, completion=completion)))
        for job in live:
            job.put(DONE)

    def _count(self, completion: Completion, job: Job) -> None:
        if self.metrics:
            reason = completion.finish_reason
            if reason == "cancelled" and not job.cancelled:
                reason = "time_limit"  # the generator only knows it was told to stop
            self.metrics.prompt_tokens.inc(completion.prompt_tokens, model=self.name)
            self.metrics.generated_tokens.inc(completion.completion_tokens, model=self.name)
            self.metrics.finished.inc(model=self.name, reason=reason)
