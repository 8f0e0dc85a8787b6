"""The native API: ``POST /api/generate`` (completions with timings) and ``GET /api/info`` (models, limits).

    curl -s localhost:6006/api/generate -H 'Content-Type: application/json' \\
         -d '{"prompts": ["It is a truth", "Emma"], "max_new_tokens": 20, "temperature": 0}'
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify

from python3_distillation.serving import admission
from python3_distillation.serving.errors import invalid
from python3_distillation.serving.schemas import GenerateRequest

bp = Blueprint("native_api", __name__)


@bp.post("/api/generate")
def generate() -> Response:
    """``{"prompt" | "prompts", "model"?, sampling fields}`` → completions + timings."""
    st = admission.state()
    req: GenerateRequest = admission.read(GenerateRequest)
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
            "completion_tokens": c.completion_tokens, "finish_reason": job.finish_reason(c),
            "seconds": round(c.seconds, 4),
            "tokens_per_second": round(c.completion_tokens / c.seconds, 2) if c.seconds > 0 else None}
           for i, c in enumerate(done)]
    return jsonify({"model": name, "completions": out, "usage": admission.usage(done),
                    "timings": {"queue_seconds": round((job.started or t0) - job.submitted, 4),
                                "total_seconds": round(total, 4), "batch_rows": job.batch_rows}})


@bp.get("/api/info")
def info() -> Response:
    st = admission.state()
    c = st.config
    status, ready = st.readiness()
    return jsonify({"ready": status == 200, "error": ready.get("reason") if ready["status"] == "failed" else None,
                    "default": st.default, "backend": None, "models": list(st.info.values()),
                    "limits": admission.limits(c)})

