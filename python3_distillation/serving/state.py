"""What one app serves: its models and their batchers, loading, health and readiness.

    curl -s localhost:6006/health; curl -s localhost:6006/ready

What ``/health`` and ``/ready`` answer, and that no reason shows a filesystem path: README.md, "Serving" (health).
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from python3_distillation.device_plan import pick_device, serving_dtype
from python3_distillation.evaluation.measure import weights_bytes
from python3_distillation.fsio import human_size
from python3_distillation.generation import Generator
from python3_distillation.generation.compiled import cpp_compiler
from python3_distillation.int8 import is_int8_dir
from python3_distillation.serving.batching import Batcher
from python3_distillation.serving.errors import ApiError, not_ready
from python3_distillation.serving.metrics import ServerMetrics
from python3_distillation.serving.settings import ServeConfig

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[ServingState] = weakref.WeakSet()
# Absolute paths in messages (exceptions of loaders name the files they read) → their last part.
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:,;()\[\]]+)+[\\/]?")


def public(message: str) -> str:
    """``message`` with every absolute filesystem path cut to its last component."""
    return _PATH.sub(lambda m: Path(m.group(0).rstrip("/\\")).name or "/", message)


class ServingState:
    """The loaded models, their batchers and the metrics of one app."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = ServerMetrics()
        self.batchers: dict[str, Batcher] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.default: str | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.loading_since = time.monotonic()
        _LIVE.add(self)

    def load(self) -> None:
        """Load every configured model once (the slow part: runs in a thread when backgrounded)."""
        try:
            generators = {}
            for d in map(Path, self.config.model_dirs):
                dtype, why = self.weights_dtype(d)
                gen = Generator.from_pretrained(d, device=self.config.device, dtype=dtype, compile=False)
                gen.dtype_reason = why
                log.info("%s: dtype %s — %s", d.name, gen.precision, why)
                self.compile_step(gen, d.name)
                name = key = gen.name or d.name
                i = 2
                while key in generators:  # two models of one name: name, name-2, ...
                    key, i = f"{name}-{i}", i + 1
                generators[key] = (gen, d)
            self.install(generators)
        except Exception as e:
            self.load_error = public(f"model loading failed: {type(e).__name__}: {e}")
            log.error("model loading failed: %s: %s", type(e).__name__, e)
            raise

    def compile_step(self, gen: Generator, name: str) -> None:
        """The compiled decode step per ``config.compile``, ready before the server is: no request
        waits behind a compile. ``auto``: on CPU with a C++ compiler, else (or if compiling fails) eager."""
        wanted = self.config.compile
        if wanted == "auto":
            wanted = gen.device.type == "cpu" and gen.backend == "gpt2" and cpp_compiler() is not None
        if not wanted:
            return
        try:
            seconds = gen.use_compiled_step(self.config.max_batch_rows)
        except Exception as e:
            if self.config.compile is True:
                raise
            log.warning("%s: decoding eagerly, the compiled step is not available: %s", name,
                        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            return
        log.info("%s: compiled decode step ready in %.1f s", name, seconds)

    def weights_dtype(self, folder: Path) -> tuple[torch.dtype | None, str]:
        """The dtype to load ``folder`` in on this server's device, and why (device_plan.serving_dtype)."""
        try:
            device = pick_device(self.config.device)
        except RuntimeError:  # a malformed device string: Generator.from_pretrained says so in one line
            return None, "device unknown"
        return serving_dtype(self.config.dtype, device, int8=is_int8_dir(folder))

    def install(self, generators: Mapping[str, Generator | tuple[Generator, Path | None]]) -> None:
        info, batchers, c = {}, {}, self.config
        for name, value in generators.items():
            gen, folder = value if isinstance(value, tuple) else (value, None)
            info[name] = describe(name, gen, folder)
            batchers[name] = Batcher(gen, name, max_rows=c.max_batch_rows, max_queue=c.max_queue,
                                     window_s=c.batch_window_ms / 1000, max_wait_s=c.batch_max_wait_ms / 1000,
                                     continuous=c.batching == "continuous", metrics=self.metrics)
            self.metrics.add_model(name)
        # Published whole, then flagged ready: request threads never see a half-filled dict.
        self.info, self.batchers = info, batchers
        self.default = next(iter(batchers))
        self.ready.set()
        self.metrics.ready.set(1)
        log.info("serving %s", ", ".join(f"{n} ({i['n_params']:,} params)" for n, i in self.info.items()))

    def close(self) -> None:
        """Stop every batcher thread (unfinished requests fail with 503). Safe to call twice."""
        for b in self.batchers.values():
            b.close()
        self.metrics.ready.set(0)

    def _failed(self) -> tuple[int, dict[str, Any]] | None:
        """503 and why when this process cannot serve: a batcher thread died, or loading failed."""
        dead = [public(f"the batcher thread of model {name!r} is not running" + (f": {b.error}" if b.error else ""))
                for name, b in self.batchers.items() if not b.alive]
        reason = dead[0] if dead else self.load_error
        return (503, {"status": "failed", "reason": reason}) if reason else None

    def health(self) -> tuple[int, dict[str, Any]]:
        """Liveness: (HTTP status, body)."""
        return self._failed() or (200, {"status": "ok", "models": "ready" if self.ready.is_set() else "loading"})

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """Readiness: (HTTP status, body with the reason when not ready)."""
        if failed := self._failed():  # batchers exist only once loaded, so a dead one means a loaded model
            return failed
        if not self.ready.is_set():
            waited = time.monotonic() - self.loading_since
            return 503, {"status": "loading", "reason": f"models are still loading ({waited:.0f} s so far)"}
        return 200, {"status": "ready", "models": list(self.info)}

    def require_ready(self) -> None:
        status, body = self.readiness()
        if status != 200:
            raise not_ready(body)

    def model(self, name: str | None) -> tuple[str, Generator, Batcher]:
        self.require_ready()
        name = name or self.default  # a str: the schemas' "model" is one, and ready means a default is set
        if name not in self.batchers:
            raise ApiError(404, f"model {name[:100]!r} is not loaded; available: {sorted(self.batchers)}",
                           "model_not_found", "model")
        return name, self.batchers[name].generator, self.batchers[name]


def describe(name: str, gen: Generator, folder: Path | None) -> dict[str, Any]:
    """What the page, /api/info and /v1/models show about a model (no filesystem paths)."""
    size = sum(t.numel() * t.element_size() for t in (*gen.model.parameters(), *gen.model.buffers()))
    disk = weights_bytes(folder) if folder and folder.is_dir() else None
    return {"id": name, "n_params": int(gen.n_params), "size_bytes": int(size), "size": human_size(size),
            "disk_bytes": disk, "context_length": int(gen.context_length), "device": str(gen.device),
            "precision": gen.precision, "precision_reason": getattr(gen, "dtype_reason", None),
            "decode_step": "compiled" if gen.compile else "eager",
            "n_layer": getattr(gen.model.config, "n_layer", None)}


@atexit.register
def _close_all() -> None:
    """At process exit, stop the batcher threads of every app still open."""
    for st in list(_LIVE):
        try:
            st.close()
        except Exception:  # exiting anyway: never mask the real exit status
            log.exception("closing a server state at exit")
