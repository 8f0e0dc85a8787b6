"""Web page and JSON API (native and OpenAI-compatible) over one or more GPT-2 students.

    python python3_distillation/distill_api_server_v2.py --port 6006          # development
    gunicorn --bind 127.0.0.1:6006 --worker-class gthread --workers 1 --threads 8 \\
        --timeout 120 python3_distillation.wsgi:app                           # production

Routes: ``/`` (page), ``POST /api/generate``, ``POST /v1/completions`` (``stream`` → SSE),
``GET /v1/models``, ``/api/info``, ``/health``, ``/ready``, ``/metrics``. Every error is JSON:
``{"error": {"message", "type", "param", "code"}}``.

Limits (``ServeConfig``): bodies over ``max_body_bytes`` → 413; more than ``max_prompts`` rows
(prompts × n) → 422; more than ``max_concurrent`` generation requests in flight → 429 with
``Retry-After`` (never queued without bound); a request still waiting for the model at its
``time_limit_s`` deadline → 504, one already generating stops there and reports
``finish_reason`` ``"time_limit"`` (``"length"`` on the OpenAI route, whose clients know only
``stop``/``length``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from python3_distillation.batching import Batcher, Job, JobFailed, JobTimeout
from python3_distillation.generate import Completion, GenerationError, Generator, SamplingParams
from python3_distillation.metrics import ServerMetrics
from python3_distillation.paths import model_dir

log = logging.getLogger(__name__)

PRODUCTION_COMMAND = ("gunicorn --bind 127.0.0.1:6006 --worker-class gthread --workers 1 --threads 8 "
                      "--timeout 120 python3_distillation.wsgi:app")
OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions


# --------------------------------------------------------------------------- configuration


@dataclass
class ServeConfig:
    """Everything the server needs; the first of ``model_dirs`` is the default model."""

    model_dirs: list[str] = field(default_factory=lambda: [str(model_dir("v2"))])
    host: str = "127.0.0.1"
    port: int = 6006
    device: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompts: int = 16  # rows per request (prompts × n)
    # Generation requests in flight, streamed or not. Kept below gunicorn's 8 threads: each request
    # holds a thread, and a free one must remain to answer /health, /metrics and 429s at once.
    max_concurrent: int = 6
    time_limit_s: float = 60.0  # per request, from arrival
    batch_window_ms: float = 10.0  # the batcher collects requests until none arrived for this long...
    batch_max_wait_ms: float = 50.0  # ...but never longer than this after the first one
    max_batch_rows: int = 32
    load_in_background: bool = True  # /ready answers 503 while loading, then 200

    ENV = {  # environment variable → field, for wsgi.py
        "DISTILL_DEVICE": "device",
        "DISTILL_MAX_BODY_BYTES": "max_body_bytes",
        "DISTILL_MAX_PROMPTS": "max_prompts",
        "DISTILL_MAX_CONCURRENT": "max_concurrent",
        "DISTILL_TIME_LIMIT_S": "time_limit_s",
        "DISTILL_BATCH_WINDOW_MS": "batch_window_ms",
        "DISTILL_BATCH_MAX_WAIT_MS": "batch_max_wait_ms",
        "DISTILL_MAX_BATCH_ROWS": "max_batch_rows",
    }

    def validate(self) -> ServeConfig:
        if not self.model_dirs:
            raise ValueError("ServeConfig.model_dirs is empty: give at least one model folder")
        for name in ("max_body_bytes", "max_prompts", "max_concurrent", "max_batch_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.time_limit_s <= 0 or not 0 <= self.batch_window_ms <= self.batch_max_wait_ms:
            raise ValueError("ServeConfig needs time_limit_s > 0 and 0 <= batch_window_ms <= batch_max_wait_ms")
        if self.max_prompts > self.max_batch_rows:
            raise ValueError(f"max_prompts ({self.max_prompts}) cannot exceed max_batch_rows ({self.max_batch_rows}): "
                             "a request is never split across batches")
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ServeConfig keys {unknown}; expected some of {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("model_dirs"), (str, os.PathLike)):
            d["model_dirs"] = [d["model_dirs"]]
        if "model_dirs" in d:
            d["model_dirs"] = [str(p) for p in d["model_dirs"]]
        return cls(**d).validate()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeConfig:
        """``DISTILL_MODEL_DIR`` (default v2), ``DISTILL_COMPARE_DIRS`` (comma separated) and ``ENV``."""
        env = os.environ if env is None else env
        dirs = [env.get("DISTILL_MODEL_DIR") or str(model_dir("v2"))]
        dirs += [p.strip() for p in env.get("DISTILL_COMPARE_DIRS", "").split(",") if p.strip()]
        kwargs: dict[str, Any] = {"model_dirs": dirs}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for var, name in cls.ENV.items():
            raw = env.get(var, "").strip()
            if raw:
                cast = float if "float" in str(types[name]) else int if "int" in str(types[name]) else str
                try:
                    kwargs[name] = cast(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r} is not a valid {cast.__name__}") from None
        return cls.from_dict(kwargs)


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


HTTP_ERROR_TYPES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                    429: "rate_limit_exceeded", 503: "not_ready", 504: "timeout"}


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(422, message, "invalid_request_error", param)


# --------------------------------------------------------------------------- serving state


class Admission:
    """One slot of ``max_concurrent``; ``release`` may be called any number of times."""

    def __init__(self, state: ServingState):
        self._state, self._released = state, False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._state._release_slot()


class ServingState:
    """The loaded models, their batchers, the admission counter and the metrics of one app."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = ServerMetrics()
        self.generators: dict[str, Generator] = {}
        self.batchers: dict[str, Batcher] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.default: str | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._slots_lock = threading.Lock()
        self._in_flight = 0

    # Loading ---------------------------------------------------------------

    def load(self) -> None:
        """Load every configured model once (the slow part: runs in a thread when backgrounded)."""
        try:
            generators = {}
            for d in self.config.model_dirs:
                gen = Generator.from_pretrained(d, device=self.config.device)
                generators[self._unique(generators, gen.name or Path(d).name)] = (gen, Path(d))
            self.install(generators)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model loading failed: %s", self.load_error)
            raise

    def install(self, generators: Mapping[str, Generator | tuple[Generator, Path | None]]) -> None:
        gens, info, batchers = {}, {}, {}
        for name, value in generators.items():
            gen, folder = value if isinstance(value, tuple) else (value, None)
            gens[name], info[name] = gen, describe(name, gen, folder)
            batchers[name] = Batcher(gen, name, window_s=self.config.batch_window_ms / 1000,
                                     max_wait_s=self.config.batch_max_wait_ms / 1000,
                                     max_rows=self.config.max_batch_rows, metrics=self.metrics)
            self.metrics.queue_depth.set(0, model=name)
        # Published whole, then flagged ready: request threads never see a half-filled dict.
        self.generators, self.info, self.batchers = gens, info, batchers
        self.default = next(iter(gens))
        self.ready.set()
        self.metrics.ready.set(1)
        log.info("serving %s", ", ".join(f"{n} ({i['n_params']:,} params)" for n, i in self.info.items()))

    @staticmethod
    def _unique(taken: Mapping[str, Any], name: str) -> str:
        candidate, i = name, 2
        while candidate in taken:
            candidate, i = f"{name}-{i}", i + 1
        return candidate

    # Admission -------------------------------------------------------------

    def admit(self) -> Admission:
        """Take a generation slot or refuse at once with 429: waiting would only hide overload."""
        with self._slots_lock:
            if self._in_flight >= self.config.max_concurrent:
                self.metrics.rejected.inc()
                raise ApiError(429, f"too many generations in flight (limit {self.config.max_concurrent}); "
                                    "retry shortly", "rate_limit_exceeded", headers={"Retry-After": "1"})
            self._in_flight += 1
            self.metrics.in_flight.set(self._in_flight)
        return Admission(self)

    def _release_slot(self) -> None:
        with self._slots_lock:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)

    def require_ready(self) -> None:
        if not self.ready.is_set():
            reason = self.load_error or "models are still loading"
            raise ApiError(503, reason, "not_ready", headers={"Retry-After": "5"})

    def batcher(self, model: Any) -> tuple[str, Batcher]:
        self.require_ready()
        if model is None or model == "":
            model = self.default
        if not isinstance(model, str):
            raise _invalid("'model' must be a string", "model")
        if model not in self.batchers:
            raise ApiError(404, f"model {model!r} is not loaded; available: {sorted(self.batchers)}",
                           "model_not_found", "model")
        return model, self.batchers[model]


