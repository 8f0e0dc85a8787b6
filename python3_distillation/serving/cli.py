"""The server's command line: the seed's entry scripts and ``gpt2-distill serve`` run the production server.

    python python3_distillation/distill_api_server_v2.py --port 6006 --compare python3_distillation/gpt2_teacher

Gunicorn started in process (settings in gunicorn_conf.py) with the app built from the options below.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from python3_distillation.device_plan import SERVING_DTYPES
from python3_distillation.errors import BadInput
from python3_distillation.paths import model_arg, model_dir
from python3_distillation.serving.settings import ServeConfig

log = logging.getLogger(__name__)


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
    # Options whose dest is a ServeConfig field become that field (config_from).
    parser.add_argument("--backend", dest="backend_url", metavar="URL", default=os.environ.get("DISTILL_BACKEND_URL"),
                        help="answer from this OpenAI-compatible server (e.g. vLLM at http://127.0.0.1:8000) "
                             "instead of loading models; default $DISTILL_BACKEND_URL")
    parser.add_argument("--host", default=d.host, help="bind address (default %(default)s; 0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=d.port, help="default %(default)s")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best available)")
    parser.add_argument("--dtype", choices=list(SERVING_DTYPES), default=os.environ.get("DISTILL_DTYPE", d.dtype),
                        help="weights' dtype: auto = bf16 on GPUs with native bf16, fp16 on older ones, fp32 on CPU; "
                             "int8 folders stay int8 on CPU and are dequantized once on CUDA (default %(default)s, "
                             "$DISTILL_DTYPE)")
    parser.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                        help="accept this Host header too (repeatable; '*' accepts any)")
    parser.add_argument("--max-batch-rows", type=int, default=d.max_batch_rows,
                        help="rows decoding together (default %(default)s)")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="requests waiting for a place before 429s (default %(default)s)")
    parser.add_argument("--max-prompts", type=int, default=d.max_prompts,
                        help="rows per request, prompts x n (default %(default)s)")
    parser.add_argument("--time-limit", dest="time_limit_s", metavar="TIME_LIMIT", type=float, default=d.time_limit_s,
                        help="seconds, default %(default)s")
    parser.add_argument("--batching", choices=["continuous", "static"], default=d.batching,
                        help="static: new requests wait for the running batch (default %(default)s)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default=os.environ.get("DISTILL_COMPILE") or "auto",
                        help="the compiled decode step, ready before the server is: auto = on a CPU with a C++ "
                             "compiler, eager if compiling fails (default %(default)s)")
    return parser


def config_from(args: argparse.Namespace) -> ServeConfig:
    values = vars(args).copy()
    dirs = [str(model_arg(d)) for d in [values.pop("model"), *values.pop("compare")]]
    return ServeConfig(**values, model_dirs=[] if args.backend_url else dirs)


def main(argv: list[str] | None = None, default_model: str = "v2") -> int:
    """Parse options, check the model folders, then run gunicorn in the foreground until stopped."""
    args = build_parser(default_model).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from(args).check_model_dirs()
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
