"""OpenAI-compatible routes: ``POST /v1/completions`` (streamed as SSE with ``stream: true``), ``GET /v1/models``.

    curl -s localhost:6006/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "It is a truth universally acknowledged", "max_tokens": 20, "temperature": 0}'

The official ``openai`` client works unmodified. Fields OpenAI defines that this server does not
implement are accepted only at their neutral value (``logprobs: null``, ``best_of: 1``...);
``top_k``, ``repetition_penalty`` and ``ignore_eos`` are accepted as vLLM accepts them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from python3_distillation.generation import Completion
from python3_distillation.serving import admission
from python3_distillation.serving.batching import JobFailed, JobTimeout
from python3_distillation.serving.errors import invalid
from python3_distillation.validation import SEED_LIMIT

bp = Blueprint("openai_api", __name__)


@bp.post("/v1/completions")
def completions() -> Response:
    st = admission.state()
    req = admission.read_completions(st.config.max_prompts)
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
    rows = admission.rows_for(gen, row_prompts, [samples[j] for _ in prompts for j in range(n)])
    first_rows = list(range(0, len(row_prompts), n))
    admitted = admission.submit(st, batcher, rows)
    job = admitted.job
    cid, created, echo = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), bool(req.echo)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def choice(i: int, text: str, c: Completion | None = None) -> dict[str, Any]:
        """Choice ``i`` with ``text``; finished when its completion ``c`` is given."""
        reason = job.finish_reason(c) if c is not None else None
        if reason in {"time_limit", "cancelled"}:  # OpenAI knows stop/length only
            reason = "length"
        return {"text": text, "index": i, "logprobs": None, "finish_reason": reason}

    if not req.stream:
        done = admission.collect(admitted)
        return jsonify({"id": cid, "object": "text_completion", "created": created, "model": name,
                        "system_fingerprint": None,
                        "choices": [choice(i, (c.prompt if echo else "") + c.text, c) for i, c in enumerate(done)],
                        "usage": admission.usage(done, first_rows)})

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices}
        if include_usage:
            obj["usage"] = None
        obj.update(extra)
        return admission.sse(obj)

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
            yield admission.sse(admission.job_error(e).body())
        else:
            if include_usage and all(done):
                yield chunk([], usage=admission.usage(done, first_rows))  # type: ignore[arg-type]
        yield "data: [DONE]\n\n"

    return admission.stream_response(events(), admitted)


@bp.get("/v1/models")
def models() -> Response:
    st = admission.state()
    st.require_ready()
    created = int(time.time())
    return jsonify({"object": "list", "data": [
        {"id": n, "object": "model", "created": created, "owned_by": "python3_distillation",
         "n_params": i["n_params"], "context_length": i["context_length"], "precision": i["precision"]}
        for n, i in st.info.items()]})
