"""What a server is configured with: ``ServeConfig``, from keyword arguments or ``DISTILL_*`` variables.

    DISTILL_MODEL_DIR=python3_distillation/gpt2_student_v2 DISTILL_MAX_QUEUE=128 \\
        python -c "from python3_distillation.serving.settings import ServeConfig; print(ServeConfig.from_env())"
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from python3_distillation.paths import model_dir

# Server threads kept free of generation requests, for /health, /ready, /metrics, the page and 429s.
SPARE_THREADS = 8


@dataclass
class ServeConfig:
    """Everything the server needs; the first of ``model_dirs`` is the default model."""

    model_dirs: list[str] = field(default_factory=lambda: [str(model_dir("v2"))])
    host: str = "127.0.0.1"  # the bind address: also allowed as a Host header
    port: int = 6006
    device: str | None = None
    # Weights' dtype: auto = bf16 on GPUs with native bf16, fp16 on older tensor-core GPUs, fp32 on
    # CPU; an int8 folder stays int8 on CPU and is dequantized once to that dtype on CUDA
    # (device_plan.serving_dtype).
    dtype: str = "auto"
    max_body_bytes: int = 1 << 20  # larger bodies → 413
    max_prompts: int = 16  # rows per request (prompts × n) → 422 past it
    max_batch_rows: int = 32  # rows decoding together; requests join as rows free up
    max_queue: int = 64  # requests waiting for a place in the batch; past it → 429 with Retry-After
    time_limit_s: float = 60.0  # per request, from arrival: 504 while waiting, "time_limit" once generating
    batch_window_ms: float = 2.0  # an idle model waits this long for more requests to prefill together...
    batch_max_wait_ms: float = 20.0  # ...but never longer than this after the first one
    batching: str = "continuous"  # or "static": new requests wait for the running batch to finish
    load_in_background: bool = True  # /ready answers 503 while loading, then 200
    # Host headers accepted besides loopback names and the bind address ("*": any; a wildcard bind
    # also accepts any IP address, which DNS rebinding cannot produce).
    allowed_hosts: list[str] = field(default_factory=list)
    backend_url: str | None = None  # an OpenAI-compatible server to answer instead of local models

    ENV = {  # environment variable → field, for wsgi.py and the Docker images
        "DISTILL_HOST": "host",
        "DISTILL_DEVICE": "device",
        "DISTILL_DTYPE": "dtype",
        "DISTILL_MAX_BODY_BYTES": "max_body_bytes",
        "DISTILL_MAX_PROMPTS": "max_prompts",
        "DISTILL_MAX_BATCH_ROWS": "max_batch_rows",
        "DISTILL_MAX_QUEUE": "max_queue",
        "DISTILL_TIME_LIMIT_S": "time_limit_s",
        "DISTILL_BATCH_WINDOW_MS": "batch_window_ms",
        "DISTILL_BATCH_MAX_WAIT_MS": "batch_max_wait_ms",
        "DISTILL_BATCHING": "batching",
        "DISTILL_ALLOWED_HOSTS": "allowed_hosts",
        "DISTILL_BACKEND_URL": "backend_url",
    }

    @property
    def server_threads(self) -> int:
        """Threads the production server needs: one per request decoding or waiting, plus spares."""
        return self.max_batch_rows + self.max_queue + SPARE_THREADS

    def validate(self) -> ServeConfig:
        if not self.model_dirs and not self.backend_url:
            raise ValueError("ServeConfig.model_dirs is empty: give at least one model folder")
        for name in ("max_body_bytes", "max_prompts", "max_batch_rows", "max_queue"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.time_limit_s <= 0 or not 0 <= self.batch_window_ms <= self.batch_max_wait_ms:
            raise ValueError("ServeConfig needs time_limit_s > 0 and 0 <= batch_window_ms <= batch_max_wait_ms")
        if self.max_prompts > self.max_batch_rows:
            raise ValueError(f"max_prompts ({self.max_prompts}) cannot exceed max_batch_rows ({self.max_batch_rows}): "
                             "a request's rows join the batch together")
        from python3_distillation.device_plan import SERVING_DTYPES

        if self.dtype not in SERVING_DTYPES:
            raise ValueError(f"ServeConfig.dtype must be one of {', '.join(SERVING_DTYPES)}, got {self.dtype!r}")
        if self.batching not in {"continuous", "static"}:
            raise ValueError(f"ServeConfig.batching must be 'continuous' or 'static', got {self.batching!r}")
        if self.backend_url and not self.backend_url.startswith(("http://", "https://")):
            raise ValueError(f"the backend URL must start with http:// or https://, got {self.backend_url!r}")
        if self.backend_url:
            self.backend_url = self.backend_url.rstrip("/")
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
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for var, name in cls.ENV.items():
            raw = env.get(var, "").strip()
            if not raw:
                continue
            kind = types[name]
            if kind.startswith("list"):
                kwargs[name] = [h.strip() for h in raw.split(",") if h.strip()]
                continue
            cast = float if "float" in kind else int if kind.startswith("int") else str
            try:
                kwargs[name] = cast(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {cast.__name__}") from None
        if kwargs.get("backend_url"):
            kwargs["model_dirs"] = []  # the backend answers: no local model is loaded
        return cls.from_dict(kwargs)
