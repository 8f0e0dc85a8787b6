"""The request side of generation: rows checked and tokenized on the request's own thread, the waiting
line, and turning a job's outcome into an answer.

    HF_HUB_OFFLINE=1 python -m pytest tests/serving/test_hostile_input.py -q

Everything a request's own data can break (tokenizing, the context, ``top_k`` against the
vocabulary) happens here, before the model's worker sees it: a bad request fails alone with a 4xx
and never touches its neighbours' decode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from flask import Response

from python3_distillation.generation import Completion, GenerationError, Generator, RowInput, SamplingParams
from python3_distillation.serving.batching import Batcher, BatcherStopped, Job, JobFailed, JobTimeout, LineFull
from python3_distillation.serving.errors import ApiError, invalid
from python3_distillation.serving.state import ServingState

log = logging.getLogger(__name__)


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


class Admission:
    """A generation request counted in flight until ``release`` (which may be called any number of times)."""

    def __init__(self, st: ServingState):
        self._st, self._released = st, False
        self._lock = threading.Lock()
        st.metrics.in_flight.inc()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._st.metrics.in_flight.dec()


@dataclass
class Admitted:
    job: Job
    admission: Admission


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
    admission = Admission(st)
    try:
        job.wait_started()
    except JobTimeout:
        job.cancel()
        batcher.withdraw(job)
        admission.release()
        raise ApiError(504, f"no place in the batch within the {st.config.time_limit_s:g} s time limit",
                       "timeout") from None
    except JobFailed as e:
        admission.release()
        raise job_error(e) from None
    except BaseException:
        job.cancel()
        batcher.withdraw(job)
        admission.release()
        raise
    return Admitted(job, admission)


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


def finish_reason(completion: Completion, job: Job) -> str:
    if completion.finish_reason == "cancelled" and not job.cancelled:
        return "time_limit"  # the only other reason a row is told to stop
    return completion.finish_reason


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
        admitted.admission.release()
    missing = [i for i, c in enumerate(done) if c is None]
    if missing:
        raise ApiError(500, f"rows {missing} ended without a completion", "server_error")
    return done  # type: ignore[return-value]


def stream_response(events: Iterator[str], admitted: Admitted) -> Response:
    """Stream ``events`` as SSE; closing the response (client gone, or done) stops the job and frees it."""
    job, admission = admitted.job, admitted.admission

    def body() -> Iterator[str]:
        try:
            yield from events
        finally:  # GeneratorExit on disconnect lands here too
            job.cancel()
            admission.release()

    response = Response(body(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(job.cancel)
    response.call_on_close(admission.release)  # also when the body was never started
    return response


def usage(completions: list[Completion], prompt_rows: list[int] | None = None) -> dict[str, int]:
    counted = completions if prompt_rows is None else [completions[i] for i in prompt_rows]
    p = sum(c.prompt_tokens for c in counted)
    c = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