def describe(name: str, gen: Generator, folder: Path | None) -> dict[str, Any]:
    """What the page and /v1/models show about a model (computed once, on the loading thread)."""
    params = list(gen.model.parameters())
    size = sum(p.numel() * p.element_size() for p in params)
    disk = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in {".safetensors", ".bin"}) \
        if folder and folder.is_dir() else None
    return {"id": name, "n_params": int(gen.n_params), "size_bytes": int(size), "size": human_bytes(size),
            "disk_bytes": disk, "context_length": int(gen.context_length), "device": str(gen.device),
            "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
            "n_layer": getattr(gen.model.config, "n_layer", None), "path": str(folder) if folder else None}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def state() -> ServingState:
    return current_app.extensions["distill"]


# --------------------------------------------------------------------------- request parsing


def read_json() -> dict[str, Any]:
    raw = request.get_data(cache=True)  # over MAX_CONTENT_LENGTH → werkzeug raises 413
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", "invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise _invalid(f"the JSON body must be an object, got {type(body).__name__}")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def check_type(name: str, value: Any, kind: str) -> Any:
    """Type checks the sampling code leaves to its callers; ranges are SamplingParams.validate's job."""
    if kind == "int" and not _is_int(value):
        raise _invalid(f"'{name}' must be an integer, got {json.dumps(value)}", name)
    if kind == "number" and not _is_number(value):
        raise _invalid(f"'{name}' must be a finite number, got {json.dumps(value)}", name)
    if kind == "seed" and value is not None and not _is_int(value):
        raise _invalid(f"'{name}' must be an integer or null, got {json.dumps(value)}", name)
    if kind == "bool" and not isinstance(value, bool):
        raise _invalid(f"'{name}' must be true or false, got {json.dumps(value)}", name)
    if kind == "stop":
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value) or len(value) > 4:
            raise _invalid(f"'{name}' must be a non-empty string or a list of at most 4 of them", name)
    return value


