"""What a server is configured with: ``ServeConfig``, from keyword arguments or ``DISTILL_*`` variables.

    DISTILL_MODEL_DIR=python3_distillation/gpt2_student_v2 DISTILL_MAX_QUEUE=128 \\
        python -c "from python3_distillation.serving.settings import ServeConfig; print(ServeConfig.from_env())"

Every field ``name`` is read from ``DISTILL_NAME`` (lists comma-separated); the models from
``DISTILL_MODEL_DIR`` (default v2) and ``DISTILL_COMPARE_DIRS``, none with ``DISTILL_BACKEND_URL``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from python3_distillation.device_plan import SERVING_DTYPES
from python3_distillation.errors import ConfigError, ModelError
from python3_distillation.paths import model_dir
from python3_distillation.validation import one_line

ENV_PREFIX = "DISTILL_"
# Server threads kept free of generation requests, for /health, /ready, /metrics, the page and 429s.
SPARE_THREADS = 8


def _strings(v: Any) -> Any:
    """A list from a comma-separated variable, or one path; folders given as Paths become strings."""
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    if isinstance(v, os.PathLike):
        return [os.fspath(v)]
    return [os.fspath(p) if isinstance(p, os.PathLike) else p for p in v] if isinstance(v, (list, tuple)) else v


def _backend_url(v: Any) -> Any:
    if isinstance(v, str) and v and not v.startswith(("http://", "https://")):
        raise ValueError("the backend URL must start with http:// or https://")
    return v.rstrip("/") if isinstance(v, str) else v


Strings = Annotated[list[str], NoDecode, BeforeValidator(_strings)]


class _Environment(EnvSettingsSource):
    """The ``DISTILL_*`` values of a given mapping (``os.environ`` or a test's own)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
        self.env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self.env, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class ServeConfig(BaseSettings):
    """Everything the server needs; the first of ``model_dirs`` is the default model."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, env_ignore_empty=True,
                                      extra="forbid")

    model_dirs: Strings = Field(default_factory=lambda: [str(model_dir("v2"))])
    host: str = "127.0.0.1"  # the bind address: also allowed as a Host header
    port: int = 6006
    device: str | None = None
    # Weights' dtype (device_plan.serving_dtype): auto = bf16 on GPUs with native bf16, fp16 on older tensor-core
    # GPUs, fp32 on CPU; an int8 folder stays int8 on CPU and is dequantized once to that dtype on CUDA.
    dtype: Literal[tuple(SERVING_DTYPES)] = "auto"
    max_body_bytes: int = Field(1 << 20, ge=1)  # larger bodies → 413
    max_prompts: int = Field(16, ge=1)  # rows per request (prompts × n) → 422 past it
    max_batch_rows: int = Field(32, ge=1)  # rows decoding together; requests join as rows free up
    max_queue: int = Field(64, ge=1)  # requests waiting for a place in the batch; past it → 429 with Retry-After
    time_limit_s: float = Field(60.0, gt=0)  # per request, from arrival: 504 waiting, "time_limit" once generating
    batch_window_ms: float = Field(2.0, ge=0)  # an idle model waits this long for more requests to prefill together...
    batch_max_wait_ms: float = 20.0  # ...but never longer than this after the first one
    batching: Literal["continuous", "static"] = "continuous"  # static: new requests wait for the running batch
    load_in_background: bool = True  # /ready answers 503 while loading, then 200
    compile: Literal["auto"] | bool = "auto"  # the compiled decode step: ServingState.compile_step says when
    allowed_hosts: Strings = []  # Host headers accepted besides loopback names and the bind address ("*": any)
    backend_url: Annotated[str | None, BeforeValidator(_backend_url)] = None  # OpenAI-compatible, instead of models

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise one_line(e, type(self), ConfigError, "ServeConfig key",
                           lambda path: f"ServeConfig.{path} ({ENV_PREFIX}{path.upper()})") from None

    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]  # errors as above, see validation.py

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **other_sources):
        return (init_settings,)  # keyword construction reads no environment: from_env does, from a given mapping

    @model_validator(mode="after")
    def _rules(self) -> ServeConfig:
        if not self.model_dirs and not self.backend_url:
            raise ValueError("model_dirs is empty: give at least one model folder (or a backend_url)")
        if self.batch_window_ms > self.batch_max_wait_ms:
            raise ValueError("ServeConfig needs batch_window_ms <= batch_max_wait_ms")
        if self.max_prompts > self.max_batch_rows:
            raise ValueError(f"max_prompts ({self.max_prompts}) cannot exceed max_batch_rows ({self.max_batch_rows}): "
                             "a request's rows join the batch together")
        return self

    def check_model_dirs(self) -> ServeConfig:
        """``self``, once every model folder exists (ModelError otherwise: fail before claiming to be up)."""
        if missing := [d for d in self.model_dirs if not os.path.isdir(d)]:
            raise ModelError(f"model folder(s) not found: {', '.join(missing)} "
                             "(train them first: `make run`, or pass --model / DISTILL_MODEL_DIR)")
        return self

    @property
    def server_threads(self) -> int:
        """Threads the production server needs: one per request decoding or waiting, plus spares."""
        return self.max_batch_rows + self.max_queue + SPARE_THREADS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeConfig:
        """The settings of ``env`` (default ``os.environ``), as the module docstring says."""
        env = os.environ if env is None else env
        values = _Environment(cls, env)()
        dirs = [env.get(f"{ENV_PREFIX}MODEL_DIR") or str(model_dir("v2"))]
        dirs += _strings(env.get(f"{ENV_PREFIX}COMPARE_DIRS", ""))
        values["model_dirs"] = [] if values.get("backend_url") else dirs
        return cls(**values)
