"""The JSON APIs and the request side of generation they share with proxy.py.

    curl -s localhost:6006/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "It is a truth universally acknowledged", "max_tokens": 20, "temperature": 0}'
    curl -s localhost:6006/api/generate -H 'Content-Type: application/json' \\
         -d '{"prompts": ["It is a truth", "Emma"], "max_new_tokens": 20, "temperature": 0}'

Native ``/api/generate`` and ``/api/info``; OpenAI's ``/v1/completions`` and ``/v1/models``. Routes and the
fields accepted: README.md, "Serving". Design notes: docs/design/serving.md.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from python3_distillation import validation
from python3_distillation.generation import Completion, GenerationError, Generator, RowInput, SamplingParams
from python3_distillation.serving import schemas
from python3_distillation.serving.batching import Batcher, BatcherStopped, Job, JobFailed, JobTimeout, LineFull
from python3_distillation.serving.errors import ApiError, invalid
from python3_distillation.serving.schemas import GenerateRequest
from python3_distillation.serving.settings import ServeConfig
from python3_distillation.serving.state import ServingState
from python3_distillation.validation import SEED_LIMIT

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__)
# A stream must reach the client event by event: no caching, no proxy buffering (nginx).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def state() -> ServingState:
    """The app's state: ``ServingState``, or ``proxy.ProxyState`` with a backend."""
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
        self.job, self._st, self._once = job, st, threading.Lock()
        st.metrics.in_flight.inc()

    def release(self) -> None:
        if self._once.acquire(blocking=False):  # never released: only the first call gets it
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
    if missing := [i for i, c in enumerate(done) if c is None]:
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


@bp.post("/api/generate")
def generate() -> Response:
    """``{"prompt" | "prompts", "model"?, sampling fields}`` → completions + timings."""
    st = state()
    req: GenerateRequest = read(GenerateRequest)
    name, gen, batcher = st.model(req.model)
    prompts = [req.prompt] if req.prompt is not None else req.prompts
    key = "prompt" if req.prompt is not None else "prompts"
    if len(prompts) > st.config.max_prompts:
        raise invalid(f"{len(prompts)} prompts in one request; the limit is {st.config.max_prompts}", key)
    rows = rows_for(gen, prompts, [req.params()] * len(prompts), key)
    t0 = time.monotonic()
    admitted = submit(st, batcher, rows)
    done, job = collect(admitted), admitted.job
    out = [{"index": i, "prompt": c.prompt, "text": c.text, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens, "finish_reason": job.finish_reason(c),
            "seconds": round(c.seconds, 4),
            "tokens_per_second": round(c.completion_tokens / c.seconds, 2) if c.seconds > 0 else None}
           for i, c in enumerate(done)]
    return jsonify({"model": name, "completions": out, "usage": usage(done),
                    "timings": {"queue_seconds": round((job.started or t0) - job.submitted, 4),
                                "total_seconds": round(time.monotonic() - t0, 4), "batch_rows": job.batch_rows}})


@bp.get("/api/info")
def info() -> Response:
    st = state()
    status, ready = st.readiness()
    return jsonify({"ready": status == 200, "error": ready.get("reason") if ready["status"] == "failed" else None,
                    "default": st.default, "backend": None, "models": list(st.info.values()),
                    "limits": limits(st.config)})


@bp.post("/v1/completions")
def completions() -> Response:
    st = state()
    req = read_completions(st.config.max_prompts)
    name, gen, batcher = st.model(req.model)
    prompts, n = list(req.prompt), req.n or 1
    base = req.params()
    if base.max_new_tokens >= gen.context_length:  # said here in OpenAI's terms, not the generator's
        raise invalid(f"max_tokens is {base.max_new_tokens} but the model's context is {gen.context_length} tokens, "
                      "which leaves no room for the prompt", "max_tokens")
    if base.top_k > gen.vocab_size:
        raise invalid(f"top_k must be at most the vocabulary size {gen.vocab_size}, got {base.top_k}", "top_k")
    # Choice i*n + j is prompt i's j-th sample; with a seed each sample gets its own so they differ.
    samples = [base if base.seed is None or j == 0
               else base.model_copy(update={"seed": (base.seed + j) % SEED_LIMIT}) for j in range(n)]
    row_prompts = [p for p in prompts for _ in range(n)]
    first_rows = list(range(0, len(row_prompts), n))
    admitted = submit(st, batcher, rows_for(gen, row_prompts, samples * len(prompts)))
    job = admitted.job
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": name}
    echo, include_usage = bool(req.echo), bool(req.stream_options and req.stream_options.include_usage)

    def choice(i: int, text: str, c: Completion | None = None) -> dict[str, Any]:
        """Choice ``i`` with ``text``; finished when its completion ``c`` is given."""
        reason = job.finish_reason(c) if c is not None else None
        if reason in {"time_limit", "cancelled"}:  # OpenAI knows stop/length only
            reason = "length"
        return {"text": text, "index": i, "logprobs": None, "finish_reason": reason}

    if not req.stream:
        done = collect(admitted)
        return jsonify({**head, "system_fingerprint": None,
                        "choices": [choice(i, (c.prompt if echo else "") + c.text, c) for i, c in enumerate(done)],
                        "usage": usage(done, first_rows)})

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        # With include_usage every chunk has "usage": null but the last, which carries the totals.
        return sse({**head, "choices": choices, **({"usage": None} | extra if include_usage else extra)})

    def events() -> Iterator[str]:
        done: list[Completion | None] = [None] * len(row_prompts)
        if echo:
            yield chunk([choice(i, p) for i, p in enumerate(row_prompts)])
        try:
            for row, event in job.events():
                if event.finished:
                    done[row] = event.completion
                    yield chunk([choice(row, event.text, event.completion)])
                elif event.text:
                    yield chunk([choice(row, event.text)])
        except (JobFailed, JobTimeout) as e:
            yield sse(job_error(e).body())
        else:
            if include_usage and all(done):
                yield chunk([], usage=usage(done, first_rows))  # type: ignore[arg-type]
        yield "data: [DONE]\n\n"

    return stream_response(events(), admitted)


@bp.get("/v1/models")
def models() -> Response:
    st = state()
    st.require_ready()
    created = int(time.time())
    return jsonify({"object": "list", "data": [
        {"id": n, "object": "model", "created": created, "owned_by": "python3_distillation",
         "n_params": i["n_params"], "context_length": i["context_length"], "precision": i["precision"]}
        for n, i in st.info.items()]})
