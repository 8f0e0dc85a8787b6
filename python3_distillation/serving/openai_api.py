"""OpenAI-compatible routes: ``POST /v1/completions`` (streamed as SSE with ``stream: true``), ``GET /v1/models``.

    curl -s localhost:6006/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "It is a truth universally acknowledged", "max_tokens": 20, "temperature": 0}'

The official ``openai`` client works unmodified. Fields OpenAI defines that this server does not
implement are accepted only at their neutral value (``logprobs: null``, ``best_of: 1``...);
``top_k``, ``repetition_penalty`` and ``ignore_eos`` are accepted as vLLM accepts them.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from python3_distillation.generation import Completion
from python3_distillation.generation.sampling import SEED_LIMIT
from python3_distillation.serving import admission
from python3_distillation.serving.batching import JobFailed, JobTimeout
from python3_distillation.serving.errors import ApiError, invalid
from python3_distillation.serving.schemas import CompletionRequest, SchemaError, parse
from python3_distillation.serving.state import ServingState

bp = Blueprint("openai_api", __name__)


def state() -> ServingState:
    return current_app.extensions["distill"]


def read(schema):
    try:
        return parse(schema, request.get_data(cache=True))  # over MAX_CONTENT_LENGTH → werkzeug's 413
    except SchemaError as e:
        raise ApiError(e.status, e.message, "invalid_json" if e.status == 400 else "invalid_request_error",
                                 e.param) from None


def sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


@bp.post("/v1/completions")
def completions() -> Response:
    """OpenAI-compatible completions, streamed (SSE, ``text_completion`` chunks) or not."""
    st = state()
    req: CompletionRequest = read(CompletionRequest)
    name, gen, batcher = st.model(req.model)
    prompts, n = list(req.prompt), req.n or 1
    if len(prompts) * n > st.config.max_prompts:
        raise invalid(f"{len(prompts)} prompts × n={n} = {len(prompts) * n} completions; the limit is "
                      f"{st.config.max_prompts}", "n" if n > 1 else "prompt")
    base = req.params()
    if base.max_new_tokens >= gen.context_length:  # said here in OpenAI's terms, not the generator's
        raise invalid(f"max_tokens is {base.max_new_tokens} but the model's context is {gen.context_length} tokens, "
                      "which leaves no room for the prompt", "max_tokens")
    if base.top_k > gen.vocab_size:
        raise invalid(f"top_k must be at most the vocabulary size {gen.vocab_size}, got {base.top_k}", "top_k")
    # Choice i*n + j is prompt i's j-th sample; with a seed each sample gets its own so they differ.
    samples = [base if base.seed is None or j == 0
               else dataclasses.replace(base, seed=(base.seed + j) % SEED_LIMIT) for j in range(n)]
    row_prompts = [p for p in prompts for _ in range(n)]
    rows = admission.rows_for(gen, row_prompts, [samples[j] for _ in prompts for j in range(n)])
    first_rows = list(range(0, len(row_prompts), n))
    admitted = admission.submit(st, batcher, rows)
    job = admitted.job
    cid, created, echo = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), bool(req.echo)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def choice(i: int, text: str, reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": i, "logprobs": None, "finish_reason": reason}

    def openai_reason(c: Completion) -> str:
        reason = admission.finish_reason(c, job)
        return "length" if reason in {"time_limit", "cancelled"} else reason  # OpenAI knows stop/length only

    if not req.stream:
        done = admission.collect(admitted)
        return jsonify({"id": cid, "object": "text_completion", "created": created, "model": name,
                        "system_fingerprint": None,
                        "choices": [choice(i, (c.prompt if echo else "") + c.text, openai_reason(c))
                                    for i, c in enumerate(done)],
                        "usage": admission.usage(done, first_rows)})

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
            yield sse(admission.job_error(e).body())
        else:
            if include_usage and all(done):
                yield chunk([], usage=admission.usage(done, first_rows))  # type: ignore[arg-type]
        yield "data: [DONE]\n\n"

    return admission.stream_response(events(), admitted)


@bp.get("/v1/models")
def models() -> Response:
    st = state()
    st.require_ready()
    created = int(time.time())
    return jsonify({"object": "list", "data": [
        {"id": n, "object": "model", "created": created, "owned_by": "python3_distillation",
         "n_params": i["n_params"], "context_length": i["context_length"], "precision": i["precision"]}
        for n, i in st.info.items()]})
