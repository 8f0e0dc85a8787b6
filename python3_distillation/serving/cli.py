"""The server's command line: the seed's entry scripts and ``gpt2-distill serve`` run the production server.

    python python3_distillation/distill_api_server_v2.py --port 6006 --compare python3_distillation/gpt2_teacher

The same server as the Docker images: gunicorn, one worker, threads (settings in gunicorn_conf.py),
started here in process with the app built from the options below.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from python3_distillation.device_plan import SERVING_DTYPES
from python3_distillation.errors import BadInput, ModelError
from python3_distillation.paths import model_arg, model_dir
from python3_distillation.serving.settings import ServeConfig

log = logging.getLogger(__name__)

WSGI_APP = "python3_distillation.serving.wsgi:app"
GUNICORN_CONFIG = "python:python3_distillation.serving.gunicorn_conf"


def build_parser(default_model: str) -> argparse.ArgumentParser:
    d = ServeConfig()
    parser = argparse.ArgumentParser(
        prog=f"distill_api_server{'_v2' if default_model == 'v2' else ''}",
        description=f"Serve the {default_model} student: web page + JSON/OpenAI API on http://127.0.0.1:{d.port} "
                    f"(gunicorn, as in the Docker images).")
    parser.add_argument("--model", default=str(model_dir(default_model)),
                        help="model folder, or a model name such as v2_int8 or teacher (default: %(default)s)")
    parser.add_argument("--compare", action="append", default=[], metavar="DIR",
                        help="another model folder to serve side by side (repeatable), e.g. the teacher")
    parser.add_argument("--backend", metavar="URL", default=os.environ.get("DISTILL_BACKEND_URL"),
                        help="answer from this OpenAI-compatible server (e.g. vLLM at http://127.0.0.1:8000) "
                             "instead of loading models; default $DISTILL_BACKEND_URL")
    parser.add_argument("--host", default=d.host, help="bind address (default %(default)s; 0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=d.port, help="default %(default)s")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best available)")
    parser.add_argument("--dtype", choices=list(SERVING_DTYPES), default=os.environ.get("DISTILL_DTYPE", d.dtype),
                        help="weights' dtype: auto = bf16 on GPUs with native bf16, fp16 on older ones, fp32 on CPU; "
                             "int8 folders stay int8 on CPU and are dequantized once on CUDA (default %(default)s, "
                             "$DISTILL_DTYPE)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="accept this Host header too (repeatable; '*' accepts any)")
    parser.add_argument("--max-batch-rows", type=int, default=d.max_batch_rows,
                        help="rows decoding together (default %(default)s)")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="requests waiting for a place before 429s (default %(default)s)")
    parser.add_argument("--max-prompts", type=int, default=d.max_prompts,
                        help="rows per request, prompts x n (default %(default)s)")
    parser.add_argument("--time-limit", type=float, default=d.time_limit_s, help="seconds, default %(default)s")
    parser.add_argument("--batching", choices=["continuous", "static"], default=d.batching,
                        help="static: new requests wait for the running batch (default %(default)s)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default=os.environ.get("DISTILL_COMPILE") or "auto",
                        help="the compiled decode step, ready before the server is: auto = on a CPU with a C++ "
                             "compiler, eager if compiling fails (default %(default)s)")
    return parser


def config_from(args: argparse.Namespace) -> ServeConfig:
    dirs = [str(model_arg(args.model)), *(str(model_arg(c)) for c in args.compare)]
    return ServeConfig(model_dirs=[] if args.backend else dirs, host=args.host,
                       port=args.port, device=args.device, dtype=args.dtype, max_batch_rows=args.max_batch_rows,
                       max_queue=args.max_queue, max_prompts=args.max_prompts, time_limit_s=args.time_limit,
                       batching=args.batching, allowed_hosts=args.allowed_host, backend_url=args.backend,
                       compile=args.compile)


def main(argv: list[str] | None = None, default_model: str = "v2") -> int:
    """Parse options, check the model folders, then run gunicorn in the foreground until stopped."""
    args = build_parser(default_model).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from(args)
        missing = [d for d in config.model_dirs if not os.path.isdir(d)]
        if missing:
            raise ModelError(f"model folder(s) not found: {', '.join(missing)} (train them first: `make run`)")
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    return serve(config)


def serve(config: ServeConfig) -> int:
    from gunicorn.app.base import BaseApplication

    from python3_distillation.serving import gunicorn_conf

    class Server(BaseApplication):
        def load_config(self) -> None:
            for key in ("worker_class", "workers", "timeout", "graceful_timeout"):
                self.cfg.set(key, getattr(gunicorn_conf, key))
            self.cfg.set("threads", config.server_threads)
            self.cfg.set("bind", [f"[{config.host}]:{config.port}" if ":" in config.host
                                  else f"{config.host}:{config.port}"])

        def load(self):
            from python3_distillation.serving.app import create_app

            return create_app(config)  # in the worker, after the fork: the model loads there

    log.info("serving on http://%s:%d (gunicorn, %d threads)", config.host, config.port, config.server_threads)
    Server().run()
    return 0
