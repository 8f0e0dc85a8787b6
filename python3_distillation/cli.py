"""Command line: one subcommand per stage of the pipeline.

    gpt2-distill assets                       # GPT-2 tokenizer + Austen corpus, built offline once
    gpt2-distill prepare-data [--config v2]   # tokenize the configured data into token shards ahead of training
    gpt2-distill teacher [--resume]           # train the embedded teacher (or fine-tune: teacher.init_from=gpt2)
    gpt2-distill distill --config v2          # 6-layer student (v1: --config v1; CE baseline: --config v2_ce)
    gpt2-distill cache-teacher --config v2    # the teacher's top-k once, for distill.teacher_cache=DIR (offline KD)
    gpt2-distill report                       # teacher / v1 / v2 / CE-only v2 side by side
    gpt2-distill quantize MODEL_DIR [--out D] # int8 copy of a model folder (MODEL_DIR_int8)
    gpt2-distill export MODEL_DIR --to gguf   # for llama.cpp / Ollama (--type f32|f16|q8_0); --to onnx [--int8]
    gpt2-distill prune MODEL_DIR --target 0.5 # fewer blocks / MLP neurons by measured importance (MODEL_DIR_pruned50)
    gpt2-distill augment --n-samples 512      # teacher-sampled continuations of training prompts → JSONL
    gpt2-distill infer "It is a truth"        # generate (see `gpt2-distill infer --help`)
    gpt2-distill serve                        # web page + API on 127.0.0.1:6006

Training commands take ``--config FILE_OR_NAME`` (repeatable, names resolve to ``configs/NAME.yaml``)
and dotted overrides such as ``train.max_steps=100 student.n_layer=4``. Errors in the input are
reported in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from python3_distillation.config import load_config
from python3_distillation.errors import EXIT_BAD_INPUT, BadInput, ConfigError


def _config_parser(prog: str, description: str, default_config: str | None, example: str = "train.max_steps=100",
                   config: str = "YAML config") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help=f"{config} (diff from the defaults); repeatable; default: {default_config or 'none'}")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=f"e.g. {example}")
    return p


def _load(args, default_config: str | None):
    return load_config(args.config or ([default_config] if default_config else []), args.overrides)


def cmd_assets(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpt2-distill assets", description="Build the GPT-2 tokenizer and the "
                                "Austen corpus under the data dir ($DISTILL_DATA_DIR), offline, once.")
    p.parse_args(argv)
    from python3_distillation.corpus import build_austen_corpus
    from python3_distillation.paths import data_dir
    from python3_distillation.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2", data_dir())
    paths = build_austen_corpus(data_dir())
    print(f"tokenizer: {tok.name_or_path} ({len(tok):,} tokens)")
    for split, path in paths.items():
        print(f"corpus {split}: {path}")
    return 0


def cmd_stage(argv: list[str], stage: str, default_config: str | None) -> int:
    desc = ("Train the GPT-2 teacher (from scratch, or fine-tune teacher.init_from)." if stage == "teacher" else
            "Distil the teacher into a student (KL×T² soft targets + CE).")
    p = _config_parser(f"gpt2-distill {stage}", desc, default_config)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    args = p.parse_args(argv)
    cfg = _load(args, default_config)
    if cfg.stage != stage:
        raise ConfigError(f"config is for stage {cfg.stage!r}, this command is {stage!r}")
    module = "python3_distillation.teacher" if stage == "teacher" else "python3_distillation.distill"
    getattr(importlib.import_module(module), f"run_{stage}")(cfg, resume=args.resume)  # run_teacher, run_distill
    return 0


def cmd_prepare_data(argv: list[str]) -> int:
    p = _config_parser("gpt2-distill prepare-data", "Tokenize the configured data into token shards "
                       "(<data dir>/tokens/<key>/) ahead of training, resuming an interrupted run, and print the "
                       "manifest summary. Training finds the same shards.", "teacher",
                       "data.train=corpus/ data.block_size=512")
    p.add_argument("--num-proc", type=int, default=None, metavar="N",
                   help="tokenizing processes (default: from the CPU count and the size of the data)")
    args = p.parse_args(argv)
    from python3_distillation.data import prepare_tokens
    from python3_distillation.models import stage_tokenizer

    if args.num_proc is not None and args.num_proc < 1:
        raise ConfigError("--num-proc must be ≥ 1")
    cfg = _load(args, "teacher")
    # The tokenizer the stage itself will use, so training finds these shards.
    shards = prepare_tokens(cfg.data, stage_tokenizer(cfg), seed=cfg.train.seed, num_proc=args.num_proc)
    print(shards.summary(cfg.data.block_size))
    return 0


def cmd_cache_teacher(argv: list[str]) -> int:
    p = _config_parser("gpt2-distill cache-teacher", "Run the teacher once over the training blocks and store its "
                       "top-k log-probabilities per position (+ the tail's mass), for distill.teacher_cache=DIR. "
                       "Resumes an interrupted run.", "v2", "distill.cache_top_k=32", "YAML config of the distillation")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write (default: distill.teacher_cache, else <data dir>/teacher_cache/<name>)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="blocks per teacher forward (default: train.batch_size)")
    args = p.parse_args(argv)
    from python3_distillation.teacher_cache import cache_teacher

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size must be ≥ 1")
    cfg = _load(args, "v2")
    if cfg.stage != "distill":
        raise ConfigError(f"config is for stage {cfg.stage!r}; cache-teacher reads a distillation config "
                          "(its teacher, data, distill.temperature and distill.cache_top_k)")
    cache = cache_teacher(cfg, args.out, args.batch_size)
    print(cache.summary())
    print(f"train from it: gpt2-distill distill {' '.join(f'--config {c}' for c in args.config or ['v2'])} "
          f"distill.teacher_cache={cache.folder}")
    return 0


def _delegate(module: str):
    """``module``'s ``main(argv)``, imported when run (``--help`` needs no torch); full names for test_layout."""
    return lambda argv: importlib.import_module(module).main(argv)


COMMANDS = {
    "assets": cmd_assets,
    "prepare-data": cmd_prepare_data,
    "teacher": lambda argv: cmd_stage(argv, "teacher", "teacher"),
    "distill": lambda argv: cmd_stage(argv, "distill", "v2"),
    "cache-teacher": cmd_cache_teacher,
    "report": _delegate("python3_distillation.evaluation.report"),
    "quantize": _delegate("python3_distillation.quantize"),
    "export": _delegate("python3_distillation.export"),
    "prune": _delegate("python3_distillation.prune"),
    "augment": _delegate("python3_distillation.augment"),
    "infer": _delegate("python3_distillation.infer"),
    "serve": _delegate("python3_distillation.serving.cli"),
}


def run_guarded(fn, argv: list[str]) -> int:
    """Run a command; input errors the user can fix become one line on stderr and exit status 2."""
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn(argv)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted; run again with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__.strip())
        return 0 if argv else EXIT_BAD_INPUT
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_guarded(COMMANDS[name], rest)


if __name__ == "__main__":
    raise SystemExit(main())
