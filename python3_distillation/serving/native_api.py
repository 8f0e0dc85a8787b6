"""The native API: ``POST /api/generate`` (completions with timings) and ``GET /api/info`` (models, limits).

    curl -s localhost:6006/api/generate -H 'Content-Type: application/json' \\
         -d '{"prompts": ["It is a truth", "Emma"], "max_new_tokens": 20, "temperature": 0}'
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, jsonify

from python3_distillation.serving import admission
from python3_distillation.serving.errors import invalid
from python3_distillation.serving.openai_api import read
from python3_distillation.serving.schemas import GenerateRequest
from python3_distillation.serving.state import ServingState

bp = Blueprint("native_api", __name__)


def state() -> ServingState:
    return current_app.extensions["distill"]


@bp.post("/api/generate")
def generate() -> Response:
    """``{"prompt" | "prompts", "model"?, sampling fields}`` → completions + timings."""
    st = state()
    req: GenerateRequest = read(GenerateRequest)
    name, gen, batcher = st.model(req.model)
    prompts = req.prompt_list()
    key = "prompt" if req.prompt is not None else "prompts"
    if len(prompts) > st.config.max_prompts:
        raise invalid(f"{len(prompts)} prompts in one request; the limit is {st.config.max_prompts}", key)
    params = req.params()
    rows = admission.rows_for(gen, prompts, [params] * len(prompts), key)
    t0 = time.monotonic()
    admitted = admission.submit(st, batcher, rows)
    done = admission.collect(admitted)
    job = admitted.job
    total = time.monotonic() - t0
    out = [{"index": i, "prompt": c.prompt, "text": c.text, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens, "finish_reason": admission.finish_reason(c, job),
            "seconds": round(c.seconds, 4),
            "tokens_per_second": round(c.completion_tokens / c.seconds, 2) if c.seconds > 0 else None}
           for i, c in enumerate(done)]
    return jsonify({"model": name, "completions": out, "usage": admission.usage(done),
                    "timings": {"queue_seconds": round((job.started or t0) - job.submitted, 4),
                                "total_seconds": round(total, 4), "batch_rows": job.batch_rows}})


@bp.get("/api/info")
def info() -> Response:
    st = state()
    c = st.config
    status, ready = st.readiness()
    return jsonify({"ready": status == 200, "error": ready.get("reason") if ready["status"] == "failed" else None,
                    "default": st.default, "backend": None, "models": list(st.info.values()),
                    "limits": limits(c)})


def limits(c) -> dict:
    from python3_distillation.generation import sampling
    from python3_distillation.serving import schemas

    return {"max_prompts": c.max_prompts, "max_batch_rows": c.max_batch_rows, "max_queue": c.max_queue,
            "time_limit_s": c.time_limit_s, "max_body_bytes": c.max_body_bytes, "batching": c.batching,
            "max_prompt_chars": schemas.MAX_PROMPT_CHARS, "max_stop_strings": sampling.MAX_STOP_STRINGS,
            "max_stop_chars": sampling.MAX_STOP_CHARS, "max_temperature": sampling.MAX_TEMPERATURE}