def read_prompts(value: Any, name: str, limit: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _invalid(f"'{name}' must be a string or a non-empty list of strings", name)
    if not all(isinstance(p, str) for p in value):
        raise _invalid(f"'{name}': every prompt must be a string (token-id prompts are not supported)", name)
    if len(value) > limit:
        raise _invalid(f"{len(value)} prompts in one request; the limit is {limit}", name)
    return value


def make_params(fields: Mapping[str, Any]) -> SamplingParams:
    try:
        return SamplingParams.from_dict(dict(fields)).validate()
    except GenerationError as e:
        raise _invalid(str(e)) from None


NATIVE_FIELDS = {"max_new_tokens": "int", "temperature": "number", "top_k": "int", "top_p": "number",
                 "repetition_penalty": "number", "stop": "stop", "seed": "seed"}


# --------------------------------------------------------------------------- running jobs


def submit(batcher: Batcher, prompts: list[str], params: list[SamplingParams]) -> Job:
    deadline = time.monotonic() + state().config.time_limit_s
    job = batcher.submit(prompts, params, deadline)
    try:
        job.wait_started()
    except JobTimeout:
        job.cancel()
        raise ApiError(504, f"no model slot within the {state().config.time_limit_s:g} s time limit", "timeout")
    except JobFailed as e:
        raise job_error(e) from None
    return job


def job_error(e: JobFailed | JobTimeout) -> ApiError:
    cause = e.cause if isinstance(e, JobFailed) else e
    if isinstance(cause, GenerationError):
        return _invalid(str(cause), "prompt")
    if isinstance(cause, JobTimeout):
        return ApiError(504, str(cause), "timeout")
    log.error("generation failed: %r", cause)
    return ApiError(500, f"generation failed: {type(cause).__name__}", "server_error")


def finish_reason(completion: Completion, job: Job) -> str:
    if completion.finish_reason == "cancelled" and not job.cancelled:
        return "time_limit"  # the only other reason a row is told to stop
    return completion.finish_reason


def collect(job: Job) -> list[Completion]:
    """Wait for every row of a non-streamed job."""
    done: list[Completion | None] = [None] * len(job.prompts)
    try:
        for row, event in job.events():
            if event.finished:
                done[row] = event.completion
    except (JobFailed, JobTimeout) as e:
        job.cancel()
        raise job_error(e) from None
    missing = [i for i, c in enumerate(done) if c is None]
    if missing:
        raise ApiError(500, f"rows {missing} ended without a completion", "server_error")
    return done  # type: ignore[return-value]


def sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


def sse_response(events: Iterator[str], job: Job, admission: Admission) -> Response:
    """Stream ``events``; closing the response (client gone, or done) stops the job and frees the slot."""

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


# --------------------------------------------------------------------------- routes


def api_generate() -> Response:
    """Native API: ``{"prompt" | "prompts", "model"?, sampling fields}`` → completions + timings."""
    st = state()
    body = read_json()
    name, batcher = st.batcher(body.pop("model", None))
    if ("prompt" in body) == ("prompts" in body):
        raise _invalid("give exactly one of 'prompt' (a string) or 'prompts' (a list of strings)", "prompt")
    key = "prompt" if "prompt" in body else "prompts"
    prompts = read_prompts(body.pop(key), key, st.config.max_prompts)
    unknown = sorted(set(body) - set(NATIVE_FIELDS))
    if unknown:
        raise _invalid(f"unknown fields {unknown}; accepted: prompt(s), model, {', '.join(NATIVE_FIELDS)}", unknown[0])
    params = make_params({k: check_type(k, v, NATIVE_FIELDS[k]) for k, v in body.items()})

    admission = st.admit()
    t0 = time.monotonic()
    try:
        job = submit(batcher, prompts, [params] * len(prompts))
        completions = collect(job)
    finally:
        admission.release()
    total = time.monotonic() - t0
    rows = [{"index": i, "prompt": c.prompt, "text": c.text, "prompt_tokens": c.prompt_tokens,
             "completion_tokens": c.completion_tokens, "finish_reason": finish_reason(c, job),
             "seconds": round(c.seconds, 4),
             "tokens_per_second": round(c.completion_tokens / c.seconds, 2) if c.seconds > 0 else None}
            for i, c in enumerate(completions)]
    return jsonify({"model": name, "completions": rows, "usage": usage(completions),
                    "timings": {"queue_seconds": round((job.started or t0) - job.submitted, 4),
                                "total_seconds": round(total, 4), "batch_id": job.batch_id,
                                "batch_rows": job.batch_rows}})


def usage(completions: list[Completion], prompt_rows: list[int] | None = None) -> dict[str, int]:
    counted = completions if prompt_rows is None else [completions[i] for i in prompt_rows]
    p = sum(c.prompt_tokens for c in counted)
    c = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# OpenAI fields: what we implement, and what we accept only at their neutral value.
OPENAI_FIELDS = {"max_tokens": "int?", "temperature": "number?", "top_p": "number?", "n": "int?", "stop": "stop",
                 "seed": "seed", "stream": "bool?", "echo": "bool?", "top_k": "int?", "repetition_penalty": "number?"}
OPENAI_NEUTRAL = {"logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0),
                  "frequency_penalty": (None, 0), "logit_bias": (None, {})}
OPENAI_IGNORED = {"user", "stream_options", "model", "prompt"}


def v1_completions() -> Response:
    """OpenAI-compatible completions, streamed (SSE, ``text_completion`` chunks) or not."""
    st = state()
    body = read_json()
    name, batcher = st.batcher(body.get("model"))
    if "prompt" not in body:
        raise _invalid("'prompt' is required", "prompt")
    for key in body:
        if key in OPENAI_NEUTRAL:
            if body[key] not in OPENAI_NEUTRAL[key]:
                neutral = json.dumps(OPENAI_NEUTRAL[key][-1])
                raise _invalid(f"'{key}' is not supported by this server; omit it or send {neutral}", key)
        elif key not in OPENAI_FIELDS and key not in OPENAI_IGNORED:
            raise _invalid(f"unrecognized request argument: {key}", key)
    f = {}
    for key, kind in OPENAI_FIELDS.items():
        value = body.get(key)
        if kind.endswith("?"):
            f[key] = None if value is None else check_type(key, value, kind[:-1])
        else:
            f[key] = check_type(key, value, kind)
    n = 1 if f["n"] is None else f["n"]
    if n < 1:
        raise _invalid("'n' must be >= 1", "n")
    prompts = read_prompts(body["prompt"], "prompt", st.config.max_prompts)
    if len(prompts) * n > st.config.max_prompts:
        raise _invalid(f"{len(prompts)} prompts × n={n} = {len(prompts) * n} completions; the limit is "
                       f"{st.config.max_prompts}", "n")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _invalid("'stream_options' must be an object", "stream_options")
    include_usage = bool(options.get("include_usage"))

    base = make_params({"max_new_tokens": OPENAI_DEFAULT_MAX_TOKENS if f["max_tokens"] is None else f["max_tokens"],
                        "temperature": 1.0 if f["temperature"] is None else f["temperature"],
                        "top_p": 1.0 if f["top_p"] is None else f["top_p"],
                        "top_k": f["top_k"] or 0, "stop": f["stop"], "seed": f["seed"],
                        "repetition_penalty": 1.0 if f["repetition_penalty"] is None else f["repetition_penalty"]})
    context = st.info[name]["context_length"]
    if base.max_new_tokens >= context:  # said here in OpenAI's terms, not the generator's
        raise _invalid(f"max_tokens is {base.max_new_tokens} but the model's context is {context} tokens, "
                       "which leaves no room for the prompt", "max_tokens")
    # Choice i*n + j is prompt i's j-th sample; with a seed each sample gets its own so they differ.
    row_prompts = [p for p in prompts for _ in range(n)]
    samples = [base if base.seed is None or j == 0 else make_params({**dataclasses.asdict(base), "seed": base.seed + j})
               for j in range(n)]
    row_params = [samples[j] for _ in prompts for j in range(n)]
    first_rows = list(range(0, len(row_prompts), n))

    admission = st.admit()
    try:
        job = submit(batcher, row_prompts, row_params)
    except BaseException:
        admission.release()
        raise
    cid, created, echo = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), bool(f["echo"])

    def choice(i: int, text: str, reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": i, "logprobs": None, "finish_reason": reason}

    def openai_reason(c: Completion) -> str:
        reason = finish_reason(c, job)
        return "length" if reason in {"time_limit", "cancelled"} else reason

    if not f["stream"]:
        try:
            completions = collect(job)
        finally:
            admission.release()
        return jsonify({"id": cid, "object": "text_completion", "created": created, "model": name,
                        "system_fingerprint": None,
                        "choices": [choice(i, (c.prompt if echo else "") + c.text, openai_reason(c))
                                    for i, c in enumerate(completions)],
                        "usage": usage(completions, first_rows)})

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices}
        if include_usage:
            obj["usage"] = None
        obj.update(extra)
        return sse(obj)

    def events() -> Iterator[str]:
        done: list[Completion | None] = [None] * len(row_prompts)
        if echo:
            yield chunk([choice(i, p, None) for i, p in enumerate(row_prompts)])
        try:
            for row, event in job.events():
                if event.finished:
                    done[row] = event.completion
                    yield chunk([choice(row, event.text, openai_reason(event.completion))])
                elif event.text:
                    yield chunk([choice(row, event.text, None)])
        except (JobFailed, JobTimeout) as e:
            yield sse(job_error(e).body())
        else:
            if include_usage and all(done):
                yield chunk([], usage=usage(done, first_rows))  # type: ignore[arg-type]
        yield "data: [DONE]\n\n"

    return sse_response(events(), job, admission)


