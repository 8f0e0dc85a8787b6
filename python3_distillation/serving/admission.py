"""The request side of generation, shared by the blueprints (native_api, openai_api, proxy).

    HF_HUB_OFFLINE=1 python -m pytest tests/serving/test_hostile_input.py -q

The body read against its schema, rows checked and tokenized on the request's own thread, the
waiting line, a job's outcome turned into an answer, and the limits ``/api/info`` states.

Everything a request's own data can break (tokenizing, the context, ``top_k`` against the
vocabulary) happens here, before the model's worker sees it: a bad request fails alone with a 4xx
and never touches its neighbours' decode.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, request

from python3_distillation import validation
from python3_distillation.generation import Completion, GenerationError, Generator, RowInput, SamplingParams
from python3_distillation.serving import schemas
from python3_distillation.serving.batching import Batcher, BatcherStopped, Job, JobFailed, JobTimeout, LineFull
from python3_distillation.serving.errors import ApiError, invalid
from python3_distillation.serving.settings import ServeConfig
from python3_distillation.serving.state import ServingState

log = logging.getLogger(__name__)
# A stream must reach the client event by event: no caching, no proxy buffering (nginx).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def state() -> ServingState:
    return current_app.extensions["distill"]


def read(schema):
    """The request's JSON body validated against ``schema`` (a body over MAX_CONTENT_LENGTH: werkzeug's 413)."""
    return schemas.parse(schema, request.get_data(cache=True))  # a SchemaError is answered by serving/errors.py


def read_completions(max_prompts: int) -> schemas.CompletionRequest:
    """A ``/v1/completions`` body whose prompts × n stay within ``max_prompts`` (served here or proxied)."""
    req = read(schemas.CompletionRequest)
    n = req.n or 1
    if len(req.prompt) * n > max_prompts:
        raise invalid(f"{len(req.prompt)} prompts × n={n} = {len(req.prompt) * n} completions; the limit is "
                      f"{max_prompts}", "n" if n > 1 else "prompt")
    return req


def limits(c: ServeConfig) -> dict:
    return {"max_prompts": c.max_prompts, "max_batch_rows": c.max_batch_rows, "max_queue": c.max_queue,
            "time_limit_s": c.time_limit_s, "max_body_bytes": c.max_body_bytes, "batching": c.batching,
            "max_prompt_chars": validation.MAX_PROMPT_CHARS, "max_stop_strings": validation.MAX_STOP_STRINGS,
            "max_stop_chars": validation.MAX_STOP_CHARS, "max_temperature": validation.MAX_TEMPERATURE}


def rows_for(gen: Generator, prompts: list[str], params: list[SamplingParams], param: str = "prompt") -> list[RowInput]:
    """Check and tokenize every row (422 naming the row at fault)."""
    rows = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        try:
            rows.append(RowInput(i, prompt, gen.check_prompt(prompt, p), p))
        except GenerationError as e:
            where = f" (prompt {i})" if len(prompts) > 1 else ""
            raise invalid(f"{e}{where}", param) from None
    return rows


class Admitted:
    """A job in the running batch, counted in flight until ``release`` (which may be called any number of times)."""

    def __init__(self, st: ServingState, job: Job):
        self.job, self._st, self._released = job, st, False
        self._lock = threading.Lock()
        st.metrics.in_flight.inc()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._st.metrics.in_flight.dec()


def submit(st: ServingState, batcher: Batcher, rows: list[RowInput]) -> Admitted:
    """Queue the rows and wait until they joined the running batch (429 when the line is full, 504 at the deadline)."""
    job = Job(rows, time.monotonic() + st.config.time_limit_s)
    try:
        batcher.submit(job)
    except LineFull as e:
        st.metrics.rejected.inc()
        raise ApiError(429, f"the server is busy: {e}; retry shortly", "rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except BatcherStopped as e:
        raise ApiError(503, f"the model's worker is not running: {e}", "not_ready") from None
    admitted = Admitted(st, job)
    try:
        job.wait_started()
    except BaseException as e:  # a failed job is out of the line already: cancel and withdraw do nothing
        job.cancel()
        batcher.withdraw(job)
        admitted.release()
        if isinstance(e, JobTimeout):
            raise ApiError(504, f"no place in the batch within the {st.config.time_limit_s:g} s time limit",
                           "timeout") from None
        if isinstance(e, JobFailed):
            raise job_error(e) from None
        raise
    return admitted


def job_error(e: JobFailed | JobTimeout) -> ApiError:
    cause = e.cause if isinstance(e, JobFailed) else e
    if isinstance(cause, GenerationError):
        return invalid(str(cause), "prompt")
    if isinstance(cause, JobTimeout):
        return ApiError(504, str(cause), "timeout")
    if isinstance(cause, BatcherStopped):
        return ApiError(503, f"the model's worker stopped: {cause}", "not_ready")
    log.error("generation failed: %r", cause)
    return ApiError(500, f"generation failed: {type(cause).__name__}", "server_error")


def collect(admitted: Admitted) -> list[Completion]:
    """Wait for every row of a non-streamed job, then release its admission."""
    job = admitted.job
    done: list[Completion | None] = [None] * len(job.rows)
    try:
        for row, event in job.events():
            if event.finished:
                done[row] = event.completion
    except (JobFailed, JobTimeout) as e:
        job.cancel()
        raise job_error(e) from None
    finally:
        admitted.release()
    missing = [i for i, c in enumerate(done) if c is None]
    if missing:
        raise ApiError(500, f"rows {missing} ended without a completion", "server_error")
    return done  # type: ignore[return-value]


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


def stream_response(events: Iterator[str], admitted: Admitted) -> Response:
    """Stream ``events`` as SSE; closing the response (client gone, or done) stops the job and frees it."""
    job = admitted.job

    def body() -> Iterator[str]:
        try:
            yield from events
        finally:  # GeneratorExit on disconnect lands here too
            job.cancel()
            admitted.release()

    response = Response(body(), mimetype="text/event-stream", headers=SSE_HEADERS)
    response.call_on_close(job.cancel)
    response.call_on_close(admitted.release)  # also when the body was never started
    return response


def usage(completions: list[Completion], prompt_rows: list[int] | None = None) -> dict[str, int]:
    counted = completions if prompt_rows is None else [completions[i] for i in prompt_rows]
    p = sum(c.prompt_tokens for c in counted)
    c = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