def v1_models() -> Response:
    st = state()
    st.require_ready()
    created = int(time.time())
    return jsonify({"object": "list", "data": [
        {"id": n, "object": "model", "created": created, "owned_by": "python3_distillation",
         "n_params": i["n_params"], "context_length": i["context_length"]} for n, i in st.info.items()]})


def api_info() -> Response:
    st = state()
    c = st.config
    return jsonify({"ready": st.ready.is_set(), "error": st.load_error, "default": st.default,
                    "models": list(st.info.values()),
                    "limits": {"max_prompts": c.max_prompts, "max_concurrent": c.max_concurrent,
                               "time_limit_s": c.time_limit_s, "max_body_bytes": c.max_body_bytes,
                               "batch_window_ms": c.batch_window_ms, "batch_max_wait_ms": c.batch_max_wait_ms}})


def health() -> Response:
    return jsonify({"status": "ok"})


def ready() -> Response:
    st = state()
    st.require_ready()
    return jsonify({"status": "ready", "models": list(st.info)})


def metrics() -> Response:
    return Response(state().metrics.render(), content_type=ServerMetrics.CONTENT_TYPE)


def index() -> str:
    st = state()
    return render_template("index.html", models=list(st.info.values()), default=st.default)


# --------------------------------------------------------------------------- app factory


PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def create_app(config: ServeConfig | dict | None = None,
               generators: Mapping[str, Generator] | None = None) -> Flask:
    """Build the app; with ``generators`` given they are served as-is (tests, notebooks)."""
    if config is None:
        config = ServeConfig()
    cfg = ServeConfig.from_dict(config) if isinstance(config, Mapping) else config.validate()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.json.sort_keys = False  # keep "error" bodies and completions in a readable order
    st = ServingState(cfg)
    app.extensions["distill"] = st

    if generators:
        st.install(dict(generators))
    else:
        missing = [d for d in cfg.model_dirs if not Path(d).is_dir()]
        if missing:  # fail now, not after the server claims to be up
            raise GenerationError(f"model folder(s) not found: {', '.join(missing)} "
                                  "(train them first, or pass --model / DISTILL_MODEL_DIR)")
        if cfg.load_in_background:
            threading.Thread(target=_load_quietly, args=(st,), name="model-loader", daemon=True).start()
        else:
            st.load()

    app.add_url_rule("/", view_func=index)
    app.add_url_rule("/health", view_func=health)
    app.add_url_rule("/ready", view_func=ready)
    app.add_url_rule("/metrics", view_func=metrics)
    app.add_url_rule("/api/info", view_func=api_info)
    app.add_url_rule("/api/generate", view_func=api_generate, methods=["POST"])
    app.add_url_rule("/v1/completions", view_func=v1_completions, methods=["POST"])
    app.add_url_rule("/v1/models", view_func=v1_models)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.before_request(_before)
    app.after_request(_after)
    _attach_gunicorn_logging(app)
    return app


def _load_quietly(st: ServingState) -> None:
    try:
        st.load()
    except Exception:
        pass  # already logged; /ready reports it with 503


def _error_response(err: ApiError) -> Response:
    g.error_type = err.type
    response = jsonify(err.body())
    response.status_code = err.status
    response.headers.update(err.headers)
    return response


def _api_error(e: ApiError) -> Response:
    return _error_response(e)


def _http_error(e: HTTPException) -> Response:
    code = e.code or 500
    message = e.description or e.name
    if code == 404:
        message = f"no route {request.method} {request.path}"
    elif code == 413:
        message = f"request body over the {current_app.config['MAX_CONTENT_LENGTH']} byte limit"
    err = ApiError(code, message, HTTP_ERROR_TYPES.get(code, "http_error"))
    if isinstance(e, MethodNotAllowed) and e.valid_methods:
        err.message = f"{request.method} is not allowed on {request.path}; use {', '.join(sorted(e.valid_methods))}"
        err.headers["Allow"] = ", ".join(sorted(e.valid_methods))
    return _error_response(err)


def _unexpected_error(e: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return _error_response(ApiError(500, f"internal error: {type(e).__name__}", "server_error"))


def _before() -> None:
    g.t0 = time.monotonic()
    g.request_id = request.headers.get("X-Request-ID", "")[:64] or uuid.uuid4().hex


def _after(response: Response) -> Response:
    st = state()
    route = request.url_rule.rule if request.url_rule else "<unmatched>"  # bounded label values
    status = response.status_code
    st.metrics.requests.inc(route=route, method=request.method, status=str(status))
    if status >= 400:
        st.metrics.errors.inc(route=route, type=g.get("error_type", HTTP_ERROR_TYPES.get(status, "http_error")))
    t0 = g.get("t0", time.monotonic())
    # Observed at close, so a stream's latency covers its whole body.
    response.call_on_close(lambda: st.metrics.latency.observe(time.monotonic() - t0, route=route))
    response.headers["X-Request-ID"] = g.get("request_id", "")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
    return response


def _attach_gunicorn_logging(app: Flask) -> None:
    gunicorn_log = logging.getLogger("gunicorn.error")
    if gunicorn_log.handlers:  # under gunicorn: one log stream, one level
        for name in ("python3_distillation", app.logger.name):
            logger = logging.getLogger(name)
            logger.handlers = gunicorn_log.handlers
            logger.setLevel(gunicorn_log.level)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None, default_model: str = "v2") -> int:
    """Development server (Flask's); production runs ``wsgi:app`` under gunicorn."""
    parser = argparse.ArgumentParser(
        prog=f"distill_api_server{'_v2' if default_model == 'v2' else ''}",
        description=f"Serve the {default_model} student: web page + JSON/OpenAI API. "
                    f"Production: {PRODUCTION_COMMAND}")
    d = ServeConfig()
    parser.add_argument("--model", default=str(model_dir(default_model)), help="model folder (default: %(default)s)")
    parser.add_argument("--compare", action="append", default=[], metavar="DIR",
                        help="another model folder to serve side by side (repeatable), e.g. the teacher")
    parser.add_argument("--host", default=d.host, help="bind address (default %(default)s; 0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=d.port, help="default %(default)s")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best available)")
    parser.add_argument("--max-concurrent", type=int, default=d.max_concurrent, help="default %(default)s")
    parser.add_argument("--max-prompts", type=int, default=d.max_prompts, help="default %(default)s")
    parser.add_argument("--time-limit", type=float, default=d.time_limit_s, help="seconds, default %(default)s")
    parser.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                        help="collect requests until none arrived for this long (default %(default)s)")
    parser.add_argument("--batch-max-wait-ms", type=float, default=d.batch_max_wait_ms,
                        help="but no longer than this (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServeConfig(model_dirs=[args.model, *args.compare], host=args.host, port=args.port,
                             device=args.device, max_concurrent=args.max_concurrent, max_prompts=args.max_prompts,
                             time_limit_s=args.time_limit, batch_window_ms=args.batch_window_ms,
                             batch_max_wait_ms=max(args.batch_max_wait_ms, args.batch_window_ms),
                             load_in_background=False).validate()
        app = create_app(config)
    except (GenerationError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("development server on http://%s:%d (production: %s)", config.host, config.port, PRODUCTION_COMMAND)
    app.run(host=config.host, port=config.port, threaded=True, use_reloader=False)
    return 0
